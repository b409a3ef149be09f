"""A launch that fails before training on a user error leaves no empty run dir behind (runs/e2/, runs/e3/
...): the run dir it made goes, lock released; a directory that was there before, or one holding a
result, stays. In-process: claim_run_dir with rank 0's decision run here (a world of one)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpo_ds.cli import steps
from dpo_ds.config import ConfigError
from dpo_ds.run.dir import RunDir


@pytest.fixture
def world_of_one(monkeypatch):
    """Rank 0 decides here, as comm.decided_by_rank0 does with no other rank to tell."""
    monkeypatch.setattr(steps.comm, "decided_by_rank0", lambda decide, errors=(): decide())


def _claim(root, resume_from=None):
    return steps.claim_run_dir(SimpleNamespace(run_dir=str(root), resume_from=resume_from), rank=0)


def _leftovers(run_dir: RunDir) -> None:
    """What a start that failed in the data phase leaves: its config files and a token cache."""
    run_dir.config.write_text("lr: 1.0e-6\n")
    (run_dir.root / "token_cache").mkdir()
    (run_dir.root / "token_cache" / "shard-0.bin").write_bytes(b"\0" * 64)


def test_made_by_this_launch_is_removed_lock_released(tmp_path, world_of_one):
    root = tmp_path / "runs" / "e2"
    run_dir, lock, created = _claim(root)
    assert created and run_dir.lock.is_file()
    _leftovers(run_dir)
    assert steps.drop_unused_run_dir(run_dir, lock, created, rank=0)
    assert not root.exists() and (tmp_path / "runs").is_dir()  # only the run dir, never its parent
    assert lock._fd is None  # released: the exit handler has nothing left to do


def test_existing_dir_is_never_removed(tmp_path, world_of_one):
    root = tmp_path / "mine"
    root.mkdir()  # made by the user before the launch (or a run being resumed)
    (root / "notes.txt").write_text("keep me")
    run_dir, lock, created = _claim(root, resume_from="auto")
    assert not created
    assert not steps.drop_unused_run_dir(run_dir, lock, created, rank=0)
    assert (root / "notes.txt").read_text() == "keep me" and run_dir.lock.is_file()
    lock.release()


@pytest.mark.parametrize("result", ["LATEST", "step-8", "metrics.jsonl", "reference_logps.pt"])
def test_a_result_keeps_the_dir(tmp_path, world_of_one, result):
    run_dir, lock, created = _claim(tmp_path / "run")
    _leftovers(run_dir)
    if result == "LATEST":
        (run_dir.root / result).symlink_to("step-8")  # even a dangling one: never ours to judge
    elif result.startswith("step-"):
        (run_dir.root / result).mkdir()
    else:
        (run_dir.root / result).write_text("{}")
    assert run_dir.results() == [result]
    assert not steps.drop_unused_run_dir(run_dir, lock, created, rank=0)
    assert run_dir.root.is_dir() and run_dir.lock.is_file()
    lock.release()


def test_only_rank0_removes(tmp_path, world_of_one):
    run_dir, lock, created = _claim(tmp_path / "run")
    assert not steps.drop_unused_run_dir(run_dir, lock, created, rank=1)
    assert run_dir.root.is_dir()
    lock.release()


def test_a_taken_run_dir_is_refused_and_kept(tmp_path, world_of_one):
    root = tmp_path / "old"
    root.mkdir()
    (root / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        _claim(root)
    assert (root / "metrics.jsonl").is_file()
