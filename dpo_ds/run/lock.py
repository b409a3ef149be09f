"""One job per run directory: the lock rank 0 takes before anything is written there."""

from __future__ import annotations

import json
import os
import time

from dpo_ds.run.dir import RunDir


class RunDirLocked(ValueError):
    """Another job holds the run directory's lock; the message names the lock file and its holder."""


class RunDirUnwritable(ValueError):
    """The run directory's lock cannot be written (a full disk, no permission); names the file and the error."""


STALE_LOCK_S = 90.0


class RunLock:
    """One owner per run directory, taken by rank 0 before anything is written there.

    {run_dir}/RUN_LOCK holds its holder (host, pid, start, slurm job, command). The holder keeps an
    exclusive flock on it for the job's life and refreshes its mtime every LOCK_HEARTBEAT_S. A second
    job finds it and is refused, naming the file and the holder. A lock is stale, and taken over with
    a warning, when its flock is free and either its holder ran on this host and that pid is gone (a
    flock dies with its process, so a SIGKILLed job leaves a free one), or, held from another host
    (a shared filesystem, where flock may not reach across hosts), its heartbeat is older than
    STALE_LOCK_S. The holder removes it when the job ends."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning to log when a stale one was taken over. Raises
        RunDirLocked when a live job holds it."""
        import fcntl
        import socket

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            fd = None
        except OSError as e:
            raise RunDirUnwritable(self._unwritable(e)) from None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours; a checker that opened it meanwhile lets go at once
            if os.fstat(fd).st_size:  # a checker took it over as stale before this flock: it is theirs
                os.close(fd)
                raise RunDirLocked(self._refusal(self._holder(), "it took the lock over as this job began"))
            self._claim(fd)
            return None
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(self._refusal(self._holder(), "its holder is running")) from None
        holder = self._holder()
        age = time.time() - self.path.stat().st_mtime
        here = holder.get("host") == socket.gethostname()
        if not holder and age < STALE_LOCK_S:
            live = "it is being written by a job starting now"
        elif here and holder.get("pid") and pid_alive(holder["pid"]) and holder.get("pid") != os.getpid():
            live = "its holder's pid is alive on this host"
        elif not here and age < STALE_LOCK_S:
            live = f"its heartbeat is {age:.0f} s old (a job on another host)"
        else:
            live = ""
        if live:
            os.close(fd)
            raise RunDirLocked(self._refusal(holder, live))
        self._claim(fd)
        why = "its pid is gone" if here else f"no heartbeat for {age:.0f} s"
        return f"took over the stale lock {self.path} of {_describe(holder)} ({why})"

    def heartbeat(self) -> None:
        if self._fd is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def _claim(self, fd: int) -> None:
        import socket
        import sys

        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "command": " ".join(sys.argv)[:500],
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            # an empty lock with a free flock would read as "a job starting now" to the next start for
            # STALE_LOCK_S: the file goes (this process holds its flock, so it is no one else's)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(fd)
            raise RunDirUnwritable(self._unwritable(e)) from None
        self._fd = fd

    def _holder(self) -> dict:
        try:
            value = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _unwritable(self, e: OSError) -> str:
        return (
            f"config key 'run_dir': cannot write its lock {self.path} ({type(e).__name__}: {e}); free space on "
            f"the run dir's filesystem, or fix its permissions, and start again"
        )

    def _refusal(self, holder: dict, why: str) -> str:
        return (
            f"config key 'run_dir': {self.path.parent} is in use by another job ({_describe(holder)}; {why}): "
            f"its lock is {self.path}. Wait for that job to end or give this one another run_dir; if no job "
            f"uses the directory any more, delete {self.path} (a lock is also taken over by itself once its "
            f"holder's pid is gone on its host, or its heartbeat is older than {STALE_LOCK_S:.0f} s)"
        )


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    job = f", slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}{job}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a value we cannot check: assume alive
    return True
