"""Sizes in messages: one formatter (dist.memory.format_bytes) in the unit each size reaches, so a failed
save on a small run says "200.00 KiB", never "0.00 GiB"."""

import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from dpo_ds.dist.memory import format_bytes
from dpo_ds.run import save
from dpo_ds.run.dir import RunDir


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (200 * 1024, "200.00 KiB"),
        (2**20 - 1, "1.00 MiB"),  # rounds up into the next unit, never "1024.00 KiB"
        (3 * 2**20 + 2**19, "3.50 MiB"),
        (5 * 2**30, "5.00 GiB"),
        (2**40, "1.00 TiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_no_space_message_in_fitting_units(tmp_path, monkeypatch):
    """The save that would not fit names the sizes in KiB / MiB on a small run (it said 0.00 GiB)."""
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**30, 2**30 - 100 * 1024, 100 * 1024))
    monkeypatch.setattr(save, "across_ranks", lambda values: torch.tensor([values]))  # a world of one
    ckpt = save.Checkpointer(RunDir(tmp_path), SimpleNamespace(), {}, rank=0)
    ckpt.last_bytes = 3 * 2**20  # 3 MiB, the last checkpoint's size
    with pytest.raises(save.SaveError) as e:
        ckpt._check_space(tmp_path / "step-8")
    msg = str(e.value)
    assert "the last checkpoint took 3.00 MiB and rank 0 sees 100.00 KiB free" in msg
    assert "free 2.90 MiB more" in msg and "GiB" not in msg
    ckpt.last_bytes = 50 * 1024  # fits: nothing raised
    ckpt._check_space(tmp_path / "step-8")
