"""A full disk while training (found by bench/soak.py): metrics.jsonl's append raised ENOSPC on rank 0 alone
and ended the job with a traceback. Its records are now held and written once the disk takes them, and no
checkpoint is saved while any is held, so a resume never skips a step's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_ds.config import CheckpointConfig, Config
from dpo_ds.run.dir import RunDir
from dpo_ds.run.save import Checkpointer
from dpo_ds.training.guards import TrainingStopped
from dpo_ds.training.trainer import MetricsSink


def test_records_are_held_while_the_disk_is_full_then_written_in_order(tmp_path, caplog):
    sink = MetricsSink(Config(), RunDir(tmp_path), rank=0)
    sink.path = Path("/dev/full")  # every write: ENOSPC
    with caplog.at_level("WARNING", logger="dpo_ds"):
        sink.write({"step": 1, "loss/train": 0.69})
        sink.write({"step": 2, "loss/train": 0.68})
    assert len(sink.pending) == 2 and "No space left on device" in sink.flush()
    assert caplog.text.count("cannot append") == 1  # said once, not every step
    sink.path = tmp_path / "metrics.jsonl"  # the disk has room again
    sink.write({"step": 3, "loss/train": 0.67})
    assert [json.loads(line)["step"] for line in sink.path.read_text().splitlines()] == [1, 2, 3]
    assert sink.flush() is None and not sink.pending
    assert MetricsSink(Config(), RunDir(tmp_path), rank=1).flush() is None  # other ranks hold nothing


def test_a_save_blocked_by_held_records_is_a_failed_save(tmp_path):
    settings = CheckpointConfig(max_failed_saves=2)
    ckpt = Checkpointer(RunDir(tmp_path), settings, {}, rank=0)
    why = "metrics.jsonl holds 2 record(s) the disk refused (OSError: [Errno 28] No space left on device)"
    assert ckpt.save(None, 4, 64, {}, blocked=why) is False and ckpt.failed_in_a_row == 1
    assert not (tmp_path / "step-64").exists()
    with pytest.raises(
        TrainingStopped, match="2 saves in a row failed at step 6: .*step-96: not begun: metrics"
    ):
        ckpt.save(None, 6, 96, {}, blocked=why)
