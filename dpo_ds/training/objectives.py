"""The training objective, chosen once from the config.

An objective owns its hyperparameters and says what it needs (`needs_reference`, and `pairs`:
preference pairs or single SFT targets from the data); the trainer
hands it the policy's per-sequence log-probs and, when it asked for them, the reference's, and gets
back per-example losses and statistics. Adding a preference loss is adding a pure function to
losses.py and an entry to PREFERENCE_LOSSES (a LossSpec saying what it needs); nothing in the trainer
changes. `loss=[dpo,sft] loss.weights=[1,0.2]` is a weighted sum of losses (see build_objective).

Per-example losses are summed over a rank's examples and divided by the number of examples in the
step on that rank; DeepSpeed then averages the ranks (which see equal numbers of examples), so a
loss reported or optimised is a mean over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dpo_ds.config import ConfigError
from dpo_ds.model.lm import SequenceLogps, split_pairs
from dpo_ds.training.losses import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    chosen_nll,
    discopop_loss,
    dpo_loss,
    dpo_norm_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_length_normalized_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    sft_loss,
    simpo_loss,
    sppo_hard_loss,
    wpo_weights,
)

if TYPE_CHECKING:
    from dpo_ds.config import Config, LossConfig
    from dpo_ds.data.layout import MicroBatch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """A preference loss and what it needs: fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
    *, <hparams>, [chosen_tokens, rejected_tokens]) -> (losses, chosen_rewards, rejected_rewards), each
    (pairs,). `reference`: whether it compares against a reference model at all (False: none is built,
    whatever the config says). `counts`: whether it takes the response token counts. `hparams`: the
    keyword hyperparameters it takes, each named as its loss.* key (one of HPARAMS); a loss is passed
    exactly these, and config validation rejects a non-zero loss.label_smoothing for a loss without it."""

    fn: Callable
    reference: bool = True
    counts: bool = False
    hparams: tuple[str, ...] = ("beta",)
    needs_smoothing: bool = False  # label_smoothing must be > 0 (EXO takes its log)

    def check(self, name: str, loss: LossConfig) -> None:
        """A hyperparameter that is off unless set (OFF_UNLESS_SET) and that this loss does not define
        must be left off: loss=ipo loss.label_smoothing=0.1 would otherwise train plain IPO silently."""
        for key, off in OFF_UNLESS_SET.items():
            if key not in self.hparams and getattr(loss, key) != off:
                raise ConfigError(
                    f"config key 'loss.{key}': is not defined for loss={name}; must be {off}, got {getattr(loss, key)!r}"
                )
        if self.needs_smoothing and not loss.label_smoothing > 0:
            raise ConfigError(
                f"config key 'loss.label_smoothing': loss={name} needs it in (0, 0.5) (its labels' probability "
                f"of a flip, whose log it takes; TRL's docs use 1e-3), got {loss.label_smoothing!r}"
            )


# loss.* keys a LossSpec may name
HPARAMS = ("beta", "label_smoothing", "gamma", "orpo_lambda", "discopop_tau", "f_divergence", "f_alpha")
# their value when not set, which leaves them out: a loss that does not define one must keep it so
OFF_UNLESS_SET = {"label_smoothing": 0.0, "f_divergence": "reverse_kl", "discopop_tau": 0.05}
F_DIV = ("f_divergence", "f_alpha")  # f-DPO's regulariser (losses.f_scores), for the losses of a margin h
PREFERENCE_LOSSES: dict[str, LossSpec] = {
    # label_smoothing > 0: conservative DPO
    "dpo": LossSpec(dpo_loss, hparams=("beta", "label_smoothing", *F_DIV)),
    # summed log-probs as the paper; loss.ipo_normalize=length: TRL's form
    "ipo": LossSpec(ipo_loss, hparams=("beta", *F_DIV)),
    "hinge": LossSpec(hinge_loss, hparams=("beta", *F_DIV)),
    "robust": LossSpec(
        robust_loss, hparams=("beta", "label_smoothing", *F_DIV)
    ),  # label_smoothing is its eps
    "apo_zero": LossSpec(apo_zero_loss),
    "apo_down": LossSpec(apo_down_loss),
    "simpo": LossSpec(simpo_loss, reference=False, counts=True, hparams=("beta", "gamma")),
    "orpo": LossSpec(orpo_loss, reference=False, counts=True, hparams=("orpo_lambda",)),
    # per-token mean log-ratios (Tulu 3's default); sigmoid_norm is TRL's name for it
    "dpo_norm": LossSpec(dpo_norm_loss, counts=True, hparams=("beta", *F_DIV)),
    "exo_pair": LossSpec(exo_pair_loss, hparams=("beta", "label_smoothing", *F_DIV), needs_smoothing=True),
    "nca_pair": LossSpec(nca_pair_loss),
    "bco_pair": LossSpec(bco_pair_loss),
    "sppo_hard": LossSpec(sppo_hard_loss),
    # sorted over the micro-batch: each depends on the whole micro-batch of its rank
    "aot": LossSpec(aot_loss, hparams=("beta", "label_smoothing")),
    "aot_unpaired": LossSpec(aot_unpaired_loss, hparams=("beta", "label_smoothing")),
    "discopop": LossSpec(discopop_loss, hparams=("beta", "discopop_tau", *F_DIV)),
}
LOSS_ALIASES = {"sigmoid_norm": "dpo_norm"}  # another framework's name, accepted as ours
PREFERENCE_LOSSES.update({alias: PREFERENCE_LOSSES[name] for alias, name in LOSS_ALIASES.items()})
# "ipo" under loss.ipo_normalize=length: per-token mean log-ratios, as TRL's DPOTrainer computes IPO
IPO_LENGTH_NORMALIZED = LossSpec(ipo_length_normalized_loss, counts=True, hparams=("beta", *F_DIV))
OBJECTIVES = ("sft", *PREFERENCE_LOSSES)


class PreferenceObjective:
    """A weighted sum of preference losses over (chosen, rejected) pairs, sum_i w_i loss_i, plus the
    optional RPO term nll_weight * NLL(chosen) / |y_w|. One term of weight 1 is a plain loss. `hparams`
    holds every HPARAMS value; each term gets the ones its LossSpec names (all terms share beta). wpo: the
    whole per-pair sum is multiplied by the pair's WPO weight (losses.wpo_weights), as TRL's use_weighting
    weighs every loss type; the policy's SequenceLogps must carry `aligned`."""

    pairs = True  # trains on preference pairs (SFT: on single targets)

    def __init__(
        self,
        terms: Sequence[tuple[LossSpec, float]],
        *,
        hparams: dict[str, float],
        reference_free: bool,
        nll_weight: float,
        wpo: bool = False,
    ):
        if not terms:
            raise ValueError("a preference objective needs at least one preference loss")
        self.terms = list(terms)
        self.hparams = hparams
        self.nll_weight = nll_weight
        self.wpo = wpo
        # a sum needs a reference iff one of its terms does. Reference-free DPO: the implicit reference
        # is uniform over responses, so log pi_ref is one constant for every response and cancels;
        # zeros stand in for it and no model is built
        self.needs_reference = any(spec.reference for spec, _ in self.terms) and not reference_free

    def __call__(
        self, policy: SequenceLogps, reference: Tensor | None, batch: MicroBatch
    ) -> tuple[Tensor, dict]:
        pc, pr = policy.chosen, policy.rejected  # (pairs,)
        rc, rr = (
            split_pairs(reference) if reference is not None else (torch.zeros_like(pc), torch.zeros_like(pr))
        )
        chosen_tokens, rejected_tokens = split_pairs(policy.counts)  # (pairs,) response token counts
        losses, rewards = 0.0, None
        for spec, weight in self.terms:
            kwargs = {name: self.hparams[name] for name in spec.hparams}
            if spec.counts:
                kwargs.update(chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
            term, *term_rewards = spec.fn(pc, pr, rc, rr, **kwargs)
            losses = losses + weight * term  # (pairs,)
            if rewards is None:  # the reward statistics follow the first preference term
                rewards = term_rewards
        chosen_rewards, rejected_rewards = rewards
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
        if self.wpo:  # WPO (losses.wpo_weights): near-on-policy pairs weigh more
            if policy.aligned is None:
                raise ValueError("loss.wpo needs the policy's log sum p^2: build its LogprobLM with wpo=True")
            weights = wpo_weights(*split_pairs(policy.aligned), chosen_tokens, rejected_tokens)
            losses = losses * weights
            stats["wpo_weights"] = weights
        if reference is not None:
            stats.update(shift_stats(policy, reference))
        return losses, stats


def shift_stats(policy: SequenceLogps, reference: Tensor) -> dict[str, Tensor]:
    """Likelihood displacement (guards.py): how far each response's per-token log-prob moved from the
    reference's; DPO can push the chosen down while the margin grows. (pairs,) each."""
    rc, rr = split_pairs(reference)
    chosen_tokens, rejected_tokens = split_pairs(policy.counts)
    return {
        "logps/chosen_shift_per_token": (policy.chosen.detach() - rc) / chosen_tokens.clamp(min=1),
        "logps/rejected_shift_per_token": (policy.rejected.detach() - rr) / rejected_tokens.clamp(min=1),
    }


class SFTObjective:
    """Masked NLL of each target sequence; normalised per sequence (the original) or per token."""

    needs_reference = False
    pairs = False

    def __init__(self, normalize: str):
        self.normalize = normalize

    def __call__(
        self, policy: SequenceLogps, reference: Tensor | None, batch: MicroBatch
    ) -> tuple[Tensor, dict]:
        losses = sft_loss(policy.logps)  # (seqs,) summed NLL per sequence, as in the original
        if self.normalize == "token":
            # every trained-on token of the global batch weighs the same: the trainer averages over
            # examples, so examples / tokens turns that mean into a per-token mean
            losses = losses * (batch.global_examples / max(batch.global_tokens, 1))
        return losses, {"logps/chosen": policy.logps.detach()}


class WithRouterLoss:
    """A Mixture-of-Experts policy's objective: the inner objective plus coef x the router's load-balancing
    loss of each micro-batch (model/router.py; the reference's router is never asked). Each example of a
    micro-batch carries coef x aux, so the step's mean over examples weighs a micro-batch's aux by its share of
    the step's examples: with equal micro-batches, the mean of their aux as TRL's gradient accumulation takes
    it. The logged loss stays the inner objective's (ln 2 at step 0 for DPO); aux_loss is logged beside it
    whatever coef is, 0 included."""

    def __init__(self, inner, coef: float):
        self.inner, self.coef = inner, coef
        self.needs_reference, self.pairs = inner.needs_reference, inner.pairs

    def __call__(
        self, policy: SequenceLogps, reference: Tensor | None, batch: MicroBatch
    ) -> tuple[Tensor, dict]:
        losses, stats = self.inner(policy, reference, batch)
        if policy.aux is None:
            raise ValueError(
                "an MoE objective needs the policy's router loss: build its LogprobLM with router=True"
            )
        stats = {"loss": losses.detach(), **stats, "aux_loss": policy.aux.detach().expand_as(losses)}
        return (losses + self.coef * policy.aux if self.coef else losses), stats


def with_router_loss(objective, coef: float | None):
    """The objective a run trains: with the router loss when the model has a router dpo_ds reproduces
    (coef from model.router.router_aux_coef: None for a dense model)."""
    return objective if coef is None else WithRouterLoss(objective, coef)


def build_objective(cfg: Config):
    """The one place the training mode is decided.

    `loss=sft` alone is SFT. Otherwise loss.names are summed with loss.weights (default all 1); an `sft`
    term inside such a sum is the per-token NLL of the chosen response, i.e. RPO's term, so
    `loss=[dpo,sft] loss.weights=[1,a]` is `loss=dpo loss.chosen_nll_weight=a`.
    """
    loss = cfg.loss
    names = loss.names
    check(loss)
    if names == ["sft"]:
        return SFTObjective(loss.sft_normalize)
    terms, nll_weight = [], loss.chosen_nll_weight
    for name, weight in zip(names, loss.weights or [1.0] * len(names), strict=True):
        if name == "sft":
            nll_weight += weight
        elif name == "ipo" and loss.ipo_normalize == "length":
            terms.append((IPO_LENGTH_NORMALIZED, weight))
        else:
            terms.append((PREFERENCE_LOSSES[name], weight))
    return PreferenceObjective(
        terms,
        hparams={name: getattr(loss, name) for name in HPARAMS},
        reference_free=loss.reference_free,
        nll_weight=nll_weight,
        wpo=loss.wpo,
    )


def check(loss: LossConfig) -> None:
    """The loss section against the losses that exist: every name one of OBJECTIVES, each preference
    loss's own rules (LossSpec.check), and reference_free only where some term has a reference. Run by
    build_objective, before any engine; the value checks any loss config must pass are config.validate's."""
    bad = [n for n in loss.names if n not in OBJECTIVES]
    if bad:
        raise ConfigError(
            f"config key 'loss.name': must be one of {OBJECTIVES} or a list of them like [dpo,sft], got {loss.name!r}"
        )
    specs = {n: PREFERENCE_LOSSES[n] for n in loss.names if n != "sft"}
    for n, spec in specs.items():
        spec.check(n, loss)
    if not specs:  # loss=sft alone defines none of them: loss=sft loss.label_smoothing=0.1 would pass unused
        LossSpec(fn=None, reference=False, hparams=()).check("sft", loss)
    if loss.reference_free and not any(spec.reference for spec in specs.values()):
        raise ConfigError(
            f"config key 'loss.reference_free': has no meaning for loss={loss.name}, which uses no reference, got True"
        )
