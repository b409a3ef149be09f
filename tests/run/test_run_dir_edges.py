"""The run directory's edges without a launcher: its lock, verified checkpoints, writes that fail inside
DeepSpeed's save, the resume suggestions, rows that must be refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dpo_ds.config import ConfigError, load_config, to_dict
from dpo_ds.run import archive as archives
from dpo_ds.run import dir as run_dirs
from dpo_ds.run import lock as run_lock
from dpo_ds.run import resume as run_resume
from dpo_ds.run.dir import ArchiveError, RunDir
from dpo_ds.run.lock import RunDirLocked, RunLock

# ----------------------------------------------------------------------------- the lock


def _write_lock(run: RunDir, **holder) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    run.lock.write_text(json.dumps(holder))


def test_one_job_per_run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    first = RunLock(run)
    assert first.acquire() is None and run.lock.is_file()
    holder = json.loads(run.lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # a second job (here: another process, as flock is per open file) is refused, naming the lock
    probe = (
        "import sys; from dpo_ds.run.dir import RunDir; from dpo_ds.run.lock import RunLock, RunDirLocked\n"
        "try:\n    RunLock(RunDir(sys.argv[1])).acquire()\nexcept RunDirLocked as e:\n    print(e); sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(run.root)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{run.root} is in use by another job (pid {os.getpid()}" in proc.stdout
    assert f"its lock is {run.lock}" in proc.stdout and "delete" in proc.stdout
    first.release()
    assert not run.lock.exists()
    proc = subprocess.run([sys.executable, "-c", probe, str(run.root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout  # free again


def test_a_killed_jobs_lock_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as a SIGKILLed job leaves its lock
    _write_lock(run, host=socket.gethostname(), pid=dead.pid, started="then")
    lock = RunLock(run)
    note = lock.acquire()
    assert note and f"took over the stale lock {run.lock} of pid {dead.pid}" in note and "pid is gone" in note
    assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_full_disk_at_start_leaves_no_lock_behind(tmp_path, monkeypatch):
    # found by bench/soak.py: the lock file was created, its write hit ENOSPC, and the empty file then read
    # as "a job starting now" to every restart for 90 s after the disk was freed
    from dpo_ds.run.lock import RunDirUnwritable

    run = RunDir(tmp_path / "run")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(
        RunDirUnwritable, match=r"config key 'run_dir': cannot write its lock .*RUN_LOCK .*No space"
    ):
        RunLock(run).acquire()
    assert not run.lock.exists()
    # taking over a stale lock on a full disk: refused alike, and the stale file goes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(run, host=socket.gethostname(), pid=dead.pid, started="then")
    with pytest.raises(RunDirUnwritable):
        RunLock(run).acquire()
    assert not run.lock.exists()
    monkeypatch.undo()  # the disk freed: the next start takes the lock at once
    lock = RunLock(run)
    assert lock.acquire() is None and json.loads(run.lock.read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_lock(run, host="node-elsewhere", pid=1, started="then")
    with pytest.raises(RunDirLocked, match="heartbeat is 0 s old"):
        RunLock(run).acquire()
    old = time.time() - run_lock.STALE_LOCK_S - 5
    os.utime(run.lock, (old, old))
    lock = RunLock(run)
    assert "no heartbeat for" in lock.acquire()
    lock.heartbeat()
    assert time.time() - run.lock.stat().st_mtime < 5
    lock.release()


def test_a_lock_being_written_is_not_stale(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    run.lock.write_text("")  # created, its holder not written yet
    with pytest.raises(RunDirLocked, match="being written by a job starting now"):
        RunLock(run).acquire()


# ----------------------------------------------------------------------------- verified checkpoints


def _checkpoint(run: RunDir, examples: int, files: dict[str, bytes]) -> object:
    d = run.step(examples)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    manifest = {rel: len(data) for rel, data in files.items()}
    run_dirs.mark_complete(
        d, {"step": examples // 16, "config": {}, "world": 2, "data": "d", run_dirs.MANIFEST: manifest}
    )
    return d


def _torch_file(tmp_path, name: str) -> bytes:
    import torch

    path = tmp_path / name
    torch.save({"w": torch.arange(100)}, path)
    return path.read_bytes()


def test_verify_and_auto_falls_back_to_the_newest_good_checkpoint(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    policy = _torch_file(tmp_path, "p.pt")
    shard = _torch_file(tmp_path, "s.pt")
    files = {"policy.pt": policy, "ds/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt": shard}
    good, newest = _checkpoint(run, 32, files), _checkpoint(run, 64, files)
    run_dirs.point_latest(run.root, newest)
    assert run_dirs.verify(good) == [] and run_resume.resolve_resume("auto", run) == newest.resolve()
    # the newest policy.pt cut to half: auto resumes from the one before, saying which and why
    (newest / "policy.pt").write_bytes(policy[: len(policy) // 2])
    assert f"is {len(policy) // 2} bytes, its save wrote {len(policy)}" in run_dirs.verify(newest)[0]
    with caplog.at_level("WARNING", logger="dpo_ds"):
        assert run_resume.resolve_resume("auto", run) == good.resolve()
    assert "resuming from step-32, the newest checkpoint that passes" in caplog.text
    assert "step-64: " in caplog.text and "policy.pt is" in caplog.text
    # a resume_from naming it is refused, naming the file
    with pytest.raises(ArchiveError, match=r"step-64 fails its check: .*policy.pt is \d+ bytes"):
        run_resume.resolve_resume(str(newest), run)
    # a shard gone from every checkpoint: nothing passes, every problem named
    for d in (good, newest):
        (d / "ds/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        ArchiveError, match=r"no checkpoint in .* passes.*step-64.*step-32: .*optim_states.pt is missing"
    ):
        run_resume.resolve_resume("auto", run)


def test_a_file_damaged_at_its_own_size_is_skipped_by_its_checksum(tmp_path, caplog):
    from dpo_ds.engine.checksum import file_digest
    from tests.engine.test_checksum import flip_middle

    run = RunDir(tmp_path / "run")
    files = {
        "policy.pt": _torch_file(tmp_path, "p.pt"),
        "ds/ds/mp_rank_00_optim_states.pt": _torch_file(tmp_path, "s.pt"),
    }
    good, newest = _checkpoint(run, 32, files), _checkpoint(run, 64, files)
    for d in (good, newest):  # the checksums a save records
        state = run_dirs.read_run_state(d)
        run_dirs.mark_complete(d, {**state, run_dirs.CHECKSUMS: {rel: file_digest(d / rel) for rel in files}})
    run_dirs.point_latest(run.root, newest)
    for rel in files:
        flip_middle(newest / rel)
        # its size and zip directory pass: only the checksum sees it
        assert run_dirs.verify(newest) == []
        problems = run_dirs.verify(newest, checksums=True)
        assert len(problems) == 1 and f"{rel} does not match the checksum its save recorded" in problems[0]
        assert "damaged at its own size" in problems[0]
        caplog.clear()
        with caplog.at_level("INFO", logger="dpo_ds"):
            assert run_resume.resolve_resume("auto", run) == good.resolve()
        assert "resuming from step-32, the newest checkpoint that passes" in caplog.text
        assert f"step-64: {newest / rel} does not match the checksum" in caplog.text
        assert "GiB of step-64 to compare each file with the checksum" in caplog.text
        assert "checkpoint.verify_checksums=false skips this read" in caplog.text
        # checkpoint.verify_checksums=false: sizes only, so the damaged step is taken (what the key trades)
        assert run_resume.resolve_resume("auto", run, checksums=False) == newest.resolve()
        with pytest.raises(ArchiveError, match="step-64 fails its check: .*does not match the checksum"):
            run_resume.resolve_resume(str(newest), run)
        if rel == "policy.pt":  # model.archive= and export read it: refused too, not loaded with its damage
            with pytest.raises(ArchiveError, match="model.archive=.*policy.pt does not match the checksum"):
                archives.read_archive(newest / "policy.pt")
        else:  # the damage is elsewhere: policy.pt passes its checksum and is loaded (this fake has no 'state')
            with pytest.raises(ArchiveError, match="has no 'state' key"):
                archives.read_archive(newest / "policy.pt")
        flip_middle(newest / rel)  # inverted twice: whole again
        assert run_dirs.verify(newest, checksums=True) == []


def test_steps_auto_skipped_are_set_aside_so_rotation_keeps_the_good_one(tmp_path):
    run = RunDir(tmp_path / "run")
    files = {"policy.pt": _torch_file(tmp_path, "p.pt")}
    good, damaged = _checkpoint(run, 32, files), _checkpoint(run, 48, files)
    cut = run.step(64)
    cut.mkdir()  # a save killed before COMPLETE
    run_dirs.point_latest(run.root, damaged)
    moved = run_dirs.set_aside_newer(run, good.resolve())
    assert sorted(p.name for p in moved) == ["step-48.rejected", "step-64.rejected"]
    assert run.latest_target() == good.resolve() and [p.name for _, p in run.step_dirs()] == ["step-32"]
    # the resumed run saves step-48 again and rotates with keep_last=2: the good step-32 stays, the set-aside
    # dirs go (left in place, the damaged step-48 and a newer one would have been "the two newest")
    again = _checkpoint(run, 48, files)
    run_dirs.point_latest(run.root, again)
    gone = run_dirs.rotate(run, keep_last=2)
    assert sorted(p.name for p in gone) == ["step-48.rejected", "step-64.rejected"]
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith("step-")) == ["step-32", "step-48"]
    assert run_dirs.set_aside_newer(run, again.resolve()) == []  # nothing newer: nothing moves


def test_a_same_size_file_that_is_no_torch_file_fails(tmp_path):
    run = RunDir(tmp_path / "run")
    policy = _torch_file(tmp_path, "p.pt")
    d = _checkpoint(run, 16, {"policy.pt": policy})
    (d / "policy.pt").write_bytes(b"\0" * len(policy))
    assert "no readable zip directory" in run_dirs.verify(d)[0]
    with pytest.raises(ArchiveError, match="no readable zip directory"):
        archives.read_archive(d / "policy.pt")


def test_checkpoints_from_before_manifests_still_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    d = run.step(16)
    (d / "ds").mkdir(parents=True)
    run_dirs.mark_complete(d, {"step": 1, "config": {}, "world": 2, "data": "d"})
    run_dirs.point_latest(run.root, d)
    assert run_dirs.verify(d) == [] and run_resume.resolve_resume("auto", run) == d.resolve()


def test_failed_writes_inside_deepspeed_are_recorded_not_raised(tmp_path, monkeypatch):
    from dpo_ds.engine.io import _GuardedWrites

    class Inner:
        def save(self, state, path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[Errno 28] No space left on device")

        def commit(self, info):
            return "committed"

    guard = _GuardedWrites(Inner(), rank=1, save_index=1)
    target = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert guard.save({}, str(target)) is None and not target.exists()  # the partial file removed
    assert guard.errors == [f"{target}: RuntimeError: [Errno 28] No space left on device"]
    assert (
        guard.save({}, str(tmp_path / "next.pt")) is None and len(guard.errors) == 1
    )  # skipped, not retried
    assert guard.commit(None) == "committed"  # everything else goes to the real engine
    copy = guard.guard(lambda path: (_ for _ in ()).throw(OSError(28, "No space left on device")), "copying")
    copy("x")
    assert "copying: OSError" in guard.errors[-1]


# ----------------------------------------------------------------------------- resume suggestions


def test_changed_data_suggests_a_key_that_exists():
    base = {"step": 4, "world": 2, "data": "old", "config": to_dict(load_config(None, []))}
    new = to_dict(load_config(None, []))
    with pytest.raises(ConfigError) as e:
        run_resume.check_resume(base, new, "new", 2, [])
    assert "resume.allow_changes=[data]" in str(e.value)
    assert run_resume.check_resume(base, new, "new", 2, ["data"]) == [
        "data (token ids of the training data): changed"
    ]


# ----------------------------------------------------------------------------- rows refused


def _load(tmp_path, lines: list[str]):
    from dpo_ds.data.sources import load_source

    path = tmp_path / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return load_source(str(path), "train", str(tmp_path / "cache")), path


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_an_empty_response_is_refused_naming_the_row(tmp_path, field):
    from dpo_ds.data.sources import DataError

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    rows[1][field] = "  "
    with pytest.raises(
        DataError, match=rf"train.jsonl row 1 \(0-based\): field '{field}' must be a non-empty response"
    ):
        _load(tmp_path, [json.dumps(r) for r in rows])
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": ""}],
    }
    with pytest.raises(
        DataError, match=r"row 0 \(0-based\): field 'rejected\[0\].content' must be a non-empty"
    ):
        _load(tmp_path, [json.dumps(conv)])


def test_a_null_line_is_named_as_null(tmp_path):
    from dpo_ds.data.sources import DataError

    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    with pytest.raises(DataError, match=r"train.jsonl row 1 \(0-based\) is null: its line holds `null`"):
        _load(tmp_path, [good, "null", good])
