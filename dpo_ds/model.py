"""Model directories, tokenizers and the log-prob wrapper that both engines run.

No deepspeed here: engines.py decides how a model is built (zero.Init or not) and wrapped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dpo_ds.data.tokenize import IGNORE
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


def has_weights(model_dir: Path) -> bool:
    return any(any(model_dir.glob(p)) for p in WEIGHT_PATTERNS)


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


class LogprobLM(nn.Module):
    """Wraps a HF causal LM; forward returns per-token log p(label) of shape (rows, T-1).

    Position t scores labels[:, t + 1]; ignored labels give 0. The lm_head runs only at positions
    whose label is not ignored, so prompt and padding positions never produce logits (for DPO data
    prompts are often half the tokens, and the (tokens, vocab) logits are the biggest activation).
    """

    def __init__(self, lm: nn.Module, logprob_impl: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.logprob_impl = logprob_impl
        self.restricted_head = _restricted_head_ok(lm.config)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        target = labels[:, 1:]  # (rows, T-1)
        keep = target != IGNORE
        # use_cache=False: with packed rows (restarting position_ids, no mask) a cache makes the model
        # attend across segments silently.
        kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        if self.restricted_head:
            decoder = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
            hidden = decoder(**kwargs).last_hidden_state[:, :-1]  # (rows, T-1, H)
            logits = self.lm.get_output_embeddings()(hidden[keep])  # (M, V), M = labelled positions
            per_token = token_logprobs(logits, target[keep], impl=self.logprob_impl)  # (M,)
        else:
            logits = self.lm(**kwargs).logits[:, :-1]  # (rows, T-1, V)
            per_token = token_logprobs(logits[keep], target[keep], impl=self.logprob_impl)
        out = per_token.new_zeros(target.shape)
        out[keep] = per_token
        return out
