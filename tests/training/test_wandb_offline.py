"""Weights & Biases: offline logging works with no account and no network, and with wandb off (the
default) wandb is never even imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launch import ROOT, env, metrics, single_process_env, small_demo

# In a fresh interpreter, so that no other test has imported wandb already. Builds the sink the
# trainer builds and writes a record through it.
_NOT_IMPORTED = """
import sys
from pathlib import Path
from dpo_ds.config import load_config
from dpo_ds.run.dir import RunDir
from dpo_ds.training.trainer import MetricsSink
run_dir = Path(sys.argv[1])
cfg = load_config(None, sys.argv[2:])
sink = MetricsSink(cfg, RunDir(run_dir), rank=0)
sink.write({"step": 1, "loss/train": 0.5})
sink.close()
assert sink.wandb is None
assert (run_dir / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss/train": 0.5}'
print("wandb imported:", "wandb" in sys.modules)
"""


@pytest.mark.parametrize(
    "overrides", [[], ["wandb.enabled=true", "wandb.mode=disabled"]], ids=["default", "mode-disabled"]
)
def test_wandb_not_imported_when_disabled(tmp_path, overrides):
    proc = subprocess.run(
        [sys.executable, "-c", _NOT_IMPORTED, str(tmp_path), *overrides],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wandb imported: False" in proc.stdout, proc.stdout + proc.stderr[-4000:]


@pytest.mark.integration
def test_sft_run_logs_to_wandb_offline(tmp_path):
    data = small_demo(tmp_path / "data")
    run_dir = tmp_path / "run"
    e = single_process_env(
        **{
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(tmp_path / "wandb_dir"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
            "WANDB_SILENT": "true",
        }
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "dpo_ds" / "train.py"),
            "--ds",
            str(ROOT / "ds_configs/zero3.json"),
            "loss=sft",
            "exp_name=wandb_offline",
            f"run_dir={run_dir}",
            "model.name_or_path=tiny",
            f"datasets=[{data}]",
            "batch_size=8",
            "eval_batch_size=8",
            "n_epochs=1",
            "n_eval_examples=8",
            "max_length=16",
            "max_prompt_length=8",
            "wandb.enabled=true",
            "wandb.mode=offline",
            f"data.cache_dir={tmp_path / 'hf_cache'}",
        ],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"

    train, evals = metrics(run_dir)
    assert len(train) == 48 // 8  # one epoch of the 48 small_demo rows in batches of 8
    assert len(evals) == 2  # the first eval and the final one

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, (
        sorted(p.name for p in (run_dir / "wandb").iterdir()) if (run_dir / "wandb").is_dir() else None
    )
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0, sorted(p.name for p in runs[0].iterdir())
    # the record log (protobuf, uncompressed) holds the run's name and the metrics the trainer logged
    raw = logs[0].read_bytes()
    for name in (b"wandb_offline", b"loss/train", b"logps_train/chosen", b"loss/eval"):
        assert name in raw, name
