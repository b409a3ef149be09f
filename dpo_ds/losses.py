"""Preference losses as pure functions of per-sequence log-probs.

Every preference loss takes four tensors of shape (pairs,) -- the summed log-probs of the chosen and
rejected responses under the policy and under the reference -- and returns
(losses, chosen_rewards, rejected_rewards), each of shape (pairs,). No config reads, no distributed
calls: objectives.py picks a function by name (PREFERENCE_LOSSES) and owns its hyperparameters.

Reference-free DPO (`loss.reference_free=true`) is the same function called with zeros for the
reference log-probs: log pi_ref is then a constant for every response, so it cancels (and
the rewards are beta * log pi).
"""

from __future__ import annotations

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


def sft_loss(policy_logps: Tensor) -> Tensor:
    """Masked NLL per sequence: -sum_t log pi(y_t | x, y_<t) over response tokens, shape (seqs,).

    Summed, not averaged, over tokens as in the original SFT trainer (average_log_prob=False).
    """
    return -policy_logps


def chosen_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token NLL of the chosen response, shape (pairs,): the extra term of RPO (Pang et al. 2024,
    Eq. 3 uses -log pi(y_w|x) / |y_w|), added to a preference loss with weight loss.chosen_nll_weight."""
    return -policy_chosen / chosen_tokens.clamp(min=1)
