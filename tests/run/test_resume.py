"""resume_from reproduces the later losses: a DPO run stopped at a mid-run checkpoint and resumed in
a new run dir gives the same training losses, learning rates and final weights as the run that went
straight through. DeepSpeed restores the sharded optimizer and the LR scheduler; dpo_ds restores the
step and the data order (deterministic per step).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.launch import ROOT, TINY, metrics, run_many, small_demo

pytestmark = pytest.mark.integration
ARGS = [
    "--ds",
    str(ROOT / "ds_configs/zero3.json"),
    "loss=dpo",
    "loss.beta=0.1",
    *TINY,
    "n_epochs=4",
    "eval_every=64",
    "lr=1e-3",
    # the resume point (step 4) falls inside the warmup: a scheduler that restarted would change the lr
    "warmup_steps=8",
]
RESUME_AT = 64  # examples: step 4 of 3 steps per epoch, so mid-epoch too


def test_resume_reproduces_later_losses(tmp_path):
    data = small_demo(tmp_path / "data")  # 48 pairs: 3 steps of 16 per epoch, 12 steps in all
    extra = [f"datasets=[{data}]", f"data.cache_dir={tmp_path / 'hf_cache'}"]
    first, second = tmp_path / "first", tmp_path / "second"
    # the run, then a second one resumed from its step 4, as two launches' ranks behind one launcher run
    run_many(tmp_path / "logs", {
        "first": [*ARGS, *extra, f"run_dir={first}"],
        "second": [*ARGS, *extra, f"run_dir={second}", f"resume_from={first / f'step-{RESUME_AT}'}"],
    })  # fmt: skip
    assert sorted(p.name for p in first.glob("step-*")) == ["step-128", "step-192", "step-64"]

    train1, evals1 = metrics(first)
    train2, evals2 = metrics(second)
    assert [r["step"] for r in train1] == list(range(1, 13))
    # the resumed run starts after the checkpoint, with the counters of the first run
    assert [r["step"] for r in train2] == list(range(5, 13))
    assert [r["counters/examples"] for r in train2] == [r["counters/examples"] for r in train1[4:]]

    later = train1[4:]
    # the learning rate continues the warmup instead of starting it again
    assert [r["lr"] for r in train2] == pytest.approx([r["lr"] for r in later], rel=1e-6)
    assert train2[0]["lr"] > train1[0]["lr"]
    for a, b in zip(later, train2, strict=True):
        for key in ("loss/train", "rewards_train/margins", "logps_train/chosen", "logps_train/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key, a[key], b[key])
    # the comparison means something: the policy moved between the checkpoint and the end
    assert abs(later[-1]["loss/train"] - later[0]["loss/train"]) > 1e-3
    assert train2[0]["logps_train/chosen"] != pytest.approx(train1[0]["logps_train/chosen"], rel=1e-4)

    # the evals after the resume point agree too (the first run also evaluated at 0 and 64)
    by_examples = {r["counters/examples"]: r for r in evals1}
    assert [r["counters/examples"] for r in evals2] == [128, 192]
    for r in evals2:
        assert r["loss/eval"] == pytest.approx(by_examples[r["counters/examples"]]["loss/eval"], rel=1e-5)

    # and so do the final weights
    assert os.readlink(second / "LATEST") == "step-192"
    w1 = torch.load(first / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)["state"]
    w2 = torch.load(second / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)["state"]
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
