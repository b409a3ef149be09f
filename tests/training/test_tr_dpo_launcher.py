"""TR-DPO (model.reference_sync_steps) through the real launcher on 2 CPU ranks: the hard update in every
placement pair dpo_ds's JSONs allow makes each step's loss ln 2 (the reference is the policy the step starts
from), the soft update moves the reference from the first sync on and not before, and a run resumed from a
checkpoint between syncs is the straight run, step for step."""

from __future__ import annotations

import math

import pytest

from tests.launch import ROOT, TINY, metrics, run_many, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
HARD = ["model.reference_sync_steps=1", "model.reference_mixup_alpha=1"]
SOFT = ["model.reference_sync_steps=2", "model.reference_mixup_alpha=0.6"]
# placement: (DeepSpeed JSON, extra keys) -> policy stage / reference stage
PLACEMENTS = {
    "zero3/zero3": ("zero3.json", []),
    "zero3/zero0": ("zero3.json", ["model.reference_zero_stage=0"]),
    "zero2/zero3": ("zero2.json", ["model.reference_zero_stage=3"]),
    "zero2/zero0": ("zero2.json", []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = small_demo(tmp_path_factory.mktemp("data"))
    root = tmp_path_factory.mktemp("runs")

    def run(name, *extra, ds="zero3.json"):
        return [
            "--ds", str(ROOT / "ds_configs" / ds), *TINY, f"datasets=[{data}]", f"run_dir={root / name}",
            "lr=1e-2", "warmup_steps=0", "do_first_eval=false", "eval_every=100000", *extra,
        ]  # fmt: skip

    todo = {f"hard {p}": run(f"hard {p}", *HARD, *keys, ds=ds) for p, (ds, keys) in PLACEMENTS.items()}
    todo.update({
        "frozen": run("frozen", "n_epochs=2"),
        "soft": run("soft", *SOFT, "n_epochs=2"),
        # resume between syncs: the first 3 steps (a sync after step 2), then steps 4-6 from its checkpoint
        "half": run("half", *SOFT),
        "resumed": run("half", *SOFT, "n_epochs=2", "resume_from=auto"),
    })  # fmt: skip
    logs = run_many(root / "logs", todo, timeout=1500)
    return {name: (root / name, logs[name]) for name in todo}  # "resumed" writes into half's run dir


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_hard_update_makes_every_step_start_at_ln2(runs, placement):
    train, evals = metrics(runs[f"hard {placement}"][0])
    assert [r["reference/syncs"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["loss/train"] == pytest.approx(LN2, abs=1e-6), (placement, r["step"])
        assert r["logps_train/ref_chosen"] == pytest.approx(r["logps_train/chosen"], abs=1e-5), placement
    # the final eval: the reference is the final policy, but the displacement is measured from the initial one
    last = evals[-1]
    assert last["logps_eval/ref_chosen"] == pytest.approx(last["logps_eval/chosen"], abs=1e-5), placement
    assert abs(last["logps_eval/chosen_shift_per_token"]) > 1e-3, placement


def test_soft_update_moves_the_reference_from_the_first_sync(runs):
    frozen, _ = metrics(runs["frozen"][0])
    soft, _ = metrics(runs["soft"][0])
    assert [r.get("reference/syncs") for r in soft] == [None, 1, None, 2, None, 3]
    for x, y in zip(frozen[:2], soft[:2], strict=True):  # before the first sync: the same run
        assert (
            x["loss/train"] == y["loss/train"] and x["logps_train/ref_chosen"] == y["logps_train/ref_chosen"]
        )
    for x, y in zip(frozen[2:], soft[2:], strict=True):  # after it: the reference has moved toward the policy
        assert abs(x["logps_train/ref_chosen"] - y["logps_train/ref_chosen"]) > 1e-3, x["step"]


def test_resume_between_syncs_is_the_straight_run(runs):
    straight, _ = metrics(runs["soft"][0])
    resumed, _ = metrics(runs["half"][0])  # the first half's steps, then the resumed run's, in one file
    assert "resumed from" in runs["resumed"][1]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 7))
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss/train", "grad_norm", "logps_train/ref_chosen"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    # the final eval's displacement, from the initial reference's log-probs the first half kept
    last = metrics(runs["soft"][0])[1][-1], metrics(runs["half"][0])[1][-1]
    assert last[0]["logps_eval/chosen_shift_per_token"] == last[1]["logps_eval/chosen_shift_per_token"]
