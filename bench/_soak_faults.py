"""The soak's fault injector (bench/soak.py): each kind of fault the job must survive, as a function that
injects it and says what it did. Seeded by the soak; every fault is logged by the caller with its time,
attempt and step."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench._soak_job import Job, rank_pids, train_steps

# Faults on a running job, then the ones applied while it is down (before the next start).
RUNNING = (
    "kill_rank", "kill_node", "stop_rank", "term_job", "int_runner", "fill_disk", "kill_in_save",
    "kill_in_resume",
)  # fmt: skip
DOWN = ("damage_file",)
KINDS = RUNNING + DOWN
# faults that end the attempt (the job exits, or the supervisor ends it); fill_disk may or may not
ENDS_JOB = {"kill_rank", "kill_node", "stop_rank", "term_job", "int_runner", "kill_in_save", "kill_in_resume"}


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _ranks(run_dir: Path, job: Job, wait: float = 30) -> dict[int, int]:
    """The job's rank pids, waiting (up to `wait` s) until both exist."""
    deadline = time.time() + wait
    while time.time() < deadline and None in job.codes():
        pids = rank_pids(run_dir)
        if len(pids) == 2:
            return pids
        time.sleep(0.05)
    return rank_pids(run_dir)


class Injector:
    """One fault at a time on the job of `run_dir`; each returns a sentence saying what it did ('' when the
    job was gone before it could)."""

    def __init__(self, rng: random.Random, run_dir: Path, disk: Path | None, stop_flag):
        self.rng = rng
        self.run_dir = run_dir
        self.disk = disk  # the run dir's own tmpfs (root), or None: an injected ENOSPC instead
        self.stopping = stop_flag  # callable: the soak is ending, give up waiting
        self.next_env: dict[str, str] = {}  # for the next start (the injected ENOSPC)
        self.filler: Path | None = None
        self.damaged: set[Path] = set()  # step dirs damaged so far

    def running(self, kind: str, job: Job) -> str:
        return getattr(self, kind)(job)

    def kill_rank(self, job: Job) -> str:
        pids = _ranks(self.run_dir, job)
        if not pids:
            return ""
        r = self.rng.choice(sorted(pids))
        return f"SIGKILL rank {r} (pid {pids[r]})" if _signal(pids[r], signal.SIGKILL) else ""

    def kill_node(self, job: Job) -> str:
        r = self.rng.choice((0, 1))
        job.kill_node(r)
        return f"SIGKILL node {r}: its launcher (pid {job.procs[r].pid}) and its rank"

    def stop_rank(self, job: Job) -> str:
        pids = _ranks(self.run_dir, job)
        if not pids:
            return ""
        r = self.rng.choice(sorted(pids))
        # the other rank's watchdog must end the job; the supervisor SIGKILLs what is left, as slurm would
        return f"SIGSTOP rank {r} (pid {pids[r]})" if _signal(pids[r], signal.SIGSTOP) else ""

    def term_job(self, job: Job) -> str:
        pids = _ranks(self.run_dir, job)
        sent = [r for r, pid in sorted(pids.items()) if _signal(pid, signal.SIGTERM)]
        return f"SIGTERM ranks {sent} (preemption: save and exit 0)" if sent else ""

    def int_runner(self, job: Job) -> str:
        """SIGINT one node's `deepspeed` runner alone, once this start has written a training record: its
        ranks see their runner gone and save and exit. (A runner that dies alone in the seconds before the
        ranks' watchdog starts is not seen: the job trains on without it; a Ctrl-C in a terminal reaches the
        whole process group instead.)"""
        deadline = time.time() + 60
        while (
            time.time() < deadline and not self.stopping() and None in job.codes() and not self._trained(job)
        ):
            time.sleep(0.05)
        r = self.rng.choice((0, 1))
        if job.procs[r].poll() is not None or not self._trained(job):
            return ""
        return (
            f"SIGINT the runner of node {r} (pid {job.procs[r].pid})"
            if _signal(job.procs[r].pid, signal.SIGINT)
            else ""
        )

    def _trained(self, job: Job) -> bool:
        """Whether this start has trained a step (past where it resumed, its log says)."""
        text = job.log_text(0)  # one read per poll (every 0.05 s)
        resumed = job.resumed_at(text)
        if resumed is None and "starting from the beginning" not in text:
            return False
        steps = train_steps(self.run_dir)
        return bool(steps) and steps[-1][0] > (resumed or 0)

    def kill_in_save(self, job: Job) -> str:
        """SIGKILL a rank while a step dir exists without COMPLETE (inside a save)."""
        deadline = time.time() + 60
        while time.time() < deadline and not self.stopping():
            if None not in job.codes():
                return ""
            for p in self.run_dir.glob("step-*"):
                if p.name[5:].isdigit() and not (p / "COMPLETE").exists():
                    pids = rank_pids(self.run_dir)
                    if pids:
                        r = self.rng.choice(sorted(pids))
                        if _signal(pids[r], signal.SIGKILL):
                            return f"SIGKILL rank {r} inside the save of {p.name} (no COMPLETE yet)"
            time.sleep(0.002)
        return ""

    def kill_in_resume(self, job: Job) -> str:
        """SIGKILL a rank on the resume's first log line (its checksum read, or 'resumed from')."""
        deadline = time.time() + 30
        while time.time() < deadline and not self.stopping():
            if None not in job.codes():
                return ""
            text = job.log_text(0)
            if "resume: read" in text or "resumed from" in text:
                pids = rank_pids(self.run_dir)
                if pids:
                    r = self.rng.choice(sorted(pids))
                    line = "resume: read" if "resume: read" in text else "resumed from"
                    if _signal(pids[r], signal.SIGKILL):
                        return f"SIGKILL rank {r} on the log line '{line} ...' (inside the resume)"
            time.sleep(0.01)
        return ""

    def fill_disk(self, job: Job) -> str:
        """Fill the run dir's filesystem (its tmpfs) to the last byte; free_disk() empties it later. Without a
        tmpfs (not root): the next start's first save on rank 0 fails as a full disk does."""
        if self.disk is None:
            self.next_env = {"DPO_DS_TEST_FAIL_WRITE": f"{self.rng.choice((0, 1))}:1:optim_states"}
            return f"injected ENOSPC for the next start ({self.next_env['DPO_DS_TEST_FAIL_WRITE']})"
        self.filler = self.disk / f"filler-{time.time():.0f}"
        subprocess.run(["dd", "if=/dev/zero", f"of={self.filler}", "bs=1M"], capture_output=True)
        free = shutil.disk_usage(self.disk).free
        return f"filled the run dir's tmpfs ({free} bytes left)"

    def free_disk(self) -> str:
        if self.filler is None:
            return ""
        self.filler.unlink(missing_ok=True)
        self.filler = None
        return f"freed the run dir's tmpfs ({shutil.disk_usage(self.disk).free} bytes free)"

    def damage_file(self) -> str:
        """While the job is down: truncate, delete or corrupt at its own size a file of the newest step."""
        latest = self.run_dir / "LATEST"
        if not latest.exists():
            return ""
        step = latest.resolve()
        # only while another kept checkpoint is whole: with checkpoint.keep_last=2, damaging both leaves
        # nothing to resume from, which the job refuses by name (exit 2) and no restart can mend
        whole = [
            p for p in self.run_dir.glob("step-*")
            if p.name[5:].isdigit() and (p / "COMPLETE").exists() and p.resolve() not in self.damaged
        ]  # fmt: skip
        if step in self.damaged or len(whole) < 2:
            return ""
        self.damaged.add(step)
        files = sorted(
            p for p in step.rglob("*") if p.is_file() and p.name not in ("COMPLETE", "run_state.json")
        )
        if not files:
            return ""
        target = self.rng.choice([p for p in files if p.suffix in (".pt", ".safetensors")] or files)
        how = self.rng.choice(("truncate", "delete", "corrupt"))
        data = target.read_bytes()
        if how == "truncate":
            target.write_bytes(data[: len(data) // 2])
        elif how == "delete":
            target.unlink()
        else:
            mid = len(data) // 2
            flipped = bytes(b ^ 0xFF for b in data[mid : mid + 16])
            target.write_bytes(data[:mid] + flipped + data[mid + 16 :])
        return f"{how} {target.relative_to(self.run_dir)} ({len(data)} bytes)"
