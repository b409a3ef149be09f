"""TR-DPO (model.reference_sync_steps) through the real launcher on 2 CPU ranks: the hard update in every
placement pair dpo_ds's JSONs allow makes each step's loss ln 2 (the reference is the policy the step starts
from), the soft update moves the reference from the first sync on and not before, and a run killed (SIGKILL) and
resumed from its checkpoint between syncs is the straight run, step for step; with LoRA's reference adapter
too."""

from __future__ import annotations

import math

import pytest

from tests.launch import ROOT, TINY, check, metrics, run_many, run_train, small_demo
from tests.run.test_long_runs import _finish, _start

pytestmark = pytest.mark.integration
LN2 = math.log(2)
HARD = ["model.reference_sync_steps=1", "model.reference_mixup_alpha=1"]
SOFT = ["model.reference_sync_steps=2", "model.reference_mixup_alpha=0.6"]
LORA = ["model.lora.r=8", "model.lora.alpha=16"]
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
        # LoRA: the reference adapter (the base plus a frozen delta), hard and soft
        "lora hard": run("lora hard", *LORA, *HARD),
        "lora soft": run("lora soft", *LORA, *SOFT, "n_epochs=2"),
    })  # fmt: skip
    logs = run_many(root / "logs", todo, timeout=1500)
    out = {name: (root / name, logs[name]) for name in todo}
    # SIGKILL mid-run: rank 1 dies in its 2nd save (step 6; the one of step 3 is LATEST, a sync after step 2
    # in it), then the same command resumes from LATEST: steps 4-6 again, a sync after step 4
    for prefix, extra in (("", []), ("lora ", LORA)):
        args = run(
            f"{prefix}killed", *extra, *SOFT, "n_epochs=2", "checkpoint.save_every=3", "resume_from=auto"
        )
        code, text = _finish(_start(*args, extra_env={"DPO_DS_TEST_KILL_IN_SAVE": "1:2"}), timeout=300)
        assert code != 0, text[-3000:]
        resumed = check(run_train(*args, timeout=300))
        out[f"{prefix}killed"] = (root / f"{prefix}killed", resumed.stdout + resumed.stderr)
    return out


@pytest.mark.parametrize("placement", [*PLACEMENTS, "lora"])
def test_hard_update_makes_every_step_start_at_ln2(runs, placement):
    train, evals = metrics(runs[f"hard {placement}" if placement != "lora" else "lora hard"][0])
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


@pytest.mark.parametrize("prefix", ["", "lora "])
def test_resume_after_sigkill_is_the_straight_run(runs, prefix):
    straight, _ = metrics(runs[prefix + "soft"][0])
    resumed, _ = metrics(runs[prefix + "killed"][0])  # steps 1-3, then the resumed run's 4-6, each once
    assert "resumed from" in runs[prefix + "killed"][1]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 7))
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss/train", "grad_norm", "logps_train/ref_chosen"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    # the final eval's displacement, from the initial reference's log-probs the first half kept
    last = metrics(runs[prefix + "soft"][0])[1][-1], metrics(runs[prefix + "killed"][0])[1][-1]
    assert last[0]["logps_eval/chosen_shift_per_token"] == last[1]["logps_eval/chosen_shift_per_token"]
