"""The failure reward accuracy hides, reproduced through the launcher on the demo: DPO without the
demo's anchor pairs and RPO term drives the chosen answers' likelihood down while train reward
accuracy reaches 1 and greedy accuracy collapses; the guard fires there and stops the run. On the
shipped demo config it stays silent. Both from a shortened SFT stage (300 of the demo's 1200 steps).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.launch import ROOT, metrics, run_many

pytestmark = pytest.mark.integration
DEMO = ROOT / "dpo_ds" / "demo" / "data"
COMMON = ["--ds", str(ROOT / "ds_configs/zero3.json"), "eval.n_checked=64", "n_eval_examples=128"]
GUARD = ["guard.max_chosen_drop_per_token=0.5", "guard.action=stop"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The SFT stage, then the two DPO runs from its archive, behind one launcher run:
    {name: (run_dir, log)}."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "no_anchors"
    data.mkdir()
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["carry"]))
    (data / "test.jsonl").write_text((DEMO / "test.jsonl").read_text())
    sft = root / "sft" / "LATEST" / "policy.pt"
    dpo = [*COMMON, "--config", str(ROOT / "configs/demo_dpo.yaml"), f"model.archive={sft}", *GUARD]
    todo = {
        "sft": [*COMMON, "--config", str(ROOT / "configs/demo_sft.yaml"), f"run_dir={root / 'sft'}", "n_examples=38400"],
        "collapsing": [*dpo, f"run_dir={root / 'collapsing'}", f"datasets=[{data}]", "loss.chosen_nll_weight=0"],
        "demo": [*dpo, f"run_dir={root / 'demo'}", "n_examples=3200", "eval_every=1600"],
    }  # fmt: skip
    logs = run_many(root / "logs", todo, timeout=1200)
    return {name: (root / name, logs[name]) for name in todo}


def test_guard_stops_the_collapsing_run(runs):
    run_dir, log = runs["collapsing"]
    assert "guard: stopping at step" in log
    train, _ = metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [r for r in rows if "guard/stopped" in r]
    assert stop["step"] < 100 and "likelihood displacement" in stop["guard/stopped"]
    assert train[-1]["step"] == stop["step"] and train[-1]["guard/displacement"] == 1.0
    assert train[-1]["rewards_train/accuracies"] > 0.9  # what reward accuracy alone would have said
    assert train[-1]["logps_train/chosen_shift_per_token"] < -0.5
    assert os.readlink(run_dir / "LATEST") == f"step-{64 * stop['step']}"  # saved where it stopped


def test_guard_is_silent_on_the_demo_config(runs):
    run_dir, log = runs["demo"]
    assert "guard:" not in log
    train, evals = metrics(run_dir)
    assert len(train) == 50 and not any(r.get("guard/displacement") for r in train + evals)
    # the checker's greedy accuracy rises with DPO here (the metric the demo's table reports)
    assert evals[-1]["eval/checker_score"] > evals[0]["eval/checker_score"] + 0.1
