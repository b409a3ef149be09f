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
  each step, saves, and returns, so the job exits 0 with "preempted at step N".
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("dpo_ds")

EXIT_HANG = 3
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
MIN_STEP_TIMEOUT_S = 60.0
STEP_TIMEOUT_FACTOR = 10.0
CALIBRATION_STEPS = 3


class Watchdog:
    def __init__(self, rank: int, run_dir: Path, dist_timeout_s: float, step_timeout_s: float | None):
        self.rank = rank
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
        (the 'terminate called' aborts seen at exit came from gloo's threads: see engines.init_distributed)."""
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
    def phase(self, what: str, timeout_s: float | None = None):
        """Run a block under a deadline (timeout_s, or the step timeout)."""
        timeout = timeout_s if timeout_s is not None else self.step_timeout()
        start = time.monotonic()
        with self._lock:
            self._phase = (what, start, start + timeout)
        try:
            yield
        finally:
            with self._lock:
                self._phase = None
            if timeout_s is None and len(self._step_times) < CALIBRATION_STEPS:
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
            with self._lock:
                phase, collective, last = self._phase, self._collective, self._last_collective
            if collective is not None and now > collective[1] + self.dist_timeout_s:
                self._trip(f"collective {collective[0]} has not returned after {now - collective[1]:.0f} s "
                           f"(dist_timeout_s={self.dist_timeout_s:g})", phase, last)  # fmt: skip
            if phase is not None and now > phase[2]:
                self._trip(f"{phase[0]} has not finished after {now - phase[1]:.0f} s "
                           f"(deadline {phase[2] - phase[1]:.0f} s)", phase, last)  # fmt: skip

    def _trip(self, why: str, phase, last_collective: str) -> None:
        path = self.run_dir / f"hang-rank{self.rank}.txt"
        where = phase[0] if phase is not None else "outside a step"
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
        os._exit(EXIT_HANG)  # no clean-up: the other threads are stuck in a collective


class Preemption:
    """SIGTERM / SIGUSR1 -> a flag the trainer reads (and agrees on across ranks) after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> Preemption:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
