"""The log-prob wrapper that both engines run: per-sequence sums of response log-probs and token counts.

No deepspeed here: engine/build.py decides how a model is built (zero.Init or not) and wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpo_ds.model.attention import attention_inputs
from dpo_ds.model.files import ModelError
from dpo_ds.model.logprobs import token_logprobs
from dpo_ds.model.router import Routing, balance_loss, balance_sums


def _restricted_head_ok(config) -> bool:
    # Models that post-process logits (Gemma soft-capping, Cohere scale) must take the full forward.
    return (
        not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) is None
    )


@dataclass
class SequenceLogps:
    """Per-sequence sums of response log-probs and response token counts, (n_seqs,) each. For
    preference data sequences [0, n) are the chosen responses and [n, 2n) the rejected ones
    (pair i = (i, n + i), the collators' order); split_pairs is the one place that split is made."""

    logps: torch.Tensor
    counts: torch.Tensor
    aux: torch.Tensor | None = None  # an MoE model's router load-balancing loss (model/router.py), ()
    load: torch.Tensor | None = None  # its routed token assignments per (layer, expert), no gradient
    # WPO: per sequence, the sum over its response tokens of log p - log sum_v p_v^2 (unweighted by LD-DPO), no
    # gradient; training.losses.wpo_weights turns it into the pair's weight
    aligned: torch.Tensor | None = None

    @property
    def chosen(self) -> torch.Tensor:
        return split_pairs(self.logps)[0]

    @property
    def rejected(self) -> torch.Tensor:
        return split_pairs(self.logps)[1]

    @property
    def chosen_counts(self) -> torch.Tensor:
        return split_pairs(self.counts)[0]


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a (2 * pairs,) per-sequence tensor."""
    n = x.shape[0] // 2
    return x[:n], x[n:]


class SumOverGroup(torch.autograd.Function):
    """Per-sequence sums of a sequence-parallel group's pieces: the forward all-reduces them, so every
    rank of the group holds the whole sequences' log-probs and computes the same loss; the backward
    hands each rank the gradient of its own piece, times grad_scale. Every rank backpropagates the same
    loss, so the sum over the group of each parameter's gradient is the whole sequence's gradient once
    (grad_scale 1); engine/sequence_parallel.py sets the scale from how its ZeRO stage averages gradients over the ranks."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        y = x.clone()
        torch.distributed.all_reduce(y, group=group)
        ctx.grad_scale = grad_scale
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None


def reduce_sequences(
    per_token: torch.Tensor, target_seq: torch.Tensor, n_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scored-token log-probs (M,) -> per-sequence sums and counts ((n_seqs,), (n_seqs,))."""
    logps = per_token.new_zeros(n_seqs).index_add(0, target_seq, per_token)
    counts = torch.zeros(n_seqs, dtype=torch.long, device=target_seq.device)
    return logps, counts.index_add(0, target_seq, torch.ones_like(target_seq))


def length_weights(
    target_seq: torch.Tensor,
    target_pos: torch.Tensor,
    n_seqs: int,
    ld_alpha: float,
    group=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization"): each scored
    token's weight, 1 within the first min(|y_w|, |y_l|) tokens of its pair's responses and ld_alpha past them,
    so that the longer response's surplus counts alpha times. (M,) for target_seq's tokens; sequences [0, n) are
    the chosen responses and [n, 2n) the rejected ones (split_pairs). A token's place in its response is its
    rank by position among its sequence's tokens (a shared-prompt response's first token is predicted from the
    prompt's last position, before its others); under sequence parallelism (`group`) the tokens of the group's
    lower ranks come first, and the lengths are the group's."""
    counts = torch.bincount(target_seq, minlength=n_seqs)  # this piece's tokens per sequence
    before, total = torch.zeros_like(counts), counts
    if group is not None:
        pieces = [torch.zeros_like(counts) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(pieces, counts, group=group)
        mine = torch.distributed.get_rank(group)
        before, total = sum(pieces[:mine], torch.zeros_like(counts)), sum(pieces, torch.zeros_like(counts))
    order = torch.argsort(target_seq * (int(target_pos.max()) + 1 if target_pos.numel() else 1) + target_pos)
    starts = torch.cumsum(counts, 0) - counts  # where each sequence's tokens begin in `order`
    place = torch.empty_like(target_seq)
    place[order] = torch.arange(target_seq.numel(), device=target_seq.device) - starts[target_seq[order]]
    shared = torch.minimum(*split_pairs(total)).repeat(2)  # (n_seqs,) the pair's shorter length
    inside = (place + before[target_seq]) < shared[target_seq]
    one = torch.ones((), dtype=dtype, device=target_seq.device)
    return torch.where(inside, one, one * ld_alpha)


def sequence_logps(engine, batch) -> SequenceLogps:
    """Run a LogprobLM (or the DeepSpeed engine around one) on a micro-batch (data.layout.MicroBatch)."""
    module = getattr(engine, "module", engine)
    outputs = engine(**batch.model_inputs(module.routing is not None))  # an MoE's router loss needs weights
    return SequenceLogps(**dict(zip(module.fields, outputs, strict=True)))


def _fuse_head(head: nn.Module) -> None:
    """Let the lm_head answer head(hidden, labels) with per-token log-probs computed in chunks from
    its weight (logprobs/fused_linear.py), and head(hidden) with logits as before (generation).

    The computation runs inside the head module's own call, so DeepSpeed ZeRO-3 gathers the weight
    for it in forward and again in backward exactly as for a plain Linear; the weight is never
    gathered or copied by hand, and tied embeddings stay one tensor."""
    from dpo_ds.model.logprobs.fused_linear import fused_linear_logprobs

    plain = head.forward

    def forward(hidden, labels=None, with_sq=False):
        if labels is None:
            return plain(hidden)
        return fused_linear_logprobs(
            hidden, head.weight, labels, bias=getattr(head, "bias", None), with_sq=with_sq
        )

    head.forward = forward


class LogprobLM(nn.Module):
    """Wraps a HF causal LM; forward returns, per sequence of the micro-batch, the sum of its
    response tokens' log-probs and their count: ((n_seqs,), (n_seqs,)), a tuple so that DeepSpeed's
    ZeRO-3 hooks see the tensors.

    Every layout (padded, packed, shared_prompt; data/collate.py) gives the scored tokens explicitly:
    target_pos (the flat position whose hidden state predicts each), target_ids, target_seq. The
    lm_head runs only there, so prompt and padding positions never produce logits (for DPO data
    prompts are often half the tokens, and the (tokens, vocab) logits are the biggest activation).
    A shared-prompt micro-batch carries block_ids/branch_ids and spans instead of a mask; attention is
    computed per segment from the spans (attn_implementation=dpo_ds_blocks, attention.py), or with a mask
    built here, a FlexAttention BlockMask (flex_attention) or dense (eager/sdpa).

    An MoE model's wrapper built with router=True also returns the router's load-balancing loss and the
    expert load of the micro-batch (model/router.py): (logps, counts, aux, load). With wpo=True it returns
    WPO's per-sequence sums of log p - log sum_v p_v^2 last (SequenceLogps.aligned). `fields` names the
    outputs in order.
    """

    def __init__(
        self,
        lm: nn.Module,
        logprob_impl: str = "chunked",
        sequence_parallel=None,
        router=False,
        ld_alpha=None,
        wpo=False,
    ):
        super().__init__()
        self.ld_alpha = ld_alpha  # LD-DPO (length_weights): None, every token counts once
        self.wpo = wpo  # WPO: the policy's per-token log sum_v p_v^2 too (logprobs.token_logprobs with_sq)
        self.lm = lm
        self.logprob_impl = logprob_impl
        # engine.sequence_parallel.SequenceParallel (its group and gradient scale), or None: under sequence parallelism
        # this rank scores the tokens of its piece of each row, and the sums are summed over the group
        self.sp = sequence_parallel
        self.restricted_head = _restricted_head_ok(lm.config)
        self.attn = getattr(lm.config, "_attn_implementation", None)  # the layout's rule: attention.py
        self.routing = Routing.of(lm.config) if router else None
        self.fields = (
            ("logps", "counts") + (("aux", "load") if self.routing else ()) + (("aligned",) if wpo else ())
        )
        if self.routing is not None and not self.restricted_head:
            raise ModelError(
                f"{type(lm.config).__name__}: an MoE model that post-processes its logits; dpo_ds cannot take "
                "its router logits from the full forward: set loss.router_aux_coef=0"
            )
        if logprob_impl == "fused_linear":
            if not self.restricted_head:
                raise ModelError(
                    "model.logprob_impl=fused_linear: this model post-processes its logits (soft-capping or "
                    "a logit scale), which the fused head does not apply; use chunked"
                )
            _fuse_head(lm.get_output_embeddings())

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        block_ids,
        branch_ids,
        spans,
        target_pos,
        target_ids,
        target_seq,
        n_seqs,
        token_weights=None,
    ):
        attention_mask, extra = attention_inputs(
            self.attn, attention_mask, block_ids, branch_ids, spans, self.dtype, input_ids.device
        )
        if self.routing is not None:
            extra["output_router_logits"] = True
        per_token, sq, router_logits = self.scored_logps(
            input_ids, attention_mask, position_ids, target_pos, target_ids, **extra
        )
        outputs = ()
        if sq is not None:  # WPO (Zhou et al. 2024, Eq. 2): log p - log sum_v p_v^2 summed per sequence
            aligned = per_token.new_zeros(n_seqs).index_add(0, target_seq, per_token.detach() - sq)
            if self.sp is not None:
                torch.distributed.all_reduce(aligned, group=self.sp.group)
            outputs = (aligned,)
        if self.ld_alpha is not None:  # LD-DPO: the longer response's surplus tokens weigh ld_alpha
            group = self.sp.group if self.sp is not None else None
            weights = length_weights(target_seq, target_pos, n_seqs, self.ld_alpha, group, per_token.dtype)
            per_token = per_token * weights
        logps, counts = reduce_sequences(per_token, target_seq, n_seqs)  # per_token: (M,)
        if self.sp is not None:
            logps = SumOverGroup.apply(logps, self.sp.group, self.sp.grad_scale)
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=self.sp.group)
        if self.routing is not None:
            return (logps, counts, *self.router_loss(router_logits, token_weights), *outputs)
        return (logps, counts, *outputs)

    def router_loss(self, router_logits, token_weights) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, load): the load-balancing loss of the micro-batch and its expert load (model/router.py);
        under sequence parallelism the sums are the group's, so every rank of it holds the same loss."""
        load, probs, total = balance_sums(router_logits, token_weights, self.routing)
        if self.sp is not None:
            probs = SumOverGroup.apply(probs, self.sp.group, self.sp.grad_scale)
            load, total = load.clone(), total.detach().clone()
            torch.distributed.all_reduce(load, group=self.sp.group)
            torch.distributed.all_reduce(total, group=self.sp.group)
        return balance_loss(load, probs, total, self.routing), load

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def scored_logps(
        self, input_ids, attention_mask, position_ids, target_pos, target_ids, **extra
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
        """log p(target_ids) (M,) in fp32, each from the hidden state at its target_pos; log sum_v p_v^2 (M,)
        when self.wpo, else None; and the router logits per MoE layer when extra asks for them
        (output_router_logits), else None."""
        # use_cache=False: with packed rows (restarting position_ids, no mask) a cache makes the model
        # attend across segments silently.
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        if self.restricted_head:
            decoder = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
            out = decoder(**kwargs)
            hidden = out.last_hidden_state  # (rows, T, H)
            router_logits = getattr(out, "router_logits", None)
            hidden = hidden.reshape(-1, hidden.shape[-1])[target_pos]  # (M, H) only where a token is scored
            head = self.lm.get_output_embeddings()
            if self.logprob_impl == "fused_linear":  # the fused head: no (M, V) logits
                return (*_pair(head(hidden, target_ids, with_sq=self.wpo)), router_logits)
            logits = head(hidden)  # (M, V)
        else:
            logits, router_logits = self.lm(**kwargs).logits, None  # (rows, T, V)
            logits = logits.reshape(-1, logits.shape[-1])[target_pos]
        out = token_logprobs(logits, target_ids, impl=self.logprob_impl, with_sq=self.wpo)
        return (*_pair(out), router_logits)


def _pair(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p, log sum p^2 or None) in fp32 from a log-prob call with or without with_sq."""
    logp, sq = out if isinstance(out, tuple) else (out, None)
    return logp.float(), sq
