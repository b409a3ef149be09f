"""dpo_ds defaults that differ from TRL's on purpose (dpo_ds follows the original DPO code): the notes the
launch log prints when a run uses them, and the figures of the docs' table (trl_names.render_markdown)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .schema import Config
from .shipped import DEFAULT_DS, DS_CONFIGS

ORIGINAL = "the original DPO code's"


@dataclass(frozen=True)
class DefaultNote:
    """A dpo_ds default that differs from TRL's on purpose."""

    key: str  # the dpo_ds key
    trl: str  # what TRL calls it
    trl_default: object  # TRL's default (for a field of DPOConfig: the field's default, or what None means)
    why: str
    applies: Callable[[Config], bool] = lambda cfg: True  # whether the run uses the key at all


DEFAULT_NOTES = (
    DefaultNote("lr", "learning_rate", 1e-6, ORIGINAL),
    DefaultNote("warmup_steps", "warmup_steps", 0, f"{ORIGINAL}: linear warmup, then lr held"),
    DefaultNote("lr_schedule", "lr_scheduler_type", "linear", f"{ORIGINAL}: lr held after the warmup"),
    DefaultNote("max_grad_norm", "max_grad_norm", 1.0, ORIGINAL),
    DefaultNote("n_epochs", "num_train_epochs", 3.0, ORIGINAL),
    DefaultNote("max_length", "max_length", 1024, f"{ORIGINAL}, with max_prompt_length 256"),
    DefaultNote("model.policy_dtype", "bf16", True, f"{ORIGINAL}; bfloat16 halves the memory of weights"),
    DefaultNote("model.gradient_checkpointing", "gradient_checkpointing", True, "no recomputation, as the "
                "original DPO code; turn it on when activations do not fit"),
    DefaultNote("do_first_eval", "eval_on_start", False, ORIGINAL),
    DefaultNote("loss.ipo_normalize", "loss_type=ipo", "length", "the IPO paper's summed log-probs; "
                "loss.ipo_normalize=length is TRL's per-token form", lambda cfg: "ipo" in cfg.loss.names),
)  # fmt: skip
TRL_ADAM_BETAS = (0.9, 0.999)  # TrainingArguments' adam_beta1, adam_beta2


def get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def trl_default_notes(
    cfg: Config, set_keys: Collection[str] | None = None, optimizer_betas=None
) -> list[str]:
    """The defaults this run uses that differ from TRL's, one line each, for the launch log.

    A note is given for a key the user did not set (set_keys: the dotted keys set in the file or as overrides;
    None: every key still at its default counts as not set) that still holds dpo_ds's default, and that the run
    uses. optimizer_betas: the betas of a shipped DeepSpeed JSON this run uses, or None."""
    defaults = Config()
    notes = []
    for note in DEFAULT_NOTES:
        ours = get(cfg, note.key)
        if set_keys is not None and note.key in set_keys:
            continue
        if ours != get(defaults, note.key) or not note.applies(cfg):
            continue
        notes.append(f"{note.key}={fmt(ours)}, {note.why} (TRL's {note.trl}: {fmt(note.trl_default)})")
    if optimizer_betas is not None and tuple(optimizer_betas) != TRL_ADAM_BETAS:
        notes.append(
            f"optimizer betas {list(optimizer_betas)}, the shipped DeepSpeed JSON's (TRL's adam_beta1, adam_beta2: "
            f"{', '.join(fmt(b) for b in TRL_ADAM_BETAS)})"
        )
    return notes


def shipped_betas() -> list[float] | None:
    """The optimizer betas of the default shipped DeepSpeed JSON, or None when it names none."""
    ds = json.loads((DS_CONFIGS / f"{DEFAULT_DS}.json").read_text())
    return ds.get("optimizer", {}).get("params", {}).get("betas")
