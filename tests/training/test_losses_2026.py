"""The preference losses added for what users run in 2026 (length-normalised DPO, EXO, NCA, BCO, SPPO, AOT,
DiscoPOP, f-DPO's divergences), each with its arithmetic written out by hand on two pairs, and their wiring:
aliases, what each needs, and the bad values refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ds.config import ConfigError, load_config
from dpo_ds.model.lm import SequenceLogps
from dpo_ds.training.losses import (
    aot_loss,
    aot_unpaired_loss,
    bco_pair_loss,
    discopop_loss,
    dpo_loss,
    dpo_norm_loss,
    exo_pair_loss,
    f_scores,
    nca_pair_loss,
    sppo_hard_loss,
)
from dpo_ds.training.objectives import build_objective


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


# two pairs: log-ratios w = PC - RC = [1, -0.5], l = PR - RR = [-1, 0.5]; lengths 4/2 and 5/10
PC, PR, RC, RR = t([-3.0, -6.0]), t([-5.0, -4.0]), t([-4.0, -5.5]), t([-4.0, -4.5])
NC, NR = torch.tensor([4, 5]), torch.tensor([2, 10])
W, L = [1.0, -0.5], [-1.0, 0.5]
BETA = 0.5


def test_dpo_norm_by_hand():
    losses, rc, rr = dpo_norm_loss(PC, PR, RC, RR, beta=5.0, chosen_tokens=NC, rejected_tokens=NR)
    # h = w / |y_w| - l / |y_l|: pair 0: 1/4 + 1/2 = 0.75; pair 1: -0.5/5 - 0.5/10 = -0.15
    want = [-logsig(5.0 * 0.75), -logsig(5.0 * -0.15)]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    assert rc.tolist() == pytest.approx([5.0 * 1.0, 5.0 * -0.5])  # rewards: DPO's summed ones
    # equal lengths: DPO at beta / length
    n = torch.tensor([4, 4])
    same = dpo_norm_loss(PC, PR, RC, RR, beta=4.0, chosen_tokens=n, rejected_tokens=n)[0]
    torch.testing.assert_close(same, dpo_loss(PC, PR, RC, RR, beta=1.0)[0])


def test_exo_pair_by_hand():
    eps = 0.01
    losses = exo_pair_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)[0]
    want = []
    for w, x in zip(W, L, strict=True):
        z = BETA * (w - x)
        want.append(sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)))
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="EXO needs 0 < label_smoothing"):
        exo_pair_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=0.0)


def test_nca_bco_sppo_by_hand():
    nca = [
        -logsig(BETA * w) - 0.5 * logsig(-BETA * w) - 0.5 * logsig(-BETA * x)
        for w, x in zip(W, L, strict=True)
    ]
    assert nca_pair_loss(PC, PR, RC, RR, beta=BETA)[0].tolist() == pytest.approx(nca, abs=1e-12)
    bco = [-logsig(BETA * w) - logsig(-BETA * x) for w, x in zip(W, L, strict=True)]
    assert bco_pair_loss(PC, PR, RC, RR, beta=BETA)[0].tolist() == pytest.approx(bco, abs=1e-12)
    sppo = [(w - 1.0) ** 2 + (x + 1.0) ** 2 for w, x in zip(W, L, strict=True)]  # 1 / (2 beta) = 1
    assert sppo_hard_loss(PC, PR, RC, RR, beta=BETA)[0].tolist() == pytest.approx(sppo, abs=1e-12)


def test_aot_sorts_over_the_micro_batch():
    # policy margins pc - pr = [2, -2], reference margins rc - rr = [0, -1]: sorted [-2, 2] and [-1, 0]
    losses = aot_loss(PC, PR, RC, RR, beta=BETA)[0]
    assert losses.tolist() == pytest.approx([-logsig(BETA * (-2 + 1)), -logsig(BETA * (2 - 0))], abs=1e-12)
    # unpaired: sorted chosen ratios [-0.5, 1] against sorted rejected [-1, 0.5]
    eps = 0.1
    unpaired = aot_unpaired_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)[0]
    want = [-(1 - eps) * logsig(BETA * d) - eps * logsig(-BETA * d) for d in (-0.5 + 1, 1 - 0.5)]
    assert unpaired.tolist() == pytest.approx(want, abs=1e-12)
    # a loss of the batch, not of a pair: swapping one pair's rejected log-probs changes the other pair's loss
    swapped = aot_loss(PC, PR.flip(0), RC, RR, beta=BETA)[0]
    assert not torch.allclose(swapped, losses)


def test_discopop_by_hand():
    tau = 0.05
    want = []
    for w, x in zip(W, L, strict=True):
        z = BETA * (w - x)
        s = sig(z / tau)
        want.append(-logsig(z) * (1 - s) + math.exp(-z) * s)
    assert discopop_loss(PC, PR, RC, RR, beta=BETA, discopop_tau=tau)[0].tolist() == pytest.approx(
        want, abs=1e-12
    )


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_by_hand(kind):
    u = t([1.0, -0.5])
    want = {
        "forward_kl": [1 - math.exp(-1.0), 1 - math.exp(0.5)],
        "js_divergence": [math.log(2) + logsig(1.0), math.log(2) + logsig(-0.5)],
        "alpha_divergence": [
            (math.exp(-0.7 * 1.0) - 1) / -0.7,
            (math.exp(-0.7 * -0.5) - 1) / -0.7,
        ],  # alpha 0.3
    }[kind]
    assert f_scores(u, kind, 0.3).tolist() == pytest.approx(want, abs=1e-12)
    # DPO under it: h = f(w) - f(l)
    h = [
        a - b
        for a, b in zip(f_scores(t(W), kind, 0.3).tolist(), f_scores(t(L), kind, 0.3).tolist(), strict=True)
    ]
    got = dpo_loss(PC, PR, RC, RR, beta=BETA, f_divergence=kind, f_alpha=0.3)[0]
    assert got.tolist() == pytest.approx([-logsig(BETA * x) for x in h], abs=1e-12)
    torch.testing.assert_close(f_scores(u, "alpha_divergence", 1.0), u)  # alpha -> 1: reverse KL
    torch.testing.assert_close(f_scores(u, "reverse_kl"), u)


def _objective_loss(overrides):
    objective = build_objective(load_config(None, overrides))
    policy = SequenceLogps(torch.cat([PC, PR]), torch.cat([NC, NR]))
    return objective(policy, torch.cat([RC, RR]), None)[0]


def test_names_aliases_sums_and_refusals():
    norm = _objective_loss(["loss=dpo_norm", "loss.beta=5"])
    torch.testing.assert_close(norm, _objective_loss(["loss=sigmoid_norm", "loss.beta=5"]))  # TRL's name
    torch.testing.assert_close(
        norm, dpo_norm_loss(PC, PR, RC, RR, beta=5.0, chosen_tokens=NC, rejected_tokens=NR)[0]
    )
    mpo = _objective_loss(["loss=[dpo_norm,bco_pair]", "loss.weights=[0.8,0.2]", "loss.beta=5"])
    torch.testing.assert_close(mpo, 0.8 * norm + 0.2 * bco_pair_loss(PC, PR, RC, RR, beta=5.0)[0])
    refused = {
        ("loss=exo_pair",): r"'loss.label_smoothing': loss=exo_pair needs it in \(0, 0.5\)",
        (
            "loss=apo_zero",
            "loss.f_divergence=forward_kl",
        ): r"'loss.f_divergence': is not defined for loss=apo_zero",
        ("loss=dpo", "loss.discopop_tau=0.1"): r"'loss.discopop_tau': is not defined for loss=dpo",
        ("loss=discopop", "loss.discopop_tau=-1"): r"'loss.discopop_tau': must be > 0, got -1",
        ("loss=dpo", "loss.f_divergence=kl"): r"'loss.f_divergence'",
        (
            "loss=dpo",
            "loss.f_alpha=0.3",
        ): r"'loss.f_alpha': applies to loss.f_divergence=alpha_divergence only",
        ("loss=dpo", "loss.ld_alpha=1.5"): r"'loss.ld_alpha': must be in \[0, 1\] or null, got 1.5",
        ("loss=sft", "loss.ld_alpha=0.5"): r"'loss.ld_alpha': weighs the tokens of preference pairs",
        ("loss=nca_pair", "loss.reference_free=true"): None,  # reference-free works for any reference loss
    }
    for overrides, message in refused.items():
        if message is None:
            build_objective(load_config(None, list(overrides)))
            continue
        with pytest.raises(ConfigError, match=message):
            build_objective(load_config(None, list(overrides)))
