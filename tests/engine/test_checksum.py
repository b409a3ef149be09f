"""Checkpoint checksums (engine/checksum.py): computed while a file is written, they equal the digest of
the file read back, and a file damaged at its own size, which torch.load returns without a word, no longer
matches."""

from __future__ import annotations

import torch

from dpo_ds.engine import checksum
from dpo_ds.run.archive_writer import STATE, ArchiveWriter, TensorSpec


def flip_middle(path, n: int = 16) -> None:
    """n bytes in the middle of the file inverted: its size and zip directory stay as they were."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_save_torch_digest_is_the_files_and_it_loads(tmp_path):
    obj = {"w": torch.randn(64, 33), "step": 3, "names": ["a", "b"]}
    for zipped in (True, False):
        path = tmp_path / f"x{zipped}.pt"
        digest = checksum.save_torch(obj, path, _use_new_zipfile_serialization=zipped)
        assert digest.startswith("xxh3_128:") and digest == checksum.file_digest(path)
        assert checksum.take(path) == digest and checksum.take(path) is None  # taken once
        back = torch.load(path, weights_only=False)
        assert torch.equal(back["w"], obj["w"]) and back["names"] == ["a", "b"]


def test_archive_writer_hashes_while_it_writes_in_any_order(tmp_path):
    tensors = {"w": torch.randn(300, 7), "b": torch.randn(5).to(torch.bfloat16), "e": torch.zeros(0)}
    specs = [
        TensorSpec("w", (300, 7), torch.float32),
        TensorSpec("b", (5,), torch.bfloat16),
        TensorSpec("e", (0,), torch.float32),
        TensorSpec("tied", (300, 7), torch.float32, alias_of="w"),
    ]
    for order, in_order in ((["w", "b", "e"], True), (["b", "e", "w"], False)):
        path = tmp_path / "policy.pt"
        with ArchiveWriter(path, {"step_idx": 1, "state": STATE, "metrics": {}}, specs) as w:
            for name in order:
                w.write(name, tensors[name])
        # in file order it never read the file back; out of order it read it once at the end
        assert w._in_order is in_order
        assert w.digest == checksum.file_digest(path) == checksum.take(path)


def test_a_file_damaged_at_its_own_size_loads_silently_but_fails_its_checksum(tmp_path):
    path = tmp_path / "shard.pt"
    w = torch.arange(4096, dtype=torch.float32)
    digest = checksum.save_torch({"w": w}, path)
    size = path.stat().st_size
    flip_middle(path)
    assert path.stat().st_size == size
    back = torch.load(path, weights_only=True)["w"]  # no error: the damage is only in the numbers
    assert 0 < int((back != w).sum()) <= 5
    assert checksum.file_digest(path) != digest


def test_forget_under_drops_a_removed_step_dirs_entries(tmp_path):
    checksum.record(tmp_path / "step-16" / "policy.pt", "xxh3_128:00")
    checksum.record(tmp_path / "step-160" / "policy.pt", "xxh3_128:11")
    checksum.forget_under(tmp_path / "step-16")
    assert checksum.take(tmp_path / "step-16" / "policy.pt") is None
    assert checksum.take(tmp_path / "step-160" / "policy.pt") == "xxh3_128:11"
