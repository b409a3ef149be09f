"""The training objective, chosen once from the config.

An objective owns its hyperparameters and says what it needs (`needs_reference`, and `pairs`:
preference pairs or single SFT targets from the data); the trainer
hands it the policy's per-sequence log-probs and, when it asked for them, the reference's, and gets
back per-example losses and statistics. Adding a preference loss is adding a pure function to
losses.py and an entry to PREFERENCE_LOSSES; nothing in the trainer changes.

Per-example losses are summed over a rank's examples and divided by the number of examples in the
step on that rank; DeepSpeed then averages the ranks (which see equal numbers of examples), so a
loss reported or optimised is a mean over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dpo_ds.losses import chosen_nll, dpo_loss, ipo_loss, sft_loss
from dpo_ds.model import SequenceLogps, split_pairs

if TYPE_CHECKING:
    from dpo_ds.config import Config

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """A preference loss: fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, label_smoothing)
    -> (losses, chosen_rewards, rejected_rewards), each (pairs,). `reference`: whether it compares
    against a reference model at all (False: no reference is built, whatever the config says)."""

    fn: Callable
    reference: bool = True
    label_smoothing: bool = False  # accepts loss.label_smoothing (else it must be 0)


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, label_smoothing=True),  # with label_smoothing > 0: conservative DPO
    "ipo": LossSpec(ipo_loss),
}
OBJECTIVES = ("sft", *PREFERENCE_LOSSES)


class PreferenceObjective:
    """A preference loss over (chosen, rejected) pairs, plus the optional RPO term."""

    pairs = True  # trains on preference pairs (SFT: on single targets)

    def __init__(
        self, spec: LossSpec, *, beta: float, label_smoothing: float, reference_free: bool, nll_weight: float
    ):
        self.spec = spec
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.nll_weight = nll_weight
        # reference-free DPO: the implicit reference is uniform over responses, so log pi_ref is one
        # constant for every response and cancels; zeros stand in for it and no model is built
        self.needs_reference = spec.reference and not reference_free

    def __call__(self, policy: SequenceLogps, reference: Tensor | None, batch: dict) -> tuple[Tensor, dict]:
        pc, pr = policy.chosen, policy.rejected  # (pairs,)
        rc, rr = (
            split_pairs(reference) if reference is not None else (torch.zeros_like(pc), torch.zeros_like(pr))
        )
        losses, chosen_rewards, rejected_rewards = self.spec.fn(
            pc, pr, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing
        )
        if self.nll_weight:  # RPO (Pang et al. 2024, Eq. 3): + alpha * NLL(chosen) / |y_w|
            losses = losses + self.nll_weight * chosen_nll(pc, policy.chosen_counts)
        stats = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
            "logps/ref_chosen": rc,
            "logps/ref_rejected": rr,
        }
        return losses, stats


class SFTObjective:
    """Masked NLL of each target sequence; normalised per sequence (the original) or per token."""

    needs_reference = False
    pairs = False

    def __init__(self, normalize: str):
        self.normalize = normalize

    def __call__(self, policy: SequenceLogps, reference: Tensor | None, batch: dict) -> tuple[Tensor, dict]:
        losses = sft_loss(policy.logps)  # (seqs,) summed NLL per sequence, as in the original
        if self.normalize == "token":
            # every trained-on token of the global batch weighs the same: the trainer averages over
            # examples, so examples / tokens turns that mean into a per-token mean
            losses = losses * (batch["global_examples"] / max(batch["global_tokens"], 1))
        return losses, {"logps/chosen": policy.logps.detach()}


def build_objective(cfg: Config):
    """The one place the training mode is decided."""
    loss = cfg.loss
    if loss.name == "sft":
        return SFTObjective(loss.sft_normalize)
    return PreferenceObjective(
        PREFERENCE_LOSSES[loss.name],
        beta=loss.beta,
        label_smoothing=loss.label_smoothing,
        reference_free=loss.reference_free,
        nll_weight=loss.chosen_nll_weight,
    )
