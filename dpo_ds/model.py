"""Model directories, tokenizers and the log-prob wrapper that both engines run.

No deepspeed here: engines.py decides how a model is built (zero.Init or not) and wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dpo_ds.attention import attention_inputs
from dpo_ds.logprobs import token_logprobs

PACKAGE = Path(__file__).resolve().parent
# Model directories that ship with the package: standard HF directories (config.json + tokenizer
# files) without weights; weights are initialised from the config with the run's seed.
SHIPPED_MODELS = {"demo": PACKAGE / "demo" / "model", "tiny": PACKAGE / "demo" / "tiny"}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model directory or archive that cannot be used; the message names the path or key."""


def resolve_model_dir(name_or_path: str) -> Path:
    if name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path]
    path = Path(name_or_path)
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path={name_or_path!r} is not a directory; dpo_ds loads local Hugging Face "
            f"model directories (download with `huggingface-cli download` first) or one of {sorted(SHIPPED_MODELS)}"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path={name_or_path!r}: {path / 'config.json'} is missing")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({f for p in WEIGHT_PATTERNS for f in model_dir.glob(p)})


def has_weights(model_dir: Path) -> bool:
    return bool(weight_files(model_dir))


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def missing_shards(model_dir: Path) -> list[str]:
    """Shard files a weight index names that are not in the directory (an interrupted download)."""
    import json

    missing = []
    for name in WEIGHT_INDEXES:
        index = model_dir / name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(
                f"{index}: not a weight index with a 'weight_map' ({type(e).__name__}: {e})"
            ) from None
        missing += [s for s in shards if not (model_dir / s).is_file()]
    return missing


def start_from_weights(model_dir: Path, init: str, archive: str | None) -> bool:
    """Whether the models load the directory's own weights (else the archive's, or a seeded init).

    Training from random weights must be asked for (model.init=random), or be one of the shipped
    demo configs, which are seeded by design: a directory with config.json and a tokenizer but no
    weights (an interrupted download) would otherwise train from noise without a word."""
    if archive is not None or init == "random":
        return False
    if model_dir in SHIPPED_MODELS.values():
        return False  # demo / tiny: configs without weights, initialised from the seed
    missing = missing_shards(model_dir)
    if missing:
        raise ModelError(
            f"model.name_or_path={model_dir}: its weight index names {len(missing)} shard(s) that are not there: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; finish the download"
        )
    if not has_weights(model_dir):
        raise ModelError(
            f"model.name_or_path={model_dir} holds no weights (no {', '.join(WEIGHT_PATTERNS)}): an "
            f"interrupted download? Fetch them, give model.archive=..., or set model.init=random to train "
            f"from a random initialisation on purpose"
        )
    return True


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer in {model_dir} has no eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, any id will do
    return tok


def load_config(model_dir: Path):
    """The HF config with every dropout set to 0: DPO compares log-probs of two models, and
    dropout would make even policy == reference disagree."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def random_init_state(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """Full fp32 state of a freshly initialised model, identical on every rank for a seed.

    Built outside any zero.Init on CPU so policy and reference (and every rank) get the same numbers.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_config(model_dir), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    (grad_scale 1); engines sets the scale from how its ZeRO stage averages gradients over the ranks."""

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
    from dpo_ds.logprobs.fused_linear import fused_linear_logprobs

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
        # engines.SequenceParallel (its group and gradient scale), or None: under sequence parallelism
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
