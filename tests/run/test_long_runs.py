"""Multi-day jobs that survive, tried as a user would: 2 CPU ranks through the real launcher, ZeRO-3.

A hung rank is reported and the job ends; a NaN run stops with its cause and LATEST untouched; a
killed or preempted run resumed with resume_from=auto gives exactly the uninterrupted run's losses
and weights; a resume with a changed config stops naming the key; old checkpoints are rotated out.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, TINY, check, deepspeed_cmd, env, metrics, run_many, run_train, small_demo

pytestmark = pytest.mark.integration

# 48 pairs, batch 16: 3 steps per epoch, 12 steps; a checkpoint every 2 steps (6 saves), 2 kept
BASE = [
    "--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", "loss.beta=0.1", *TINY, "n_epochs=4",
    "lr=1e-3", "warmup_steps=4", "eval_every=100000", "do_first_eval=false",
    "checkpoint.save_every=2", "checkpoint.keep_last=2", "resume_from=auto",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """The runs that train to their end, behind one launcher run: the uninterrupted run every interrupted
    one must reproduce, and the one epoch the NaN test continues. {name: run_dir}."""
    root = tmp_path_factory.mktemp("runs")
    todo = {
        "straight": [*BASE, f"datasets=[{data}]", f"run_dir={root / 'straight'}"],
        "one epoch": [*BASE, f"datasets=[{data}]", f"run_dir={root / 'one epoch'}", "n_epochs=1"],
    }
    run_many(root / "logs", todo)
    return {name: root / name for name in todo}


@pytest.fixture(scope="module")
def straight(runs):
    return runs["straight"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss/train"]) for r in metrics(run_dir)[0]]


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)["state"]


def _assert_same_run(run_dir: Path, straight: Path) -> None:
    # each step logged once, and every loss and the final weights exactly the uninterrupted run's
    assert _losses(run_dir) == _losses(straight)
    a, b = _final_state(run_dir), _final_state(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _as_from_a_terminal() -> None:
    """SIGINT back to its default in the job: a test run in the background of a non-interactive shell (a
    CI script's `cmd &`) inherits SIGINT ignored, and a Python that starts with it ignored never raises
    KeyboardInterrupt, so the runner would shrug off the SIGINT a test sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        deepspeed_cmd(*args),
        env={**env(), **(extra_env or {})},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )


def _rank_pids(run_dir: Path) -> dict[int, int]:
    """The training processes of the job writing run_dir, by local rank (from /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            args = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"run_dir={run_dir}" in args and any(a.endswith("train.py") for a in args):
            for a in args:
                if a.startswith("--local_rank="):
                    out[int(a.split("=", 1)[1])] = int(p.name)
    return out


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            steps = [
                json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()
            ]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def test_hung_rank_ends_the_job_with_stacks(tmp_path, data):
    run_dir = tmp_path / "run"
    proc = _start(*BASE, f"datasets=[{data}]", f"run_dir={run_dir}", "n_epochs=1000",
                  "step_timeout_s=10", "dist_timeout_s=20")  # fmt: skip
    stopped = None
    try:
        _wait_for_step(run_dir, 3, proc)
        stopped = _rank_pids(run_dir)[1]
        os.kill(stopped, signal.SIGSTOP)  # hangs, does not die: its peer waits in a collective
        t0 = time.time()
        code, out = _finish(proc, timeout=120)
        elapsed = time.time() - t0
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    assert code != 0
    # rank 0 trips after the 10 s step deadline; the launcher then kills the stopped rank (its grace 30 s)
    assert elapsed < 60, elapsed
    report = (run_dir / "hang-rank0.txt").read_text()
    assert "rank 0 hung: training step" in report and "last collective it entered:" in report
    assert 'File "' in report and "Thread" in report  # every thread's stack
    assert "watchdog: rank 0 hung" in out


def test_nan_run_stops_and_latest_keeps_finite_weights(data, runs):
    run_dir = runs["one epoch"]  # this test's alone
    latest = os.readlink(run_dir / "LATEST")
    # the same run, continued with an lr that blows the weights up (allowed, as a user would)
    proc = run_train(*BASE, f"datasets=[{data}]", f"run_dir={run_dir}", "n_epochs=3", "lr=1e30",
                     "resume.allow_changes=[lr]", "guard.max_bad_steps=2", "checkpoint.save_every=0")  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "resume: lr: 0.001 -> 1e+30 (allowed by resume.allow_changes)" in proc.stderr
    assert "steps in a row with a non-finite loss or gradient norm" in proc.stderr
    assert "LATEST still names" in proc.stderr
    assert os.readlink(run_dir / "LATEST") == latest
    state = _final_state(run_dir)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    bad = [r for r in metrics(run_dir)[0] if r.get("guard/bad_steps")]
    assert bad and bad[-1]["guard/bad_steps"] == 2


def test_sigkill_at_a_random_step_then_resume_auto(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    args = [*BASE, f"datasets=[{data}]", f"run_dir={run_dir}"]
    proc = _start(*args)
    _wait_for_step(run_dir, random.Random(os.getpid()).randint(3, 9), proc)
    os.kill(_rank_pids(run_dir)[1], signal.SIGKILL)
    code, _ = _finish(proc, timeout=60)
    assert code != 0
    check(run_train(*args))  # the same command: resume_from=auto picks LATEST up
    _assert_same_run(run_dir, straight)


def test_sigkill_during_a_save_then_resume_auto(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    args = [*BASE, f"datasets=[{data}]", f"run_dir={run_dir}"]
    # rank 1 dies in its 3rd save (step 6): policy.pt written, its DeepSpeed shards not
    proc = _start(*args, extra_env={"DPO_DS_TEST_KILL_IN_SAVE": "1:3"})
    code, _ = _finish(proc, timeout=120)
    assert code != 0
    assert not (run_dir / "step-96" / "COMPLETE").exists() and os.readlink(run_dir / "LATEST") == "step-64"
    check(run_train(*args))
    _assert_same_run(run_dir, straight)
    assert [p.name for p in sorted(run_dir.glob("step-*"))] == [
        "step-160",
        "step-192",
    ]  # nothing partial left


def test_sigterm_saves_and_exits_0_then_resumes(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    args = [*BASE, f"datasets=[{data}]", f"run_dir={run_dir}"]
    proc = _start(*args)
    _wait_for_step(run_dir, 5, proc)
    for pid in _rank_pids(run_dir).values():  # as slurm signals every task
        os.kill(pid, signal.SIGTERM)
    code, out = _finish(proc, timeout=60)
    assert code == 0, out[-3000:]
    assert "preempted at step" in out
    step = int(out.split("preempted at step ")[1].split()[0])
    assert os.readlink(run_dir / "LATEST") == f"step-{16 * step}"
    assert "(SIGTERM): saved; continue with resume_from=auto" in out  # the step it names was saved
    check(run_train(*args))
    _assert_same_run(run_dir, straight)


def test_resume_with_a_changed_batch_size_names_the_key(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir, symlinks=True)
    proc = run_train(*BASE, f"datasets=[{data}]", f"run_dir={run_dir}", "batch_size=32")
    assert proc.returncode == 2
    assert "cannot change on resume: batch_size: 16 -> 32" in proc.stderr
    proc = run_train(
        *BASE, f"datasets=[{data}]", f"run_dir={run_dir}", "resume_from=" + str(run_dir / "step-999")
    )
    assert proc.returncode == 2 and "step-999 does not exist" in proc.stderr


def test_rotation_keeps_two_step_dirs(straight):
    # 6 saves (every 2 of 12 steps) with keep_last=2: two complete step dirs, LATEST the newest
    assert sorted(p.name for p in straight.glob("step-*")) == ["step-160", "step-192"]
    assert os.readlink(straight / "LATEST") == "step-192"
    assert all((straight / d / "COMPLETE").is_file() for d in ("step-160", "step-192"))
    assert not list(straight.glob("*.tmp")) and not list(straight.glob(".*tmp*"))


def test_a_real_checkpoint_damaged_at_its_own_size_is_skipped_by_its_checksum(tmp_path, straight, caplog):
    from dpo_ds.engine.checksum import file_digest
    from dpo_ds.run import dir as run_dirs
    from dpo_ds.run import resume as run_resume
    from tests.engine.test_checksum import flip_middle

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir, symlinks=True)
    newest, older = run_dir / "step-192", run_dir / "step-160"
    # every file of a step dir has the checksum computed as it was written, equal to the file's
    state = run_dirs.read_run_state(newest)
    sums = state[run_dirs.CHECKSUMS]
    assert set(sums) == set(state[run_dirs.MANIFEST]) and any(rel.endswith("optim_states.pt") for rel in sums)
    assert all(file_digest(newest / rel) == digest for rel, digest in sums.items())
    # an optimizer shard of LATEST and policy.pt of the step before, each with 16 bytes flipped at its own size
    shard = next(newest.rglob("*optim_states.pt"))
    flip_middle(shard)
    flip_middle(older / "policy.pt")
    assert run_dirs.verify(newest) == [] and run_dirs.verify(older) == []  # sizes and zip directories pass
    with pytest.raises(run_dirs.ArchiveError) as e:
        run_resume.resolve_resume("auto", run_dirs.RunDir(run_dir))
    assert f"step-192: {shard} does not match the checksum" in str(e.value)
    assert f"step-160: {older / 'policy.pt'} does not match the checksum" in str(e.value)
    # with policy.pt whole again, the older step is where auto resumes, naming the shard it skipped
    flip_middle(older / "policy.pt")
    with caplog.at_level("WARNING", logger="dpo_ds"):
        assert run_resume.resolve_resume("auto", run_dirs.RunDir(run_dir)) == older.resolve()
    assert "resuming from step-160" in caplog.text and shard.name in caplog.text


def test_slurm_script_preempts_requeues_and_resumes(tmp_path, data, straight):
    """launch/slurm.sbatch with stand-ins for srun and scontrol: USR1 (slurm's warning before the time
    limit) reaches the ranks, which save and exit 0; the script requeues the job; the requeued job
    (the same script) resumes from LATEST and ends exactly where the uninterrupted run does."""
    import sys

    from dpo_ds.dist.launcher import free_port

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n'
    )
    (fake / "scontrol").write_text(
        '#!/usr/bin/env bash\ncase "$1" in\n  show) echo localhost ;;\n  requeue) echo "$2" > "$FAKE_SLURM/requeued" ;;\nesac\n'
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    work = tmp_path / "submit"
    work.mkdir()
    for name in ("dpo_ds", "ds_configs"):
        (work / name).symlink_to(ROOT / name)
    run_dir = tmp_path / "run"
    slurm_env = {
        **env(),
        "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(work),
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "4242",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "FAKE_SLURM": str(tmp_path),
    }
    args = [*BASE[2:], f"datasets=[{data}]", f"run_dir={run_dir}"]  # the script passes --ds itself

    def sbatch() -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(ROOT / "launch/slurm.sbatch"), *args],
            cwd=work, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    proc = sbatch()
    _wait_for_step(run_dir, 4, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    code, out = _finish(proc, timeout=90)
    assert code == 0, out[-3000:]
    assert "preempted at step" in out and "requeueing job 4242" in out
    assert (tmp_path / "requeued").read_text().strip() == "4242"
    (tmp_path / "requeued").unlink()
    code, out = _finish(sbatch(), timeout=120)  # the requeued job
    assert code == 0, out[-3000:]
    assert not (tmp_path / "requeued").exists()
    _assert_same_run(run_dir, straight)
