"""Bad input through the real 2-rank `deepspeed` launcher: every rank stops at once with a message
naming the key, file, row or field -- no hang in a collective, no checkpoint written, no run dir left.

Four launcher runs, each a few seconds of imports before the error; a hang fails the test through
subprocess.TimeoutExpired.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.launch import ROOT, run_train, small_demo

pytestmark = pytest.mark.integration
TIMEOUT = 120
FAST = 90  # seconds; a run that gets this far has hung somewhere before giving up
COMMON = [
    "model.name_or_path=tiny",
    "loss=dpo",
    "batch_size=16",
    "eval_batch_size=16",
    "n_eval_examples=32",
    "max_length=16",
    "max_prompt_length=8",
]


def _fails(tmp_path, *args: str, ds: str | None = None, data=None) -> str:
    """Run the launcher with bad input; return its combined output after checking it failed fast."""
    run_dir = tmp_path / "run"
    data = data or small_demo(tmp_path / "data")
    t0 = time.monotonic()
    proc = run_train(
        "--ds",
        ds or str(ROOT / "ds_configs/zero3.json"),
        f"run_dir={run_dir}",
        f"datasets=[{data}]",
        f"data.cache_dir={tmp_path / 'hf_cache'}",
        *COMMON,
        *args,
        timeout=TIMEOUT,
    )
    wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    # train.main exits 2 on a user error; the launcher passes the failing rank's code on
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{out[-4000:]}"
    assert wall < FAST, f"took {wall:.0f} s to fail"
    assert "dpo_ds: error:" in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]  # a user error is a message, not a stack trace
    # nothing that looks like a checkpoint: inputs are checked before any engine or output exists
    assert not (run_dir / "LATEST").exists() and not (run_dir / "LATEST").is_symlink()
    assert not list(run_dir.glob("step-*"))
    # and no empty run dir left behind: the one this launch made (lock, config files, token cache) goes
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    return out


def _error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "dpo_ds: error:" in line]


def test_unknown_config_key(tmp_path):
    out = _fails(tmp_path, "loss.betta=0.1")
    lines = _error_lines(out)
    assert lines and all("loss.betta" in line for line in lines), out[-4000:]
    assert "unknown config key" in lines[0]


def test_archive_without_state(tmp_path):
    archive = tmp_path / "policy.pt"
    torch.save({"step_idx": 16, "metrics": {}, "model_state": {}}, archive)
    out = _fails(tmp_path, f"model.archive={archive}")
    line = _error_lines(out)[0]
    assert str(archive) in line and "'state'" in line, line


def test_bad_pairs_row(tmp_path):
    data = small_demo(tmp_path / "data")
    train = data / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    bad_row = 5
    rows[bad_row]["pairs"] = [[0, 7]]  # index 7 into 2 responses
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _fails(tmp_path, data=data)
    line = _error_lines(out)[0]
    assert str(train) in line and f"row {bad_row}" in line and "'pairs'" in line, line
    assert "[[0, 7]]" in line  # what it got


def test_ds_json_contradicts_batch_size(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["train_batch_size"] = 7
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    out = _fails(tmp_path, ds=str(path))
    line = _error_lines(out)[0]
    assert "train_batch_size" in line and str(path) in line and "7" in line and "16" in line, line


def test_model_dir_without_weights(tmp_path):
    """config.json and a tokenizer, no weights (an interrupted download): refused on every rank, naming
    the directory and the key that asks for a random start, instead of training from noise."""
    import shutil

    from dpo_ds.model.files import SHIPPED_MODELS

    model = tmp_path / "downloaded"
    shutil.copytree(SHIPPED_MODELS["tiny"], model)
    out = _fails(tmp_path, f"model.name_or_path={model}")
    # both ranks say it (their stderr lines can interleave on one line of the launcher's output)
    assert out.count(f"dpo_ds: error: model.name_or_path={model} holds no weights") == 2, out[-4000:]
    assert "set model.init=random to train from a random initialisation on purpose" in _error_lines(out)[0]
