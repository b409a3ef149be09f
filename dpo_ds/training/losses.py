"""Preference losses as pure functions of per-sequence log-probs.

Every preference loss takes four tensors of shape (pairs,) -- the summed log-probs of the chosen and
rejected responses under the policy and under the reference -- and returns
(losses, chosen_rewards, rejected_rewards), each of shape (pairs,). No config reads, no distributed
calls: objectives.py picks a function by name (PREFERENCE_LOSSES) and owns its hyperparameters.

Reference-free DPO (`loss.reference_free=true`) is the same function called with zeros for the
reference log-probs: log pi_ref is then a constant for every response, so it cancels (and
the rewards are beta * log pi).

Every loss keeps the same four positional tensors; the losses defined without a reference (SimPO, ORPO)
ignore the last two, and objectives.LossSpec says so (no reference model is built for them). Losses
that normalise by length also take the response token counts, `chosen_tokens=` and `rejected_tokens=`
(pairs,), and use per-token mean log-probs log pi(y) / |y|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    # Implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x))  (DPO paper, Eq. 5), detached for logging.
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7); with label_smoothing > 0 it is conservative DPO (cDPO).

    h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (pairs,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, Eq. 17): loss = (h - 1 / (2 tau))^2 with tau = beta."""
    if label_smoothing:
        raise ValueError("IPO has no label smoothing; pass label_smoothing=0")
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (pairs,)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_length_normalized_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO with per-token mean log-ratios (`loss.ipo_normalize=length`), TRL's DPOTrainer convention.

    The paper (Azar et al. 2023) forms h from whole-sequence log-probs, as ipo_loss does; TRL divides each
    sequence's log-ratio by its response length first, so that tau does not have to shrink with length:
    h = (log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|.
    Rewards stay DPO's (summed), as TRL logs them.
    """
    h = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (policy_rejected - ref_rejected) / (
        rejected_tokens.clamp(min=1)
    )  # (pairs,)
    losses = (h - 1 / (2 * beta)) ** 2  # IPO (Azar et al. 2023, Eq. 17) on the length-normalised h
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the log-ratio margin: SLiC-HF's calibration loss (Zhao et al. 2023) with the reference
    log-ratio subtracted, i.e. RSO's "hinge-norm" (Liu et al. 2024, Sec. 3); 1 / beta is the margin.

    h as in DPO; loss = max(0, 1 - beta h). Pairs already past the margin give no gradient.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (pairs,)
    losses = torch.relu(1 - beta * h)  # RSO hinge-norm / SLiC-HF calibration: max(0, 1 - beta h)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def robust_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, rDPO (Chowdhury, Kini and Natarajan 2024, "Provably Robust DPO", Sec. 3).

    With eps = label_smoothing the assumed probability that a label was flipped:
    loss = ((1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))) / (1 - 2 eps),  eps < 0.5.
    Its expectation over random flips is the DPO loss on the clean labels: it is unbiased. cDPO
    (dpo_loss with label_smoothing) instead ADDS the flipped term, + eps (-log sigma(-beta h)), without the
    1 / (1 - 2 eps): the cross-entropy against smoothed labels, whose minimum sits at a finite margin.
    rDPO subtracts it, so its per-pair loss keeps falling (linearly, slope -eps beta / (1 - 2 eps)) as h
    grows. At eps = 0 both are DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (pairs,)
    # rDPO (Chowdhury et al. 2024): ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps), l(h) = -log sigma(beta h)
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def apo_zero_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7): for chosen answers
    better than the model's own. Anchored at zero: each log-ratio is pushed on its own, the chosen up and
    the rejected down, not only their difference.

    r_w = log pi(y_w) - log pi_ref(y_w), r_l likewise; loss = (1 - sigma(beta r_w)) + sigma(beta r_l)
    """
    r_w = policy_chosen - ref_chosen  # (pairs,)
    r_l = policy_rejected - ref_rejected
    losses = (1 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l)  # APO-zero, Eq. 7
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def apo_down_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): for chosen answers worse than the model's own. Both
    likelihoods go down, the rejected one further: the chosen log-ratio is pushed down, the margin up.

    loss = sigma(beta r_w) + (1 - sigma(beta (r_w - r_l)))
    """
    r_w = policy_chosen - ref_chosen  # (pairs,)
    r_l = policy_rejected - ref_rejected
    losses = torch.sigmoid(beta * r_w) + (1 - torch.sigmoid(beta * (r_w - r_l)))  # APO-down, Eq. 8
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    beta: float,
    gamma: float,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng, Xia and Chen 2024, Eq. 6): no reference (ref_* are ignored), length-normalised reward.

    r(y) = beta / |y| log pi(y)  (Eq. 4);  loss = -log sigma(r(y_w) - r(y_l) - gamma), gamma the target
    reward margin (TRL's `simpo_gamma`; not gamma / beta). The paper's beta is a few units (2 to 10) and its
    gamma of order 1; DPO's beta = 0.1 is far too small here. Rewards r(y_w), r(y_l), as TRL's CPOTrainer
    logs them.
    """
    chosen_reward = beta * policy_chosen / chosen_tokens.clamp(min=1)  # Eq. 4, (pairs,)
    rejected_reward = beta * policy_rejected / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)  # SimPO, Eq. 6
    return losses, chosen_reward.detach(), rejected_reward.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012): log(-expm1(x)) above -ln 2,
    log1p(-exp(x)) below. Each branch sees an input clamped to its own side, so the branch torch.where
    does not pick cannot send inf * 0 = nan into the gradient."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)  # x = 0 (p = 1) would give log 0
    cut = -math.log(2)
    near = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near, far)


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    orpo_lambda: float,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong, Lee and Thorne 2024): SFT and preference in one loss, no reference (ref_* are ignored).

    With P(y) = exp(log pi(y) / |y|) the per-token mean likelihood and odds(y) = P(y) / (1 - P(y)) (Eq. 4):
    loss = -log pi(y_w) / |y_w| + lambda * -log sigma(log odds(y_w) - log odds(y_l))  (Eq. 6, L_OR Eq. 7).
    The NLL term is the per-token mean NLL of each chosen response (TRL averages over all chosen tokens of
    the batch instead). Rewards: lambda * log pi(y) / |y|, as TRL's ORPOTrainer logs (its `beta` is lambda).
    """
    mean_chosen = policy_chosen / chosen_tokens.clamp(min=1)  # log P(y_w), (pairs,)
    mean_rejected = policy_rejected / rejected_tokens.clamp(min=1)
    # log odds(y) = log P - log(1 - P)  (Eq. 4), so log OR = log odds(y_w) - log odds(y_l)  (Eq. 5)
    log_odds_ratio = (mean_chosen - _log1mexp(mean_chosen)) - (mean_rejected - _log1mexp(mean_rejected))
    losses = chosen_nll(policy_chosen, chosen_tokens) - orpo_lambda * F.logsigmoid(log_odds_ratio)  # Eq. 6, 7
    return losses, (orpo_lambda * mean_chosen).detach(), (orpo_lambda * mean_rejected).detach()


def sft_loss(policy_logps: Tensor) -> Tensor:
    """Masked NLL per sequence: -sum_t log pi(y_t | x, y_<t) over response tokens, shape (seqs,).

    Summed, not averaged, over tokens as in the original SFT trainer (average_log_prob=False).
    """
    return -policy_logps


def chosen_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token NLL of the chosen response, shape (pairs,): the extra term of RPO (Pang et al. 2024,
    Eq. 3 uses -log pi(y_w|x) / |y_w|), added to a preference loss with weight loss.chosen_nll_weight."""
    return -policy_chosen / chosen_tokens.clamp(min=1)
