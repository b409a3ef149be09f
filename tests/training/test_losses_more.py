"""The losses people use beside DPO/IPO, with the arithmetic written out by hand, and their wiring:
what each needs (reference, token counts, hyperparameters), weighted sums, and the config errors."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ds.config import ConfigError, load_config
from dpo_ds.model.lm import SequenceLogps
from dpo_ds.training.losses import (
    apo_down_loss,
    apo_zero_loss,
    dpo_loss,
    hinge_loss,
    ipo_length_normalized_loss,
    ipo_loss,
    orpo_loss,
    robust_loss,
    simpo_loss,
)
from dpo_ds.training.objectives import (
    IPO_LENGTH_NORMALIZED,
    PREFERENCE_LOSSES,
    PreferenceObjective,
    build_objective,
)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


# three pairs: log-ratios r_w = PC - RC = [1, 0.5, 1], r_l = PR - RR = [-0.5, 0.5, -3],
# so h = r_w - r_l = [1.5, 0, 4]
PC, PR, RC, RR = [-10.0, -4.0, -1.0], [-12.0, -3.0, -5.0], [-11.0, -4.5, -2.0], [-11.5, -3.5, -2.0]
NC, NR = [4, 2, 5], [6, 3, 5]  # response token counts, chosen and rejected


def grads(fn, pc=-5.0, pr=-5.0, rc=-5.0, rr=-5.0, **kw):
    """d loss / d log pi(y_w), d loss / d log pi(y_l) for one pair."""
    pc_, pr_ = torch.tensor([pc], requires_grad=True), torch.tensor([pr], requires_grad=True)
    losses, _, _ = fn(pc_, pr_, torch.tensor([rc]), torch.tensor([rr]), **kw)
    losses.sum().backward()
    return pc_.grad.item(), pr_.grad.item()


def test_hinge_by_hand():
    losses, cr, rr = hinge_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    # max(0, 1 - 0.5 h): 1 - 0.75, 1 - 0, max(0, 1 - 2)
    assert losses.tolist() == pytest.approx([0.25, 1.0, 0.0])
    assert cr.tolist() == pytest.approx([0.5, 0.25, 0.5]) and rr.tolist() == pytest.approx(
        [-0.25, 0.25, -1.5]
    )
    assert grads(hinge_loss, beta=0.5) == pytest.approx((-0.5, 0.5))  # inside the margin: slope beta
    assert grads(hinge_loss, pc=0.0, pr=-10.0, beta=0.5) == (0.0, 0.0)  # past the margin 1 / beta: none


def test_robust_by_hand_and_unbiased():
    beta, eps = 0.5, 0.2
    losses, _, _ = robust_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    l0 = (0.8 * -math.log(_sig(0.75)) - 0.2 * -math.log(_sig(-0.75))) / 0.6
    assert losses[0].item() == pytest.approx(l0, rel=1e-12)
    assert losses[1].item() == pytest.approx((0.8 - 0.2) * math.log(2) / 0.6, rel=1e-12)  # = ln 2 at h = 0
    # unbiased: if the label is flipped with probability eps, the expected rDPO loss is the clean DPO loss
    flipped, _, _ = robust_loss(t(PR), t(PC), t(RR), t(RC), beta=beta, label_smoothing=eps)
    clean, _, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta)
    assert ((1 - eps) * losses + eps * flipped).tolist() == pytest.approx(clean.tolist(), rel=1e-12)
    # not cDPO: at a huge margin cDPO grows again (+eps beta h), rDPO keeps falling
    # (-eps beta h / (1 - 2 eps))
    big = [t([0.0]), t([-1000.0]), t([0.0]), t([0.0])]
    assert robust_loss(*big, beta=1.0, label_smoothing=eps)[0].item() == pytest.approx(-0.2 * 1000 / 0.6)
    assert dpo_loss(*big, beta=1.0, label_smoothing=eps)[0].item() == pytest.approx(0.2 * 1000)
    assert robust_loss(*big, beta=1.0, label_smoothing=0.0)[0].item() == dpo_loss(*big, beta=1.0)[0].item()
    gc, gr = grads(robust_loss, beta=beta, label_smoothing=eps)
    assert gc < 0 < gr
    with pytest.raises(ValueError):
        robust_loss(*big, beta=1.0, label_smoothing=0.5)


def test_apo_zero_by_hand():
    losses, cr, _ = apo_zero_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    # (1 - sigma(beta r_w)) + sigma(beta r_l)
    want = [1 - _sig(0.5) + _sig(-0.25), 1 - _sig(0.25) + _sig(0.25), 1 - _sig(0.5) + _sig(-1.5)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert losses[1].item() == pytest.approx(1.0)  # r_w = r_l: the two terms cancel to 1
    assert cr.tolist() == pytest.approx([0.5, 0.25, 0.5])  # DPO's rewards
    gc, gr = grads(apo_zero_loss, beta=0.5)
    assert gc == pytest.approx(-0.125) and gr == pytest.approx(0.125)  # beta sigma'(0) = 0.5 / 4 each way


def test_apo_down_by_hand():
    losses, _, _ = apo_down_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    # sigma(beta r_w) + (1 - sigma(beta h))
    want = [_sig(0.5) + 1 - _sig(0.75), _sig(0.25) + 1 - 0.5, _sig(0.5) + 1 - _sig(2.0)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    # at r_w = 0.2, h = 1 (pc - rc = 0.2, pr - rr = -0.8): the chosen log-prob is pushed DOWN (positive
    # gradient), the rejected further down:
    # d/dpc = beta (sigma'(0.1) - sigma'(0.5)) > 0, d/dpr = beta sigma'(0.5)
    gc, gr = grads(apo_down_loss, pc=-4.8, pr=-5.8, beta=0.5)
    d = lambda x: _sig(x) * (1 - _sig(x))  # noqa: E731
    assert gc == pytest.approx(0.5 * (d(0.1) - d(0.5)), rel=1e-6) and gc > 0
    assert gr == pytest.approx(0.5 * d(0.5), rel=1e-6)


def test_simpo_by_hand():
    beta, gamma = 2.0, 0.5
    losses, cr, rr = simpo_loss(
        t(PC), t(PR), beta=beta, gamma=gamma, chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR)
    )
    # mean log-probs: chosen -10/4, -4/2, -1/5 = [-2.5, -2, -0.2]; rejected -12/6, -3/3, -5/5 = [-2, -1, -1]
    # rewards 2 * mean: [-5, -4, -0.4] and [-4, -2, -2]; loss = -log sigma(r_w - r_l - 0.5)
    assert cr.tolist() == pytest.approx([-5.0, -4.0, -0.4]) and rr.tolist() == pytest.approx(
        [-4.0, -2.0, -2.0]
    )
    want = [-math.log(_sig(-1.5)), -math.log(_sig(-2.5)), -math.log(_sig(1.1))]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    # pair 0 wins on summed log-probs (-10 > -12) and loses per token: SimPO sees only the latter.
    # Doubling a response (log-prob and length) changes nothing; no reference enters at all
    twice, _, _ = simpo_loss(
        t(PC) * 2, t(PR), t([9.0] * 3), t([9.0] * 3), beta=beta, gamma=gamma,
        chosen_tokens=torch.tensor(NC) * 2, rejected_tokens=torch.tensor(NR),
    )  # fmt: skip
    assert twice.tolist() == pytest.approx(want, rel=1e-12)
    counts = dict(chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([2]))
    gc, gr = grads(simpo_loss, beta=beta, gamma=gamma, **counts)
    assert gc == pytest.approx(-beta / 2 * _sig(gamma)) and gr == pytest.approx(beta / 2 * _sig(gamma))


def test_orpo_by_hand():
    lam = 0.1
    # per-token likelihoods P = exp(logps / tokens):
    # pair 0 P_w = 0.5, P_l = 0.2; pair 1 swapped; pair 2 both 0.8
    pc = t([3 * math.log(0.5), 2 * math.log(0.2), 4 * math.log(0.8)])
    pr = t([2 * math.log(0.2), 3 * math.log(0.5), 5 * math.log(0.8)])
    counts = dict(chosen_tokens=torch.tensor([3, 2, 4]), rejected_tokens=torch.tensor([2, 3, 5]))
    losses, cr, _ = orpo_loss(pc, pr, orpo_lambda=lam, **counts)
    # odds = P / (1 - P): 0.5 -> 1, 0.2 -> 0.25, 0.8 -> 4. Pair 0: OR = 1 / 0.25 = 4,
    # -log sigma(log 4) = -log(4 / 5) = log 1.25, NLL = -log 0.5.
    # Pair 1: OR = 1/4, -log sigma(-log 4) = log 5, NLL = -log 0.2 = log 5.
    # Pair 2: OR = 1, -log sigma(0) = log 2, NLL = -log 0.8
    want = [math.log(2) + lam * math.log(1.25), math.log(5) * (1 + lam), -math.log(0.8) + lam * math.log(2)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert cr.tolist() == pytest.approx([lam * math.log(0.5), lam * math.log(0.2), lam * math.log(0.8)])
    # the reference tensors are ignored
    assert (
        orpo_loss(pc, pr, t([1.0] * 3), t([2.0] * 3), orpo_lambda=lam, **counts)[0].tolist()
        == losses.tolist()
    )
    one = dict(chosen_tokens=torch.tensor([1]), rejected_tokens=torch.tensor([1]))
    gc, gr = grads(orpo_loss, pc=-1.0, pr=-1.0, orpo_lambda=lam, **one)
    assert gc < 0 < gr


def test_orpo_is_finite_at_the_ends():
    """log(1 - P) near P = 1 and P = 0, where the naive log(1 - exp(x)) gives -inf or loses every digit."""
    for dtype in (torch.float32, torch.float64):
        pc = torch.tensor([0.0, -1e-12, -1e-3, -80.0], dtype=dtype, requires_grad=True)
        pr = torch.tensor([-80.0, -0.5, -1e-3, 0.0], dtype=dtype, requires_grad=True)
        ones = torch.ones(4, dtype=torch.long)
        losses, _, _ = orpo_loss(pc, pr, orpo_lambda=1.0, chosen_tokens=ones, rejected_tokens=ones)
        losses.sum().backward()
        assert (
            torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        )
    # where it is representable, log odds(P) = log P - log(1 - P) exactly: P_w = 1 - 1e-3 vs P_l = 0.5
    pc, pr = t([math.log1p(-1e-3)]), t([math.log(0.5)])
    losses, _, _ = orpo_loss(
        pc, pr, orpo_lambda=1.0, chosen_tokens=torch.tensor([1]), rejected_tokens=torch.tensor([1])
    )
    want = -math.log1p(-1e-3) - math.log(_sig(math.log((1 - 1e-3) / 1e-3)))
    assert losses.item() == pytest.approx(want, rel=1e-12)


def test_ipo_length_normalized_by_hand():
    losses, _, _ = ipo_length_normalized_loss(
        t(PC), t(PR), t(RC), t(RR), beta=0.1, chosen_tokens=torch.tensor(NC), rejected_tokens=torch.tensor(NR)
    )
    # h = r_w / |y_w| - r_l / |y_l| = [1/4 + 0.5/6, 0.5/2 - 0.5/3, 1/5 + 3/5] = [1/3, 1/12, 0.8];
    # 1 / (2 tau) = 5
    assert losses.tolist() == pytest.approx([(1 / 3 - 5) ** 2, (1 / 12 - 5) ** 2, (0.8 - 5) ** 2], rel=1e-12)
    ones = torch.ones(3, dtype=torch.long)  # one token each: the paper's summed form
    same, _, _ = ipo_length_normalized_loss(
        t(PC), t(PR), t(RC), t(RR), beta=0.1, chosen_tokens=ones, rejected_tokens=ones
    )
    assert same.tolist() == ipo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.1)[0].tolist()


def test_losses_chosen_by_name():
    names = {n: spec.fn.__name__ for n, spec in PREFERENCE_LOSSES.items()}
    assert names == {
        "dpo": "dpo_loss",
        "ipo": "ipo_loss",
        "hinge": "hinge_loss",
        "robust": "robust_loss",
        "apo_zero": "apo_zero_loss",
        "apo_down": "apo_down_loss",
        "simpo": "simpo_loss",
        "orpo": "orpo_loss",
        "dpo_norm": "dpo_norm_loss",
        "sigmoid_norm": "dpo_norm_loss",  # TRL's name, an alias
        "exo_pair": "exo_pair_loss",
        "nca_pair": "nca_pair_loss",
        "bco_pair": "bco_pair_loss",
        "sppo_hard": "sppo_hard_loss",
        "aot": "aot_loss",
        "aot_unpaired": "aot_unpaired_loss",
        "discopop": "discopop_loss",
    }
    assert [n for n, spec in PREFERENCE_LOSSES.items() if not spec.reference] == ["simpo", "orpo"]
    counted = [n for n, spec in PREFERENCE_LOSSES.items() if spec.counts]
    assert counted == ["simpo", "orpo", "dpo_norm", "sigmoid_norm"]


# --- the objective: what a loss needs, weighted sums -------------------------------------------------------


def pairs(chosen, rejected, chosen_counts, rejected_counts):
    return SequenceLogps(t(chosen + rejected), torch.tensor(chosen_counts + rejected_counts))


POLICY = pairs(PC, PR, NC, NR)
REFERENCE = t(RC + RR)


@pytest.mark.parametrize(
    "overrides, needs_reference",
    [
        (["loss=simpo"], False),
        (["loss=orpo"], False),
        (["loss=[simpo,sft]"], False),
        (["loss=hinge"], True),
        (["loss=robust", "loss.label_smoothing=0.1"], True),
        (["loss=apo_zero"], True),
        (["loss=apo_down"], True),
        (["loss=[simpo,dpo]"], True),  # a sum needs a reference iff one of its terms does
        (["loss=[simpo,dpo]", "loss.reference_free=true"], False),
    ],
)
def test_a_loss_without_reference_builds_none(overrides, needs_reference):
    objective = build_objective(load_config(None, overrides))
    assert isinstance(objective, PreferenceObjective) and objective.needs_reference is needs_reference


def test_objective_passes_exactly_what_each_loss_takes():
    simpo = build_objective(load_config(None, ["loss=simpo", "loss.beta=2", "loss.gamma=0.5"]))
    losses, stats = simpo(POLICY, None, {})  # no reference log-probs at all
    want = [-math.log(_sig(-1.5)), -math.log(_sig(-2.5)), -math.log(_sig(1.1))]  # test_simpo_by_hand
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert stats["rewards/chosen"].tolist() == pytest.approx([-5.0, -4.0, -0.4])

    orpo = build_objective(load_config(None, ["loss=orpo", "loss.orpo_lambda=0.5", "loss.beta=7"]))
    losses, stats = orpo(POLICY, None, {})
    # pair 1: P_w = exp(-2), P_l = exp(-1); beta plays no part
    lo = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    assert losses[1].item() == pytest.approx(2.0 - 0.5 * math.log(_sig(lo(-2.0) - lo(-1.0))), rel=1e-12)
    assert stats["rewards/rejected"][1].item() == pytest.approx(0.5 * -1.0)

    ipo = build_objective(load_config(None, ["loss=ipo", "loss.ipo_normalize=length"]))
    assert ipo.terms == [(IPO_LENGTH_NORMALIZED, 1.0)]
    losses, _ = ipo(POLICY, REFERENCE, {})
    assert losses.tolist() == pytest.approx([(1 / 3 - 5) ** 2, (1 / 12 - 5) ** 2, (0.8 - 5) ** 2], rel=1e-12)
    summed, _ = build_objective(load_config(None, ["loss=ipo"]))(POLICY, REFERENCE, {})
    assert summed.tolist() == pytest.approx([(1.5 - 5) ** 2, 25.0, (4 - 5) ** 2])  # the paper's default

    robust = build_objective(load_config(None, ["loss=robust", "loss.beta=0.5", "loss.label_smoothing=0.2"]))
    assert robust(POLICY, REFERENCE, {})[0][1].item() == pytest.approx(math.log(2))


def test_dpo_plus_sft_is_rpo():
    summed = build_objective(load_config(None, ["loss=[dpo,sft]", "loss.weights=[1,0.2]", "loss.beta=0.5"]))
    rpo = build_objective(load_config(None, ["loss=dpo", "loss.chosen_nll_weight=0.2", "loss.beta=0.5"]))
    a, a_stats = summed(POLICY, REFERENCE, {})
    b, b_stats = rpo(POLICY, REFERENCE, {})
    assert a.tolist() == b.tolist() and a_stats.keys() == b_stats.keys()
    assert all(torch.equal(a_stats[k], b_stats[k]) for k in a_stats)
    # by hand, pair 0: -log sigma(0.5 * 1.5) + 0.2 * 10 / 4
    assert a[0].item() == pytest.approx(-math.log(_sig(0.75)) + 0.2 * 2.5, rel=1e-12)
    # the YAML list form is the same objective
    assert load_config(None, ["loss=[dpo, sft]"]).loss.name == "dpo+sft"


def test_weighted_sum_by_hand_and_rewards_from_the_first_term():
    cfg = load_config(None, ["loss=[hinge,dpo]", "loss.weights=[2,0.5]", "loss.beta=0.5"])
    losses, stats = build_objective(cfg)(POLICY, REFERENCE, {})
    # 2 * max(0, 1 - 0.5 h) + 0.5 * -log sigma(0.5 h), h = [1.5, 0, 4]
    want = [
        2 * 0.25 - 0.5 * math.log(_sig(0.75)),
        2 * 1.0 + 0.5 * math.log(2),
        0.0 - 0.5 * math.log(_sig(2.0)),
    ]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    # the reward statistics come from the first preference term: SimPO's beta * mean log-prob here
    cfg = load_config(None, ["loss=[simpo,dpo]", "loss.beta=2"])
    _, stats = build_objective(cfg)(POLICY, REFERENCE, {})
    assert stats["rewards/chosen"].tolist() == pytest.approx([-5.0, -4.0, -0.4])
    # loss=sft alone is still the SFT objective; [sft] is the same thing
    assert not build_objective(load_config(None, ["loss=[sft]"])).pairs


def test_yaml_list_form(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  name: [dpo, sft]\n  weights: [1, 0.2]\n")
    cfg = load_config(str(f))
    assert cfg.loss.names == ["dpo", "sft"] and cfg.loss.weights == [1.0, 0.2]
    f.write_text("loss: [orpo, sft]\n")
    assert load_config(str(f)).loss.names == ["orpo", "sft"]


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["loss=[dpo,kto]"], "loss.name", "simpo"),  # lists the known losses
        (["loss=[dpo,dpo]"], "loss.name", "twice"),
        (["loss=[dpo,"], "loss", "list"),
        (["loss=[dpo,sft]", "loss.weights=[1]"], "loss.weights", "one weight per loss"),
        (["loss=[dpo,sft]", "loss.weights=[1,-0.2]"], "loss.weights", ">= 0"),
        (["loss=sft", "loss.weights=[2]"], "loss.weights", "loss=sft takes none"),
        (["loss=[dpo,sft]", "loss.chosen_nll_weight=1"], "loss.chosen_nll_weight", "sft term"),
        (["loss=simpo", "loss.reference_free=true"], "loss.reference_free", "no reference"),
        (["loss=simpo", "loss.label_smoothing=0.1"], "loss.label_smoothing", "loss=simpo"),
        (["loss=[dpo,hinge]", "loss.label_smoothing=0.1"], "loss.label_smoothing", "loss=hinge"),
        (["loss=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing", "[0, 0.5)"),
        (["loss=simpo", "loss.gamma=-0.1"], "loss.gamma", ">= 0"),
        (["loss=orpo", "loss.orpo_lambda=-1"], "loss.orpo_lambda", ">= 0"),
        (["loss=ipo", "loss.ipo_normalize=mean"], "loss.ipo_normalize", "sum"),
        (["loss=dpo", "loss.ipo_normalize=length"], "loss.ipo_normalize", "loss=ipo only"),
    ],
)
def test_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:  # loaded, then its losses built (each spec checks its own)
        build_objective(load_config(None, overrides))
    assert f"'{key}'" in str(e.value) and words in str(e.value)
