import math

import pytest
import torch

from dpo_ds.training.losses import chosen_nll, dpo_loss, ipo_loss, sft_loss
from dpo_ds.training.objectives import PREFERENCE_LOSSES


def _sig(x):
    return 1 / (1 + math.exp(-x))


PC, PR, RC, RR = [-10.0, -4.0], [-12.0, -3.0], [-11.0, -4.5], [-11.5, -3.5]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_dpo_by_hand():
    beta = 0.1
    losses, cr, rr = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    # pair 0: h = (-10 - -12) - (-11 - -11.5) = 2 - 0.5 = 1.5 ; pair 1: h = (-4 - -3) - (-4.5 - -3.5) = -1 + 1 = 0
    assert losses[0].item() == pytest.approx(-math.log(_sig(0.15)), rel=1e-12)
    assert losses[1].item() == pytest.approx(math.log(2), rel=1e-12)
    # rewards: beta * (policy - reference)
    assert cr.tolist() == pytest.approx([0.1 * 1.0, 0.1 * 0.5])
    assert rr.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 0.5])


def test_dpo_equal_policy_and_reference_is_ln2():
    x = torch.randn(7, dtype=torch.float64)
    y = torch.randn(7, dtype=torch.float64)
    losses, cr, rr = dpo_loss(x, y, x, y, beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_conservative_dpo_by_hand():
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    h0 = 1.5
    expected = -(1 - eps) * math.log(_sig(beta * h0)) - eps * math.log(_sig(-beta * h0))
    assert losses[0].item() == pytest.approx(expected, rel=1e-12)
    # label smoothing makes the loss non-monotone: a huge margin is penalised again
    big, _, _ = dpo_loss(t([0.0]), t([-1000.0]), t([0.0]), t([0.0]), beta=1.0, label_smoothing=eps)
    assert big.item() == pytest.approx(eps * 1000.0, rel=1e-6)


def test_ipo_by_hand():
    beta = 0.1
    losses, _, _ = ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    assert losses[0].item() == pytest.approx((1.5 - 5.0) ** 2)
    assert losses[1].item() == pytest.approx((0.0 - 5.0) ** 2)
    with pytest.raises(ValueError):
        ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=0.1)


def test_reference_free_is_zero_reference():
    beta = 0.2
    zeros = torch.zeros(2, dtype=torch.float64)
    losses, cr, _ = dpo_loss(t(PC), t(PR), zeros, zeros, beta=beta)
    # h = log pi(y_w) - log pi(y_l) only: pair 0 -> 2, pair 1 -> -1
    assert losses.tolist() == pytest.approx([-math.log(_sig(0.4)), -math.log(_sig(-0.2))])
    assert cr.tolist() == pytest.approx([-2.0, -0.8])


def test_dpo_gradient_direction():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    losses.sum().backward()
    # d/dh -log sigma(beta h) at h=0 is -beta/2: raise chosen, lower rejected
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


def test_sft_and_chosen_nll_by_hand():
    assert sft_loss(t([-3.0, -7.5])).tolist() == [3.0, 7.5]
    assert chosen_nll(t([-6.0, -2.0]), torch.tensor([3, 4])).tolist() == [2.0, 0.5]
    assert chosen_nll(t([0.0]), torch.tensor([0])).tolist() == [0.0]  # empty response: no division by 0


def test_losses_chosen_by_name():
    assert PREFERENCE_LOSSES["dpo"].fn is dpo_loss and PREFERENCE_LOSSES["ipo"].fn is ipo_loss
