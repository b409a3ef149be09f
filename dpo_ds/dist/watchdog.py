"""A rank that hangs must not hang the job: deadlines on every step and every collective, and
preemption signals turned into a save and a clean exit.

Watchdog
  A thread per rank. The trainer runs each training step inside `phase(...)` with a deadline
  (step_timeout_s: given, or 10x the slowest of the first steps, at least 60 s); every collective of
  torch.distributed (DeepSpeed's included, which calls torch.distributed) runs under dist_timeout_s.
  When a deadline passes, the rank writes every thread's stack (faulthandler) to
  run_dir/hang-rank{r}.txt, logs the phase, the step and the collective it was in, and exits with
  code 3; the deepspeed launcher then ends the job. A rank that is stopped (SIGSTOP, a dead GPU
  driver) cannot report itself; the ranks waiting for it do.

Preemption
  SIGTERM and SIGUSR1 (slurm's --signal) set a flag; the trainer agrees on it across ranks after
  each step, saves, and returns, so the job exits 0 with "preempted at step N". A launcher that is
  gone counts as one: the watchdog watches the rank's launcher processes (deepspeed's launch.py and
  its runner, or torchrun) and, when one of them dies (a SIGINT to the runner alone orphans the job),
  requests the same save and exit, within a second. A SIGTERM that finds the rank blocked in a
  collective (a peer died or stopped; the launcher is ending the job) cannot run Python's handler:
  the watchdog sees it through the signal wakeup fd and ends the rank TERM_GRACE_S later if the
  collective has not returned, instead of leaving the launcher to wait 30 s and SIGKILL it.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("dpo_ds")

EXIT_HANG = 3
EXIT_TERMINATED = 128 + signal.SIGTERM  # a SIGTERM that found the rank blocked in a collective
TERM_GRACE_S = 10.0
# torch.distributed calls that block until every rank takes part
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "monitored_barrier",
)
# how often the run dir's lock (run/lock.py) is refreshed while the job lives: the watchdog's thread does it
LOCK_HEARTBEAT_S = 20.0
MIN_STEP_TIMEOUT_S = 60.0
STEP_TIMEOUT_FACTOR = 10.0
CALIBRATION_STEPS = 3


class Watchdog:
    def __init__(
        self,
        rank: int,
        run_dir: Path,
        dist_timeout_s: float,
        step_timeout_s: float | None,
        heartbeat=None,
        preemption: Preemption | None = None,
    ):
        self.rank = rank
        self.heartbeat = heartbeat  # rank 0: refreshes the run dir's lock (run/lock.py's RunLock)
        self._last_beat = 0.0
        self.preemption = preemption  # the launcher's death requests a save and exit through it
        self._launchers = launcher_processes()  # [(pid, start time, what)] to watch
        self._parent = os.getppid()
        self._term_at: float | None = None
        self.run_dir = Path(run_dir)
        self.dist_timeout_s = dist_timeout_s
        self.step_timeout_s = step_timeout_s  # None: calibrated from the first steps
        self._step_times: list[float] = []
        self._lock = threading.Lock()
        self._phase: tuple[str, float, float] | None = None  # (what, started, deadline)
        self._collective: tuple[str, float] | None = None  # (name, started); deadline = + dist_timeout
        self._last_collective = "none yet"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dpo_ds-watchdog", daemon=True)

    # ------------------------------------------------------------------ what the rank is doing

    def start(self) -> Watchdog:
        self._wrap_collectives()
        self._thread.start()
        atexit.register(self.stop)  # every exit path, errors included, ends the thread first
        return self

    def stop(self) -> None:
        """End the thread before the interpreter finalizes, so no thread of ours is still running then
        (the 'terminate called' aborts seen at exit came from gloo's threads: see dist.comm.init_distributed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def step_timeout(self) -> float:
        if self.step_timeout_s is not None:
            return self.step_timeout_s
        if len(self._step_times) < CALIBRATION_STEPS:
            return self.dist_timeout_s  # not calibrated yet: the first steps compile, warm up, allocate
        return max(MIN_STEP_TIMEOUT_S, STEP_TIMEOUT_FACTOR * max(self._step_times))

    @contextmanager
    def phase(self, what: str, timeout_s: float | None = None, deadline: bool = True):
        """Run a block under a deadline (timeout_s, or the step timeout), or with deadline=False only
        named (a save, an eval: what a hang report says the rank was doing; every collective in it keeps
        its dist_timeout_s)."""
        timeout = math.inf if not deadline else timeout_s if timeout_s is not None else self.step_timeout()
        start = time.monotonic()
        with self._lock:
            self._phase = (what, start, start + timeout)
        try:
            yield
        finally:
            with self._lock:
                self._phase = None
            if deadline and timeout_s is None and len(self._step_times) < CALIBRATION_STEPS:
                self._step_times.append(time.monotonic() - start)

    def _wrap_collectives(self) -> None:
        import torch.distributed as dist

        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "_dpo_ds_watched", False):
                continue

            def watched(*args, __fn=fn, __name=name, **kwargs):
                with self._lock:
                    self._collective = (__name, time.monotonic())
                    self._last_collective = __name + (" (async)" if kwargs.get("async_op") else "")
                try:
                    return __fn(*args, **kwargs)
                finally:
                    with self._lock:
                        self._collective = None

            watched._dpo_ds_watched = True
            setattr(dist, name, watched)

    # ------------------------------------------------------------------ the watching thread

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if self.heartbeat is not None and now - self._last_beat >= LOCK_HEARTBEAT_S:
                self._last_beat = now
                self.heartbeat()
            if self.preemption is not None:
                self._watch_launchers()
                if self._term_at is None and signal.SIGTERM in self.preemption.arrived():
                    self._term_at = now
            with self._lock:
                phase, collective, last = self._phase, self._collective, self._last_collective
            if self._term_at is not None:
                handled = self.preemption.term_handled_at
                if (handled is None or handled < self._term_at) and now - self._term_at > TERM_GRACE_S:
                    # Python's handler has not run since: the main thread is stuck inside C code (a
                    # collective or its wait(), whatever issued it)
                    self._trip(f"SIGTERM arrived {now - self._term_at:.0f} s ago and the rank has not run Python "
                               f"since: it waits inside a collective", phase, last, EXIT_TERMINATED)  # fmt: skip
                if collective is not None and now - max(self._term_at, collective[1]) > TERM_GRACE_S:
                    self._trip(f"SIGTERM arrived while it waited in collective {collective[0]}, which has not "
                               f"returned {now - max(self._term_at, collective[1]):.0f} s later", phase, last,
                               EXIT_TERMINATED)  # fmt: skip
            if collective is not None and now > collective[1] + self.dist_timeout_s:
                self._trip(f"collective {collective[0]} has not returned after {now - collective[1]:.0f} s "
                           f"(dist_timeout_s={self.dist_timeout_s:g})", phase, last)  # fmt: skip
            if phase is not None and now > phase[2]:
                self._trip(f"{phase[0]} has not finished after {now - phase[1]:.0f} s "
                           f"(deadline {phase[2] - phase[1]:.0f} s)", phase, last)  # fmt: skip

    def _watch_launchers(self) -> None:
        """A launcher that is gone (or a new parent: this rank was orphaned) requests a save and exit."""
        if self.preemption.requested:
            return
        gone = [what for pid, started, what in self._launchers if _start_time(pid) != started]
        if not gone and os.getppid() != self._parent:
            gone = [f"the parent process {self._parent}"]
        if gone:
            log.warning(f"rank {self.rank}: {gone[0]} is gone: saving and exiting, as on a preemption")
            self.preemption.request(f"{gone[0]} gone")

    def _trip(self, why: str, phase, last_collective: str, code: int = EXIT_HANG) -> None:
        path = self.run_dir / f"hang-rank{self.rank}.txt"
        where = phase[0] if phase is not None else "between steps"
        message = (
            f"rank {self.rank} hung: {why}; in: {where}; last collective it entered: {last_collective}. "
            f"Another rank has probably stopped or died; every thread's stack is in {path}"
        )
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(message + "\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as e:
            message += f" (could not write {path}: {e})"
        log.error(f"dpo_ds: watchdog: {message}")
        for h in logging.getLogger().handlers + log.handlers:
            h.flush()
        os._exit(code)  # no clean-up: the other threads are stuck in a collective


LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun")
RUNNERS = ("bin/deepspeed", "deepspeed.launcher.runner")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None when it is gone
    (a zombie has exited too, only nobody has reaped it yet): a pid with another start time is another
    process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_processes() -> list[tuple[int, int, str]]:
    """(pid, start time, what) of the processes that launched this rank and whose death orphans it:
    the parent when it is a launcher (deepspeed's launch.py, torchrun), and its parent when that is
    deepspeed's runner (the `deepspeed` command). Nothing under a plain `python` or a shell."""
    out = []
    parent = os.getppid()
    if any(name in _cmdline(parent) for name in LAUNCHERS):
        out.append((parent, _start_time(parent), f"the launcher (pid {parent})"))
        runner = _parent_of(parent)
        if runner and any(name in _cmdline(runner) for name in RUNNERS):
            out.append((runner, _start_time(runner), f"the deepspeed runner (pid {runner})"))
    return out


class Preemption:
    """SIGTERM / SIGUSR1 -> a flag the trainer reads (and agrees on across ranks) after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._wakeup: int | None = None  # read end of the signal wakeup pipe (the watchdog reads it)
        self.term_handled_at: float | None = None  # when Python's handler last ran for a SIGTERM

    def install(self) -> Preemption:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        # the C-level handler writes each signal's number here at once, even while the main thread
        # waits inside a collective and Python's handler cannot run
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._wakeup = r
        return self

    def arrived(self) -> set[int]:
        """Signals delivered since the last call (read from the wakeup pipe; never blocks)."""
        if self._wakeup is None:
            return set()
        try:
            return set(os.read(self._wakeup, 1024))
        except BlockingIOError:
            return set()

    def request(self, why: str) -> None:
        self.requested = True
        self.signal_name = self.signal_name or why

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            self.term_handled_at = time.monotonic()
        self.request(signal.Signals(signum).name)
