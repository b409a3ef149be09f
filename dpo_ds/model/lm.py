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


def sequence_logps(engine, batch) -> SequenceLogps:
    """Run a LogprobLM (or the DeepSpeed engine around one) on a micro-batch (data.layout.MicroBatch)."""
    return SequenceLogps(*engine(**batch.model_inputs()))


def _fuse_head(head: nn.Module) -> None:
    """Let the lm_head answer head(hidden, labels) with per-token log-probs computed in chunks from
    its weight (logprobs/fused_linear.py), and head(hidden) with logits as before (generation).

    The computation runs inside the head module's own call, so DeepSpeed ZeRO-3 gathers the weight
    for it in forward and again in backward exactly as for a plain Linear; the weight is never
    gathered or copied by hand, and tied embeddings stay one tensor."""
    from dpo_ds.model.logprobs.fused_linear import fused_linear_logprobs

    plain = head.forward

    def forward(hidden, labels=None):
        if labels is None:
            return plain(hidden)
        return fused_linear_logprobs(hidden, head.weight, labels, bias=getattr(head, "bias", None))

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
    """

    def __init__(self, lm: nn.Module, logprob_impl: str = "chunked", sequence_parallel=None):
        super().__init__()
        self.lm = lm
        self.logprob_impl = logprob_impl
        # engine.sequence_parallel.SequenceParallel (its group and gradient scale), or None: under sequence parallelism
        # this rank scores the tokens of its piece of each row, and the sums are summed over the group
        self.sp = sequence_parallel
        self.restricted_head = _restricted_head_ok(lm.config)
        self.attn = getattr(lm.config, "_attn_implementation", None)  # the layout's rule: attention.py
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
    ):
        attention_mask, extra = attention_inputs(
            self.attn, attention_mask, block_ids, branch_ids, spans, self.dtype, input_ids.device
        )
        per_token = self.scored_logps(
            input_ids, attention_mask, position_ids, target_pos, target_ids, **extra
        )
        logps, counts = reduce_sequences(per_token, target_seq, n_seqs)  # per_token: (M,)
        if self.sp is not None:
            logps = SumOverGroup.apply(logps, self.sp.group, self.sp.grad_scale)
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=self.sp.group)
        return logps, counts

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def scored_logps(
        self, input_ids, attention_mask, position_ids, target_pos, target_ids, **extra
    ) -> torch.Tensor:
        """log p(target_ids) (M,) in fp32, each from the hidden state at its target_pos."""
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
            hidden = decoder(**kwargs).last_hidden_state  # (rows, T, H)
            hidden = hidden.reshape(-1, hidden.shape[-1])[target_pos]  # (M, H) only where a token is scored
            head = self.lm.get_output_embeddings()
            if self.logprob_impl == "fused_linear":
                return head(hidden, target_ids).float()  # (M,) the fused head: no (M, V) logits
            logits = head(hidden)  # (M, V)
        else:
            logits = self.lm(**kwargs).logits  # (rows, T, V)
            logits = logits.reshape(-1, logits.shape[-1])[target_pos]
        return token_logprobs(logits, target_ids, impl=self.logprob_impl).float()  # (M,)
