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

from dpo_ds.config.schema import F_DIVERGENCES

Tensor = torch.Tensor


def f_scores(logratio: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """f-DPO (Wang et al. 2024, "Beyond Reverse KL", Thm. 1): DPO under an f-divergence regulariser compares
    f'(pi / pi_ref) of the two responses instead of log(pi / pi_ref). With u = log(pi / pi_ref):

        reverse_kl        f'(t) = log t + 1           -> u (the constant cancels in a difference: DPO)
        forward_kl        f'(t) = 1 - 1 / t           -> 1 - exp(-u)
        js_divergence     f'(t) = log(2 t / (1 + t))  -> log 2 + log sigma(u)
        alpha_divergence  f'(t) = (t^(a-1) - 1)/(a-1) -> (exp((a - 1) u) - 1) / (a - 1); a -> 1 is reverse KL

    The exponent is clamped at 80 (exp(80) ~ 5.5e34, finite in float32), as TRL 1.16 does in float32."""
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratio
        return (torch.exp(((f_alpha - 1.0) * logratio).clamp(max=80.0)) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"unknown f-divergence {f_divergence!r}: one of {F_DIVERGENCES}")


def _margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, f_divergence: str, f_alpha: float) -> Tensor:
    """h = f'(chosen ratio) - f'(rejected ratio): DPO's log-ratio margin under reverse KL, (pairs,)."""
    return f_scores(pc - rc, f_divergence, f_alpha) - f_scores(pr - rr, f_divergence, f_alpha)


def _mean_margin(pc, pr, rc, rr, chosen_tokens, rejected_tokens, f_divergence, f_alpha) -> Tensor:
    """Per-token mean log-ratio margin: f'(ratio(y_w)) / |y_w| - f'(ratio(y_l)) / |y_l|, (pairs,)."""
    chosen = f_scores(pc - rc, f_divergence, f_alpha) / chosen_tokens.clamp(min=1)
    return chosen - f_scores(pr - rr, f_divergence, f_alpha) / rejected_tokens.clamp(min=1)


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
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7); with label_smoothing > 0 it is conservative DPO (cDPO); under
    another f-divergence, f-DPO (f_scores).

    h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))
    loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    """
    h = _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)  # (pairs,)
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
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, Eq. 17): loss = (h - 1 / (2 tau))^2 with tau = beta."""
    if label_smoothing:
        raise ValueError("IPO has no label smoothing; pass label_smoothing=0")
    h = _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)  # (pairs,)
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
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO with per-token mean log-ratios (`loss.ipo_normalize=length`), TRL's DPOTrainer convention.

    The paper (Azar et al. 2023) forms h from whole-sequence log-probs, as ipo_loss does; TRL divides each
    sequence's log-ratio by its response length first, so that tau does not have to shrink with length:
    h = (log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|.
    Rewards stay DPO's (summed), as TRL logs them.
    """
    h = _mean_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                     f_divergence, f_alpha)  # fmt: skip
    losses = (h - 1 / (2 * beta)) ** 2  # IPO (Azar et al. 2023, Eq. 17) on the length-normalised h
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the log-ratio margin: SLiC-HF's calibration loss (Zhao et al. 2023) with the reference
    log-ratio subtracted, i.e. RSO's "hinge-norm" (Liu et al. 2024, Sec. 3); 1 / beta is the margin.

    h as in DPO; loss = max(0, 1 - beta h). Pairs already past the margin give no gradient.
    """
    h = _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)  # (pairs,)
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
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
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
    h = _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)  # (pairs,)
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


def dpo_norm_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO: DPO's Eq. 7 on per-token mean log-ratios (Tulu 3, Lambert et al. 2024, Sec. 5.4:
    open-instruct's dpo_norm; TRL's sigmoid_norm), so that a long response is not rewarded for its length.

    h = (log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|
    loss = -log sigma(beta h). The per-token h is small, so beta is large (Tulu 3 uses 5). Rewards stay
    DPO's summed beta log-ratios, as TRL logs them."""
    h = _mean_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                     f_divergence, f_alpha)  # fmt: skip
    return (
        -F.logsigmoid(beta * h),
        *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected),
    )


def exo_pair_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16,
    K = 2): the reverse KL from the model's preference distribution q = softmax(beta r) over the pair to the
    labels' p = (1 - eps, eps), eps = label_smoothing > 0 (it is log eps):

    loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),  q_w = sigma(beta h), q_l = sigma(-beta h)."""
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"EXO needs 0 < label_smoothing < 0.5 (log eps is taken), got {label_smoothing}")
    z = beta * _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def nca_pair_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", Eq. 12 for a pair): each response's reward on
    its own scale, so the chosen likelihood is pushed up, not only the margin:

    loss = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),  r = beta (log pi - log pi_ref)."""
    win, lose = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(win) - 0.5 * F.logsigmoid(-win) - 0.5 * F.logsigmoid(-lose)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def bco_pair_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", Eq. 7 without its running-mean shift
    delta, as TRL 1.16's bco_pair): each response classified on its own reward,
    loss = -log sigma(r_w) - log sigma(-r_l)."""
    win, lose = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(win) - F.logsigmoid(-lose)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def sppo_hard_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7 with P = 1 for the
    winner and 0 for the loser): each log-ratio regressed to +-1 / (2 beta),
    loss = (log pi/pi_ref(y_w) - 1/(2 beta))^2 + (log pi/pi_ref(y_l) + 1/(2 beta))^2."""
    win, lose = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = (win - 0.5 / beta) ** 2 + (lose + 0.5 / beta) ** 2
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def aot_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", paired
    form): the policy's log-ratio margins pi(y_w)/pi(y_l) and the reference's, each SORTED over the micro-batch,
    compared quantile by quantile: a constraint of first-order stochastic dominance, not a per-pair one.
    Depends on the whole micro-batch (this rank's: TRL's batch is one device's micro-batch too).
    loss_i = smoothed -log sigma(beta (sort(pc - pr)_i - sort(rc - rr)_i)), i the i-th quantile."""
    delta = torch.sort(policy_chosen - policy_rejected).values - torch.sort(ref_chosen - ref_rejected).values
    losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def aot_unpaired_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """AOT unpaired (Melnyk et al. 2024): the chosen log-ratios' distribution over the micro-batch must dominate
    the rejected ones': sorted chosen log-ratios against sorted rejected ones, quantile by quantile (the pairs
    need not match). loss_i = smoothed -log sigma(beta (sort(pc - rc)_i - sort(pr - rr)_i))."""
    delta = torch.sort(policy_chosen - ref_chosen).values - torch.sort(policy_rejected - ref_rejected).values
    losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def discopop_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float,
    discopop_tau: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for LLMs", Eq. 5,
    the log-ratio modulated loss): a blend of DPO's logistic loss and an exponential one, mixed by
    sigma(beta h / tau): loss = (1 - s) (-log sigma(beta h)) + s exp(-beta h), s = sigma(beta h / tau)."""
    z = beta * _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, f_divergence, f_alpha)
    s = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - s) + torch.exp(-z) * s
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


def wpo_weights(
    chosen_aligned: Tensor, rejected_aligned: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor
) -> Tensor:
    """WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2 with TRL's
    use_weighting normalisation): each pair's weight, the product of its two responses' weights,
    w(y) = exp(mean over y's tokens of log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2),
    a per-token probability relative to the policy's own sampling distribution: near-on-policy pairs weigh
    more. `*_aligned`: per response, the sum over its tokens of log p - log sum_v p_v^2 (model.lm's
    SequenceLogps.aligned). No gradient flows through the weights. (pairs,)"""
    with torch.no_grad():
        chosen = torch.exp(chosen_aligned / chosen_tokens.clamp(min=1))
        rejected = torch.exp(rejected_aligned / rejected_tokens.clamp(min=1))
        return chosen * rejected
