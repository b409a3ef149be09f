"""Nothing lost at the edges, through the real launcher (2 CPU ranks, ZeRO-3), DPO from one SFT run:
two jobs on one run dir, a write that fails inside DeepSpeed's save, a corrupt checkpoint, an orphaned
launcher, a SIGTERM that finds a rank blocked in a collective."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dpo_ds.run import dir as run_dirs
from tests.launch import ROOT, TINY, check, metrics, run_many, run_train, small_demo
from tests.run.test_long_runs import _finish, _rank_pids, _start, _wait_for_step

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


CORRUPTED = ["n_epochs=2", "checkpoint.save_every=1", "resume_from=auto"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """One short SFT run (every DPO run below starts from its LATEST/policy.pt), then the first 3 steps
    of the run whose checkpoint is corrupted, behind one launcher run. {name: run_dir}."""
    root = tmp_path_factory.mktemp("runs")
    sft = root / "sft" / "LATEST" / "policy.pt"
    todo = {
        "sft": ["--ds", str(ROOT / "ds_configs/zero3.json"), "loss=sft", *TINY, f"datasets=[{data}]",
                f"run_dir={root / 'sft'}", "n_examples=32", "lr=1e-3", "warmup_steps=0", "do_first_eval=false"],
        "corrupted": [*_dpo(data, sft, root / "corrupted", *CORRUPTED), "n_examples=48"],  # a checkpoint a step
    }  # fmt: skip
    run_many(root / "logs", todo)
    return {name: root / name for name in todo}


@pytest.fixture(scope="module")
def sft(runs):
    return runs["sft"] / "LATEST" / "policy.pt"


def _dpo(data, sft, run_dir, *extra) -> list[str]:
    return [
        "--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", *TINY, f"datasets=[{data}]",
        f"model.archive={sft}", f"run_dir={run_dir}", "lr=1e-3", "warmup_steps=0", "eval_every=100000",
        "do_first_eval=false", *extra,
    ]  # fmt: skip


def _gone(pids, timeout: float) -> float:
    """Seconds until every pid is gone (or AssertionError after timeout)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
            return time.time() - t0
        time.sleep(0.2)
    raise AssertionError(f"ranks {pids} still running after {timeout} s")


def _state(pid) -> str:
    try:
        return (
            "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "run"
        )
    except OSError:
        return "zombie"


def test_a_second_job_on_a_run_dir_is_refused(tmp_path, data, sft):
    run_dir = tmp_path / "run"
    # the first job trains until it is preempted below: it outlasts the second job's start whatever the load
    args = _dpo(data, sft, run_dir, "n_epochs=1000", "checkpoint.save_every=2")
    first = _start(*args)
    try:
        deadline = time.time() + 60
        while not (run_dir / run_dirs.RUN_LOCK).exists():  # the first job holds the lock before it writes
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        second = run_train(*args, timeout=120)  # the same command, a few seconds later
        out = second.stdout + second.stderr
        assert second.returncode == 2, out[-3000:]
        lines = [line for line in out.splitlines() if "dpo_ds: error:" in line]
        assert len(lines) == 2 and all(
            f"its lock is {run_dir / run_dirs.RUN_LOCK}" in line for line in lines
        ), out[-3000:]
        assert "is in use by another job (pid" in lines[0]
        assert first.poll() is None  # refused while the first job ran
        _wait_for_step(run_dir, 3, first)
        for pid in _rank_pids(run_dir).values():  # preempted: it saves where it is and exits 0
            os.kill(pid, signal.SIGTERM)
        code, log = _finish(first, timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 0 and "preempted at step" in log, log[-3000:]
    train, _ = metrics(run_dir)
    steps = [r["step"] for r in train]
    assert (
        steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    )  # each step once: nobody else wrote here
    latest = run_dir.joinpath("LATEST").resolve()
    assert (
        latest.name == f"step-{16 * steps[-1]}"
        and run_dirs.verify(latest) == []
        and run_dirs.is_complete(latest)
    )
    # a save every 2 steps and the preemption's, all kept (keep_last=0): no other job's step dir
    saved = {f"step-{16 * k}" for k in range(2, steps[-1] + 1, 2)} | {latest.name}
    assert sorted(p.name for _, p in run_dirs.RunDir(run_dir).step_dirs()) == sorted(saved)
    assert not (run_dir / run_dirs.RUN_LOCK).exists()  # released at the end


def test_a_write_failing_inside_deepspeeds_save_takes_the_named_path(tmp_path, data, sft):
    """Rank 1's optimizer shard hits a full disk in its 2nd save, inside DeepSpeed's save_checkpoint:
    every rank takes the named path (no gloo abort, no exit 250), LATEST stays, the partial step dir
    goes, and with checkpoint.max_failed_saves=1 the run stops with exit 3 (train.py's stop code)."""
    run_dir = tmp_path / "run"
    proc = _start(*_dpo(data, sft, run_dir, "n_epochs=2", "checkpoint.save_every=2", "checkpoint.max_failed_saves=1"),
                  extra_env={"DPO_DS_TEST_FAIL_WRITE": "1:2:optim_states"})  # fmt: skip
    code, out = _finish(proc, timeout=180)
    assert code == 3, out[-4000:]
    assert "exits with return code = 250" not in out and "EnforceNotMet" not in out
    errors = [line for line in out.splitlines() if "save failed" in line]
    assert len(errors) == 1, out[-4000:]  # logged once, by rank 0, naming the rank and the file
    assert (
        "rank 1:" in errors[0] and "optim_states.pt" in errors[0] and "No space left on device" in errors[0]
    )
    assert "LATEST still names" in errors[0] and "step-32" in errors[0]
    stopped = [line for line in out.splitlines() if "dpo_ds: stopped:" in line]
    assert len(stopped) == 2 and all("LATEST names" in line for line in stopped), out[-4000:]
    assert run_dir.joinpath("LATEST").resolve().name == "step-32"
    assert not (run_dir / "step-64").exists()  # the partial step dir is gone
    assert run_dirs.verify(run_dir / "step-32") == []


def test_a_corrupt_newest_checkpoint_is_not_resumed_from(tmp_path, data, sft, runs):
    run_dir = runs["corrupted"]  # steps 1-3, a checkpoint after each (this test's alone)
    args = _dpo(data, sft, run_dir, *CORRUPTED)
    newest = run_dir / "step-48"
    assert run_dir.joinpath("LATEST").resolve() == newest.resolve()
    policy = newest / "policy.pt"
    policy.write_bytes(policy.read_bytes()[: policy.stat().st_size // 2])
    proc = check(run_train(*args))  # resume_from=auto: from step-32, saying why
    out = proc.stdout + proc.stderr
    assert "resuming from step-32, the newest checkpoint that passes its check" in out
    assert "step-48:" in out and "policy.pt is" in out and "cut short or overwritten" in out
    train, _ = metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # step 3 replayed once, its first record dropped
    # one rank's optimizer shard gone: a resume naming that checkpoint is refused, naming the file
    shard = next((run_dir / "step-64" / "ds").glob("zero_pp_rank_1_*optim_states.pt"))
    shard.unlink()
    bad = run_train(*_dpo(data, sft, tmp_path / "other", f"resume_from={run_dir / 'step-64'}"))
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2, out[-3000:]
    lines = [line for line in out.splitlines() if "dpo_ds: error:" in line]
    assert len(lines) == 2 and all(f"{shard} is missing" in line for line in lines), out[-3000:]
    assert "Traceback" not in out and "Connection closed by peer" not in out


def test_sigint_to_the_runner_alone_stops_every_rank(tmp_path, data, sft):
    """A SIGINT to the `deepspeed` runner's pid kills it and orphans launch.py and the ranks: each rank
    sees its launcher gone, saves like a preemption, and exits."""
    run_dir = tmp_path / "run"
    proc = _start(*_dpo(data, sft, run_dir, "n_epochs=1000", "checkpoint.save_every=3"))
    try:
        _wait_for_step(run_dir, 4, proc)
        ranks = list(_rank_pids(run_dir).values())
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGINT)  # the runner only, as a job script or tmux might
        # the runner's own way out (KeyboardInterrupt, then its interpreter's teardown) is DeepSpeed's and
        # Python's: what is timed is the ranks, from the moment it is gone (a CI run once saw the runner
        # still there 15 s after the signal)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the deepspeed runner did not exit within 60 s of a SIGINT") from None
        elapsed = _gone(ranks, timeout=15)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < 15
    assert "the deepspeed runner (pid" in out and "is gone: saving and exiting" in out, out[-3000:]
    latest = run_dir.joinpath("LATEST").resolve()
    state = json.loads((latest / run_dirs.RUN_STATE).read_text())
    assert run_dirs.verify(latest) == [] and state["step"] >= 4  # saved on the way out, verified
    assert not (run_dir / run_dirs.RUN_LOCK).exists()


def test_sigterm_ends_a_rank_blocked_in_a_collective(tmp_path, data, sft):
    """Rank 1 stopped (SIGSTOP): rank 0 waits in a collective, where Python's SIGTERM handler cannot run.
    A SIGTERM to rank 0 ends it about TERM_GRACE_S later, not at the launcher's SIGKILL 30 s on."""
    from dpo_ds.dist.watchdog import EXIT_TERMINATED, TERM_GRACE_S

    run_dir = tmp_path / "run"
    proc = _start(*_dpo(data, sft, run_dir, "n_epochs=1000", "step_timeout_s=600", "dist_timeout_s=600"))
    stopped = None
    try:
        _wait_for_step(run_dir, 3, proc)
        pids = _rank_pids(run_dir)
        stopped = pids[1]
        os.kill(stopped, signal.SIGSTOP)
        time.sleep(2)  # rank 0 reaches the next collective and waits there
        os.kill(pids[0], signal.SIGTERM)
        t0 = time.time()
        _gone([pids[0]], timeout=TERM_GRACE_S + 10)
        elapsed = time.time() - t0
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        code, out = _finish(proc, timeout=60)
    assert TERM_GRACE_S - 1 < elapsed < TERM_GRACE_S + 5, elapsed
    assert "SIGTERM arrived" in out and "waits inside a collective" in out, out[-3000:]
    assert f"exits with return code = {EXIT_TERMINATED}" in out or code != 0
