"""WPO (loss.wpo, TRL's use_weighting): the pair weights by hand, their wiring into the objective (every term,
no gradient), the refusals, and the model wrapper's per-sequence sums of log p - log sum_v p_v^2 in every layout
and log-prob path against each sequence's own plain forward."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ds.config import ConfigError, load_config
from dpo_ds.data.collate import collate_padded
from dpo_ds.data.packing import collate_packed
from dpo_ds.data.shared_prompt import collate_shared
from dpo_ds.model.lm import LogprobLM, SequenceLogps, sequence_logps
from dpo_ds.training.losses import dpo_loss, wpo_weights
from dpo_ds.training.objectives import build_objective
from tests.model.test_ld_dpo import _lm, tok  # noqa: F401  (tok: a fixture)
from tests.model.test_router_loss import pairs

PC, PR = torch.tensor([-6.0, -9.0], dtype=torch.float64), torch.tensor([-8.0, -7.5], dtype=torch.float64)
RC, RR = torch.tensor([-6.5, -8.0], dtype=torch.float64), torch.tensor([-7.0, -8.0], dtype=torch.float64)
NC, NR = torch.tensor([3, 4]), torch.tensor([2, 5])
# per response: sum over its tokens of log p - log sum p^2
AC, AR = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-0.4, -3.0], dtype=torch.float64)


def test_weights_by_hand():
    # pair 0: exp(-1.5 / 3) * exp(-0.4 / 2); pair 1: exp(-2 / 4) * exp(-3 / 5)
    want = [math.exp(-0.5) * math.exp(-0.2), math.exp(-0.5) * math.exp(-0.6)]
    assert wpo_weights(AC, AR, NC, NR).tolist() == pytest.approx(want, abs=1e-15)
    # a response with no token (clamped count) weighs exp(0 / 1) = 1, not a division by zero
    assert wpo_weights(AC[:1] * 0, AR[:1] * 0, NC[:1] * 0, NR[:1] * 0).tolist() == [1.0]


def _policy(requires_grad=False):
    logps = torch.cat([PC, PR]).clone().requires_grad_(requires_grad)
    return SequenceLogps(logps, torch.cat([NC, NR]), aligned=torch.cat([AC, AR]))


def test_objective_weighs_every_term_and_passes_no_gradient_through_the_weights():
    weights = wpo_weights(AC, AR, NC, NR)
    objective = build_objective(
        load_config(None, ["loss=[dpo,sft]", "loss.weights=[1,0.3]", "loss.wpo=true"])
    )
    policy = _policy(requires_grad=True)
    losses, stats = objective(policy, torch.cat([RC, RR]), None)
    plain = dpo_loss(PC, PR, RC, RR, beta=0.1)[0] + 0.3 * (-PC / NC)  # DPO + the RPO term, unweighted
    torch.testing.assert_close(losses.detach(), plain * weights, rtol=0, atol=1e-14)
    torch.testing.assert_close(stats["wpo_weights"], weights)
    # d(w * l)/d logp = w * dl/dlogp: the weights are constants (no gradient through `aligned` either)
    losses.sum().backward()
    pc = PC.clone().requires_grad_()
    (dpo_loss(pc, PR, RC, RR, beta=0.1)[0] * weights + 0.3 * (-pc / NC) * weights).sum().backward()
    torch.testing.assert_close(policy.logps.grad[:2], pc.grad, rtol=0, atol=1e-14)
    off = build_objective(load_config(None, ["loss=[dpo,sft]", "loss.weights=[1,0.3]"]))
    torch.testing.assert_close(off(_policy(), torch.cat([RC, RR]), None)[0], plain)
    assert (weights - 1).abs().min() > 0.3  # the weights matter here: the test can fail
    with pytest.raises(ValueError, match="LogprobLM with wpo=True"):
        objective(SequenceLogps(torch.cat([PC, PR]), torch.cat([NC, NR])), torch.cat([RC, RR]), None)


def test_refused_by_name():
    refused = {
        ("loss=aot", "loss.wpo=true"): r"'loss.wpo': cannot weigh loss=aot: it sorts",
        ("loss=[dpo,aot_unpaired]", "loss.wpo=true"): r"'loss.wpo': cannot weigh loss=aot_unpaired",
        ("loss=sft", "loss.wpo=true"): r"'loss.wpo': weighs preference pairs; loss=sft has none",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            build_objective(load_config(None, list(overrides)))
    build_objective(load_config(None, ["loss=simpo", "loss.wpo=true"]))  # reference-free losses take it too


def test_trl_use_weighting_maps_to_loss_wpo():
    from dpo_ds.config.trl_names import TRL_NAMES

    entry = TRL_NAMES["use_weighting"]
    assert entry.targets == ("loss.wpo",)
    assert entry.setting(True) == "loss.wpo=true"


def _plain_aligned(lm, padded) -> torch.Tensor:
    """Each sequence's own forward in float64: sum over its response tokens of log p(y_t) - log sum_v p_v^2."""
    with torch.no_grad():
        logits = lm(padded.input_ids, attention_mask=padded.attention_mask).logits.double()
    p = torch.softmax(logits, -1)
    logp = torch.log(p)
    want = torch.zeros(padded.n_seqs, dtype=torch.float64)
    for s in range(padded.n_seqs):
        for t in (padded.labels[s, 1:] != -100).nonzero().flatten().tolist():
            y = padded.labels[s, t + 1]
            want[s] += float(logp[s, t, y]) - math.log(float((p[s, t] ** 2).sum()))
    return want


@pytest.mark.parametrize("impl", ["naive", "chunked", "fused_linear"])
def test_every_layout_gives_each_sequences_own_sums(tok, impl):  # noqa: F811
    examples = pairs(tok, 6, seed=4)
    lm = _lm()
    padded = collate_padded(examples, tok.pad_token_id)
    want = _plain_aligned(lm, padded)
    blocks = _lm("dpo_ds_blocks")
    for name, model, batch in (
        ("padded", lm, padded),
        ("packed", blocks, collate_packed(examples, tok.pad_token_id, 1 << 30)),
        ("shared_prompt", blocks, collate_shared(examples, tok.pad_token_id, row_len=1 << 30)),
    ):
        seqs = sequence_logps(LogprobLM(model, impl, wpo=True, ld_alpha=0.5), batch)
        assert not seqs.aligned.requires_grad
        # LD-DPO weighs the log-probs but not WPO's sums (TRL's weights use the unweighted per-token values)
        torch.testing.assert_close(seqs.aligned.double(), want, rtol=0, atol=2e-5, msg=name)
    plain = sequence_logps(LogprobLM(lm, impl), padded)
    assert plain.aligned is None
    assert float(want.abs().min()) > 1e-2  # not zero by construction: the test can fail
