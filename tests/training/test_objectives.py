"""The objective and the reference sources: what the trainer asks, with arithmetic written out."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_ds.config import ConfigError, load_config
from dpo_ds.model.lm import SequenceLogps
from dpo_ds.training.objectives import PreferenceObjective, SFTObjective, build_objective
from dpo_ds.training.reference import NoReference, PrecomputedReference, read_cache, write_cache


def seqs(chosen, rejected, counts=(2, 2, 3, 3)):
    return SequenceLogps(torch.tensor(chosen + rejected), torch.tensor(counts))


@pytest.mark.parametrize(
    "overrides, kind, needs_reference, pairs",
    [
        (["loss=sft"], SFTObjective, False, False),
        (["loss=dpo"], PreferenceObjective, True, True),
        (["loss=ipo"], PreferenceObjective, True, True),
        (["loss=dpo", "loss.reference_free=true"], PreferenceObjective, False, True),
    ],
)
def test_the_mode_is_decided_once(overrides, kind, needs_reference, pairs):
    objective = build_objective(load_config(None, overrides))
    assert isinstance(objective, kind)
    assert objective.needs_reference is needs_reference and objective.pairs is pairs


def test_dpo_objective_arithmetic():
    objective = build_objective(load_config(None, ["loss=dpo", "loss.beta=0.5", "loss.chosen_nll_weight=2"]))
    policy = seqs([-2.0, -4.0], [-3.0, -1.0])
    reference = torch.tensor([-2.5, -4.0, -2.5, -2.0])  # chosen then rejected
    losses, stats = objective(policy, reference, {})
    # h = (pc - pr) - (rc - rr): pair 0: (-2 + 3) - (-2.5 + 2.5) = 1; pair 1: (-4 + 1) - (-4 + 2) = -1
    # loss = -log sigmoid(0.5 h) + 2 * (-pc / |y_w|), |y_w| = 2
    want = [-math.log(1 / (1 + math.exp(-0.5))) + 2 * 1.0, -math.log(1 / (1 + math.exp(0.5))) + 2 * 2.0]
    assert losses.tolist() == pytest.approx(want)
    assert stats["rewards/chosen"].tolist() == pytest.approx([0.25, 0.0])  # 0.5 * (pc - rc)
    assert stats["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_reference_free_uses_a_constant_reference():
    objective = build_objective(load_config(None, ["loss=dpo", "loss.reference_free=true"]))
    losses, stats = objective(seqs([-2.0], [-3.0], (1, 1)), None, {})
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))))  # h = 1, beta 0.1
    assert stats["logps/ref_chosen"].tolist() == [0.0]


def test_sft_token_normalisation():
    policy = SequenceLogps(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]))
    batch = SimpleNamespace(global_examples=4, global_tokens=10)
    per_seq, _ = SFTObjective("sequence")(policy, None, batch)
    per_token, _ = SFTObjective("token")(policy, None, batch)
    assert per_seq.tolist() == [6.0, 2.0]
    # the trainer averages over the 4 examples of the global batch: (6 + 2) * 4 / 10 / 4 = 8 / 10 per token
    assert per_token.tolist() == pytest.approx([6.0 * 4 / 10, 2.0 * 4 / 10])


def test_label_smoothing_only_where_the_loss_has_it():
    with pytest.raises(ConfigError, match="loss.label_smoothing.*loss=ipo"):
        build_objective(load_config(None, ["loss=ipo", "loss.label_smoothing=0.1"]))
    build_objective(load_config(None, ["loss=robust", "loss.label_smoothing=0.1"]))  # its eps
    with pytest.raises(
        ConfigError, match=r"loss.label_smoothing': is not defined for loss=sft; must be 0.0, got 0.1"
    ):
        build_objective(load_config(None, ["loss=sft", "loss.label_smoothing=0.1"]))
    build_objective(load_config(None, ["loss=[dpo,sft]", "loss.label_smoothing=0.1"]))  # the dpo term's cDPO


def test_precomputed_reference_lookup():
    table = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [float("nan"), float("nan")]])
    ref = PrecomputedReference({"train": table})
    batch = SimpleNamespace(split="train", example_ids=torch.tensor([1, 0]), input_ids=torch.zeros(1))
    assert ref.logps(batch).tolist() == [-3.0, -1.0, -4.0, -2.0]  # chosen of both pairs, then rejected
    with pytest.raises(RuntimeError, match=r"no precomputed reference log-probs for train examples \[2\]"):
        ref.logps(SimpleNamespace(**{**vars(batch), "example_ids": torch.tensor([2])}))
    assert NoReference().logps(batch) is None
    for source in (NoReference(), ref):  # no model to generate the reference's samples from
        with source.sampler() as model:
            assert model is None


def test_reference_cache_reuse_and_refusal(tmp_path):
    path = tmp_path / "reference_logps.pt"
    want = {"data": "abc", "model.reference_dtype": "float32"}
    assert read_cache(path, want) is None
    tables = {"train": torch.tensor([[-1.0, -2.0]])}
    write_cache(path, want, tables)
    assert torch.equal(read_cache(path, want)["train"], tables["train"])
    with pytest.raises(ConfigError, match=r"different run \(data: 'abc' -> 'xyz'\)"):
        read_cache(path, {**want, "data": "xyz"})
    torch.save({"fingerprint": want, "tables": tables}, path)  # no completion mark: a cut-short write
    with pytest.raises(ConfigError, match="incomplete"):
        read_cache(path, want)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_cache(path, want)


def test_the_router_loss_is_added_per_example_and_logged_apart():
    """coef x aux on each example of the micro-batch: the step's mean over examples then weighs each
    micro-batch's aux by its pairs; the reported loss stays the preference loss, aux_loss beside it."""
    from dpo_ds.training.objectives import with_router_loss
    from dpo_ds.training.trainer import Trainer

    inner = build_objective(load_config(None, ["loss=dpo", "loss.beta=0.5"]))
    assert with_router_loss(inner, None) is inner  # a dense model: the objective unchanged
    objective = with_router_loss(inner, 0.25)
    assert objective.needs_reference and objective.pairs
    aux = torch.tensor(1.6, requires_grad=True)
    policy = SequenceLogps(torch.tensor([-3.0, -5.0, -4.0, -4.5]), torch.tensor([3, 4, 2, 2]), aux=aux)
    reference = torch.tensor([-3.5, -4.5, -4.0, -4.0])
    plain, _ = inner(SequenceLogps(policy.logps, policy.counts), reference, None)
    losses, stats = objective(policy, reference, None)
    torch.testing.assert_close(losses, plain + 0.25 * 1.6)
    torch.testing.assert_close(stats["loss"], plain)
    torch.testing.assert_close(stats["aux_loss"], torch.full((2,), 1.6))
    losses.sum().backward()
    assert aux.grad.item() == pytest.approx(2 * 0.25)  # two examples, each carrying coef x aux
    sums = {}
    Trainer._accumulate(sums, losses, stats)  # what the metrics report: the preference loss
    assert sums["loss"].item() == pytest.approx(plain.sum().item()) and sums[
        "aux_loss"
    ].item() == pytest.approx(3.2)
    off = with_router_loss(inner, 0.0)(policy, reference, None)[0]  # 0: logged, not added
    torch.testing.assert_close(off, plain)
    with pytest.raises(ValueError, match="needs the policy's router loss"):
        objective(SequenceLogps(policy.logps, policy.counts), reference, None)


def test_lr_schedules_by_hand():
    """Warmup (step + 1) / (warmup + 1), then held, or down to 0 at the last step linearly or on a half cosine."""
    from dpo_ds.engine.build import lr_factor

    assert [lr_factor(s, 3, 10, "constant") for s in (0, 2, 3, 9)] == [0.25, 0.75, 1.0, 1.0]
    assert [lr_factor(s, 3, 11, "linear") for s in (0, 3, 7, 11, 20)] == pytest.approx(
        [0.25, 1.0, 0.5, 0.0, 0.0]
    )
    assert [lr_factor(s, 0, 8, "cosine") for s in (0, 4, 8)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(2, 0, 8, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
