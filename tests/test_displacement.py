"""The failure reward accuracy hides, reproduced through the launcher on the demo: DPO without the
demo's anchor pairs and RPO term drives the chosen answers' likelihood down while train reward
accuracy reaches 1 and greedy accuracy collapses; the guard fires there and stops the run. On the
shipped demo config it stays silent. Both from a shortened SFT stage (300 of the demo's 1200 steps).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.launch import ROOT, check, metrics, run_train

pytestmark = pytest.mark.integration
DEMO = ROOT / "dpo_ds" / "demo" / "data"
COMMON = ["--ds", str(ROOT / "ds_configs/zero3.json"), "eval.n_checked=64", "n_eval_examples=128"]
GUARD = ["guard.max_chosen_drop_per_token=0.5", "guard.action=stop"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    check(run_train(*COMMON, "--config", str(ROOT / "configs/demo_sft.yaml"), f"run_dir={run_dir}",
                    "n_examples=38400", timeout=600))  # fmt: skip
    return run_dir / "LATEST" / "policy.pt"


def test_guard_stops_the_collapsing_run(tmp_path, sft):
    data = tmp_path / "no_anchors"
    data.mkdir()
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["carry"]))
    (data / "test.jsonl").write_text((DEMO / "test.jsonl").read_text())
    run_dir = tmp_path / "dpo"
    proc = check(run_train(*COMMON, "--config", str(ROOT / "configs/demo_dpo.yaml"), f"run_dir={run_dir}",
                           f"model.archive={sft}", f"datasets=[{data}]", "loss.chosen_nll_weight=0", *GUARD))  # fmt: skip
    assert "guard: stopping at step" in proc.stderr + proc.stdout
    train, _ = metrics(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [r for r in rows if "guard/stopped" in r]
    assert stop["step"] < 100 and "likelihood displacement" in stop["guard/stopped"]
    assert train[-1]["step"] == stop["step"] and train[-1]["guard/displacement"] == 1.0
    assert train[-1]["rewards_train/accuracies"] > 0.9  # what reward accuracy alone would have said
    assert train[-1]["logps_train/chosen_shift_per_token"] < -0.5
    assert os.readlink(run_dir / "LATEST") == f"step-{64 * stop['step']}"  # saved where it stopped


def test_guard_is_silent_on_the_demo_config(tmp_path, sft):
    run_dir = tmp_path / "dpo"
    proc = check(run_train(*COMMON, "--config", str(ROOT / "configs/demo_dpo.yaml"), f"run_dir={run_dir}",
                           f"model.archive={sft}", "n_examples=3200", "eval_every=1600", *GUARD))  # fmt: skip
    assert "guard:" not in proc.stderr + proc.stdout
    train, evals = metrics(run_dir)
    assert len(train) == 50 and not any(r.get("guard/displacement") for r in train + evals)
    # the checker's greedy accuracy rises with DPO here (the metric the demo's table reports)
    assert evals[-1]["eval/checker_score"] > evals[0]["eval/checker_score"] + 0.1
