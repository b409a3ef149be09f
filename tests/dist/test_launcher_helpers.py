"""The launcher helpers the benches share: polling a run's metrics for its training steps, and saying
which modules a launched run needs but cannot import."""

import json
import subprocess
import sys
import time

from dpo_ds.dist.launcher import missing_modules, train_records, wait_for_train_steps


def _write(path, records, partial=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + partial)


def test_train_records_skips_eval_and_half_written_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert train_records(path) == []
    _write(path, [{"loss/train": 0.7}, {"loss/eval": 0.6}, {"loss/train": 0.5}], partial='{"loss/tr')
    assert [r["loss/train"] for r in train_records(path)] == [0.7, 0.5]


def test_wait_returns_ok_once_the_steps_are_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"loss/train": 1.0}, {"loss/train": 0.9}])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        records, status = wait_for_train_steps(proc, path, 2, time.time() + 10)
    finally:
        proc.kill()
        proc.wait()
    assert status == "ok" and len(records) == 2


def test_wait_reports_an_early_exit_with_its_code_and_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"loss/train": 1.0}])
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    records, status = wait_for_train_steps(proc, path, 5, time.time() + 30)
    assert status == "exited with 3 after 1 steps" and len(records) == 1


def test_wait_times_out_on_a_run_that_writes_nothing(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        records, status = wait_for_train_steps(proc, tmp_path / "metrics.jsonl", 1, time.time() + 1)
    finally:
        proc.kill()
        proc.wait()
    assert status == "timed out" and records == []


def test_missing_modules_names_each_one_and_why():
    assert missing_modules(("json", "socket")) is None
    msg = missing_modules(("json", "dpo_ds_no_such_module", "also_not_there"))
    assert msg.startswith("not importable: dpo_ds_no_such_module (ModuleNotFoundError")
    assert "also_not_there (ModuleNotFoundError" in msg and "json" not in msg
