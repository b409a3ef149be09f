"""An hour of faults: a supervisor restarts a 2-"node" dpo_ds job after every exit that is not success while
a seeded injector kills, stops, preempts, interrupts, fills and damages it; then the job runs to its end and
is compared with the same job run straight through.

    python bench/soak.py --minutes 60      # the fault window, split 3:1 between the two profiles below
    python bench/soak.py --quick           # a few minutes (CI): every check, fewer faults

The supervisor plays slurm's requeue (or a Kubernetes restart policy): it starts the job (two
`deepspeed --no_ssh --node_rank R` launchers on loopback, one rank each: bench/_soak_job.py) with
resume_from=auto, and when one "node" exits non-zero it gives the other 30 s to follow, then SIGKILLs what
is left, as slurm does with the other tasks of a failed step. A job that makes no progress for 180 s with
no fault pending, or fails 6 starts in a row without a step and without a fault, is a hang nobody caught: it is counted as
"needed a human" (the soak passes only with zero).

The faults (bench/_soak_faults.py), one kind at a time from a shuffled bag: SIGKILL a rank; SIGKILL a
whole node (its launcher and its rank); SIGSTOP a rank (the other rank's watchdog must end the job);
SIGTERM every rank (preemption: save, exit 0); SIGINT a runner; fill the run dir's filesystem (a tmpfs
mounted for the run when this runs as root, else an injected ENOSPC at the next start) for 15-40 s and free
it; SIGKILL a rank inside a save (a step dir without COMPLETE) or on the resume's first log line. While
the job is down, about one restart in three first truncates, deletes or corrupts at its own size a file of
the newest step. One fault in four lands within 10 s of a start.

Profiles: `full` (ZeRO-3, full parameters) and `lora_tr_dpo` (LoRA with TR-DPO: the moved reference
adapter is checkpointed too). Each job is sized (in steps) to outlast its fault window.

At the end, per profile: the final weights (policy.pt, or the adapter and the moved reference) equal the
straight run's bit for bit; metrics.jsonl holds every step exactly once with the straight run's losses; no
step dir is incomplete, set aside or unnamed; no process is left; the run dir never held more than
checkpoint.keep_last + 3 step dirs. The report: a table (faults by kind, the recovery each took: seconds
from the fault to the next completed step; steps recomputed; restarts; needed a human) and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import _soak_job as jobs  # noqa: E402
from bench._soak_faults import ENDS_JOB, KINDS, RUNNING, Injector  # noqa: E402

# seconds of a tiny 2-rank step with a save every 2 steps on the 2-core machine (full: 258 steps in 49 s,
# lora_tr_dpo: 84 in 50 s, each with ~15 s of start): they size each job
STEP_S = {"full": 0.13, "lora_tr_dpo": 0.4}
START_S = 7  # a start's seconds before its first step
GRACE_S = 30  # the other node's time to exit after one failed (slurm's KillWait default)
STALL_S = 180  # no progress and no fault pending this long: a hang nobody caught


class Monitor(threading.Thread):
    """Watches the run: each change of metrics.jsonl's training records (time, last step, count), the
    largest size and number of step dirs the run dir held."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.events: list[tuple[float, int, int]] = []
        self.max_bytes = 0
        self.max_step_dirs = 0
        self.done = False

    def run(self):
        last, tick = None, 0
        while not self.done:
            steps = jobs.train_steps(self.run_dir)
            now = (steps[-1][0] if steps else 0, len(steps))
            if now != last:
                self.events.append((time.time(), *now))
                last = now
            if tick % 8 == 0:
                self.max_bytes = max(self.max_bytes, jobs.dir_bytes(self.run_dir))
                dirs = [p for p in self.run_dir.glob("step-*") if p.is_dir()]
                self.max_step_dirs = max(self.max_step_dirs, len(dirs))
            tick += 1
            time.sleep(0.25)

    def last_progress(self) -> float:
        return max((t for t, _, n in self.events), default=0.0)

    def recovery(self, t_fault: float) -> float | None:
        """Seconds from t_fault to the next training record written after it."""
        prev = next((n for t, _, n in reversed(self.events) if t <= t_fault), 0)
        for t, _, n in self.events:
            if t > t_fault and n > prev:
                return t - t_fault
            if t > t_fault:
                prev = n
        return None


class Soak:
    """One profile's fault window and its end checks."""

    def __init__(self, profile: str, window_s: float, steps: int, work: Path, seed: int, quick: bool):
        self.profile, self.window_s, self.quick = profile, window_s, quick
        self.rng = random.Random(f"{seed}-{profile}")
        self.work = work / profile
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.data = jobs.write_data(work / "data")
        self.cache = work / "token_cache"
        self.hostfile = work / "hostfile"
        self.hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        self.disk = self._mount(self.work / "fs")
        self.run_dir = self.work / "fs" / "run"
        self.steps = steps
        self.step_s = STEP_S[profile]  # the straight run's, once it ran
        self.total = jobs.total_steps(steps)
        self.args = jobs.job_args(profile, steps, self.data, self.run_dir, self.cache)
        self.faults: list[dict] = []
        self.restarts = 0
        self.human: list[str] = []
        self.attempts: list[tuple[float, int | None]] = []  # (start time, the step it resumed from)
        self.t0 = 0.0
        self.bag: list[str] = []
        self.kinds = RUNNING  # the running faults drawn (--kinds narrows them)

    @staticmethod
    def _mount(path: Path) -> Path | None:
        """A tmpfs of its own for the run dir when root may mount one (so that filling it fills nothing else)."""
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        if os.geteuid() == 0:
            ok = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(path)], capture_output=True
            )
            if ok.returncode == 0:
                return path
        return None

    def unmount(self) -> None:
        if self.disk is not None:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)

    # ------------------------------------------------------------------ the straight run

    def straight(self) -> tuple[Path, float]:
        """The same job without faults, in its own run dir (reused when an earlier soak ran the same args)."""
        run_dir = self.work / "straight" / "run"
        args = jobs.job_args(self.profile, self.steps, self.data, run_dir, self.cache)
        stamp = self.work / "straight" / "args.json"
        if (
            stamp.is_file()
            and json.loads(stamp.read_text()) == args
            and (run_dir / "LATEST" / "COMPLETE").exists()
        ):
            return run_dir, float(json.loads((self.work / "straight" / "seconds").read_text()))
        shutil.rmtree(self.work / "straight", ignore_errors=True)
        (self.work / "straight" / "logs").mkdir(parents=True)
        seconds = jobs.straight(args, self.work / "straight" / "logs", self.hostfile, timeout=4 * 3600)
        stamp.write_text(json.dumps(args))
        (self.work / "straight" / "seconds").write_text(json.dumps(seconds))
        return run_dir, seconds

    # ------------------------------------------------------------------ the soak

    def note(self, kind: str, did: str, attempt: int, **extra) -> dict:
        steps = jobs.train_steps(self.run_dir)
        fault = {"t": round(time.time() - self.t0, 2), "at": time.time(), "attempt": attempt, "kind": kind,
                 "step": steps[-1][0] if steps else 0, "did": did, **extra}  # fmt: skip
        self.faults.append(fault)
        print(
            f"[soak {self.profile} {fault['t']:7.1f}s] attempt {attempt} step {fault['step']}: {kind}: {did}",
            flush=True,
        )
        return fault

    def in_window(self) -> bool:
        return time.time() - self.t0 < self.window_s

    def draw(self, at_start: bool) -> str:
        """The next kind from the bag; kill_in_resume only at a start that has a checkpoint to resume from
        (else it waits in the bag)."""
        if not self.bag:
            self.bag = list(self.kinds)
            self.rng.shuffle(self.bag)
        resumable = at_start and (self.run_dir / "LATEST").exists()
        for i in range(len(self.bag) - 1, -1, -1):
            if self.bag[i] != "kill_in_resume" or resumable:
                return self.bag.pop(i)
        return "kill_rank"  # the bag holds kill_in_resume alone and this start resumes nothing

    def run(self) -> dict:
        self.t0 = time.time()
        monitor = Monitor(self.run_dir)
        monitor.start()
        injector = Injector(self.rng, self.run_dir, self.disk, lambda: not self.in_window())
        attempt, failed_starts, damaged_once = 0, 0, False
        while True:
            attempt += 1
            job = jobs.Job(self.args, self.logs, attempt, self.hostfile, injector.next_env)
            injector.next_env = {}
            before, faults_before = len(monitor.events), len(self.faults)
            codes = self.attempt(job, injector, monitor)
            self.attempts.append((job.started, job.resumed_at()))
            progressed = any(n > 0 for _, _, n in monitor.events[before:])
            # a start that made no step with no fault of ours in it: the job cannot start by itself
            hit = len(self.faults) > faults_before
            failed_starts = 0 if progressed or hit else failed_starts + 1
            if codes == [0, 0] and self.finished():
                break
            if failed_starts >= 6:
                self.human.append(
                    f"attempt {attempt}: 6 starts in a row made no step without a fault; last log {job.logs[0]}"
                )
                break
            self.restarts += 1
            if self.in_window() and (not damaged_once or self.rng.random() < 1 / 3):
                did = injector.damage_file()
                if did:
                    damaged_once = True
                    self.note("damage_file", did, attempt)
        monitor.done = True
        monitor.join()
        return self.report(monitor)

    def attempt(self, job: jobs.Job, injector: Injector, monitor: Monitor) -> list[int | None]:
        """Run one start of the job, injecting faults while the window lasts; its launchers' exit codes."""
        t_ref = job.started  # the next fault's delay counts from here: the start, or the last fault
        while None in job.codes():
            if not self.in_window():
                return self.wait(job, monitor)
            kind = self.draw(at_start=t_ref == job.started)
            early = self.rng.random() < 0.25
            delay = self.rng.uniform(1, 9) if early else self.rng.uniform(*self.delays(monitor))
            if kind == "kill_in_resume":
                delay = 0  # it watches the start's log for the resume's first line
            while time.time() < t_ref + delay and None in job.codes():
                time.sleep(0.1)
            if None not in job.codes() or not self.in_window():
                continue
            did = injector.running(kind, job)
            if not did:
                continue  # the moment passed (no save, no resume in time, the job gone): draw again
            self.note(kind, did, job.attempt, since_start=round(time.time() - job.started, 2))
            if kind == "fill_disk":
                hold = self.rng.uniform(15, 40)
                end = time.time() + hold
                while time.time() < end and None in job.codes():
                    time.sleep(0.2)
                freed = injector.free_disk()
                if freed:
                    self.note("free_disk", freed, job.attempt)
                if None in job.codes():
                    t_ref = time.time()
                    continue
            if kind in ENDS_JOB or None not in job.codes():
                return self.wait(job, monitor)
        return self.wait(job, monitor)

    def delays(self, monitor: Monitor) -> tuple[float, float]:
        """The range of the next fault's delay, so that the job outlasts the window: it may run no further than
        0.8 of its steps in proportion to the window 30 s from now, at the straight run's step rate."""
        done = monitor.events[-1][1] if monitor.events else 0
        ahead = min(1.0, (time.time() - self.t0 + 30) / self.window_s)
        allowed = 0.8 * self.total * ahead - done  # steps it may still take
        run_s = max(0.0, allowed) * self.step_s
        return 2.0, max(3.0, min(60.0, START_S + run_s))

    def wait(self, job: jobs.Job, monitor: Monitor) -> list[int | None]:
        """Until both launchers exit: the other node is SIGKILLed GRACE_S after one failed (slurm's part);
        no progress for STALL_S with no fault pending is a hang nobody caught."""
        failed_at = None
        while None in job.codes():
            codes = job.codes()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.time()
            if failed_at is not None and time.time() - failed_at > GRACE_S:
                for r, c in enumerate(codes):
                    if c is None:
                        job.kill_node(r)
                        self.note(
                            "supervisor", f"SIGKILL node {r} {GRACE_S} s after the other failed", job.attempt
                        )
            quiet = time.time() - max(monitor.last_progress(), job.started)
            if failed_at is None and quiet > STALL_S:
                self.human.append(
                    f"attempt {job.attempt}: no step for {STALL_S} s and no exit; log {job.logs[0]}"
                )
                for r in (0, 1):
                    job.kill_node(r)
            time.sleep(0.2)
        for pid in jobs.left_running(self.run_dir):  # a rank its launcher left behind
            self.note("supervisor", f"SIGKILL pid {pid}, left running after its job ended", job.attempt)
            os.kill(pid, 9)
        return job.codes()

    def finished(self) -> bool:
        steps = jobs.train_steps(self.run_dir)
        return bool(steps) and steps[-1][0] == self.total and (self.run_dir / "LATEST" / "COMPLETE").exists()

    def report(self, monitor: Monitor) -> dict:
        for f in self.faults:
            if f["kind"] in KINDS:
                rec = monitor.recovery(f["at"])
                f["recovery_s"] = None if rec is None else round(rec, 2)
        return {
            "profile": self.profile, "window_s": self.window_s, "soak_s": round(time.time() - self.t0, 1),
            "steps": self.total, "restarts": self.restarts,
            "steps_recomputed": recomputed(monitor.events, self.attempts),
            "needed_a_human": self.human, "disk": "tmpfs" if self.disk else "injected ENOSPC",
            "max_bytes": monitor.max_bytes, "max_step_dirs": monitor.max_step_dirs, "faults": self.faults,
        }  # fmt: skip


def recomputed(events: list[tuple[float, int, int]], attempts: list[tuple[float, int | None]]) -> int:
    """Steps trained again: for each start that resumed (its log's "resumed from ... at step N"), the
    steps the run had reached before it beyond N."""
    total = 0
    for started, resumed in attempts:
        reached = max((step for t, step, _ in events if t < started), default=0)
        if resumed is not None:
            total += max(0, reached - resumed)
    return total


# ---------------------------------------------------------------------- the end checks and the report


def weights(run_dir: Path) -> dict:
    """The final checkpoint's tensors: policy.pt's state, or the adapter, and TR-DPO's moved reference."""
    import torch
    from safetensors.torch import load_file

    step = run_dir / "LATEST"
    out = {}
    if (step / "policy.pt").is_file():
        out.update(torch.load(step / "policy.pt", map_location="cpu", weights_only=True)["state"])
    for p in sorted(step.glob("*.safetensors")):
        out.update({f"{p.name}:{k}": v for k, v in load_file(str(p)).items()})
    for p in sorted((step / "reference").glob("*.pt")):
        state = torch.load(p, map_location="cpu", weights_only=True)
        flat = state.get("layers", state) if isinstance(state, dict) else {}
        out.update(_tensors(f"reference/{p.name}", flat))
    return out


def _tensors(prefix: str, obj) -> dict:
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(f"{prefix}.{key}", val).items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _tensors(f"{prefix}.{i}", val).items()}
    return {}


def checks(soak: Soak, result: dict, straight_dir: Path) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) of the end state against the straight run."""
    import torch

    out = [("the job outlasted the fault window", result["soak_s"] >= result["window_s"],
            f"{result['soak_s']:.0f} s, window {result['window_s']:.0f} s")]  # fmt: skip
    try:
        a, b = weights(soak.run_dir), weights(straight_dir)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        detail = f"{len(a)} tensors"
    except Exception as e:  # noqa: BLE001 - a final checkpoint that does not load is a failed check
        a, same, detail = {}, False, f"{type(e).__name__}: {str(e)[:200]}"
    out.append(("final weights equal the straight run's, bit for bit", same and bool(a), detail))
    got, want = jobs.train_steps(soak.run_dir), jobs.train_steps(straight_dir)
    once = [s for s, _ in got] == list(range(1, soak.total + 1))
    out.append(("metrics.jsonl: every step exactly once", once, f"{len(got)} records, {soak.total} steps"))
    out.append(
        (
            "every loss equals the straight run's",
            got == want,
            f"{sum(x != y for x, y in zip(got, want))} differ",
        )
    )
    names = sorted(p.name for p in soak.run_dir.iterdir())
    bad = [
        n
        for n in names
        if n.startswith("step-") and not (n[5:].isdigit() and (soak.run_dir / n / "COMPLETE").exists())
    ]
    bad += [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    out.append(
        ("no step dir incomplete, set aside or unnamed; no temporary", not bad, ", ".join(bad) or "none")
    )
    left = jobs.left_running(soak.run_dir)
    out.append(("no process left running", not left, str(left) if left else "none"))
    bound = 2 + 3  # checkpoint.keep_last=2, the one being written, up to two set aside
    out.append(
        (
            "step dirs at once <= keep_last + 3",
            result["max_step_dirs"] <= bound,
            f"max {result['max_step_dirs']}",
        )
    )
    out.append(
        ("needed a human: 0", not result["needed_a_human"], "; ".join(result["needed_a_human"]) or "0")
    )
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| profile | fault | injected | recovery s (median / max) | not recovered |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        for kind in (*KINDS, "supervisor"):
            fs = [f for f in r["faults"] if f["kind"] == kind]
            if not fs:
                if kind in KINDS:
                    lines.append(f"| {r['profile']} | {kind} | 0 | | |")
                continue
            recs = [f["recovery_s"] for f in fs if f.get("recovery_s") is not None]
            rec = f"{statistics.median(recs):.1f} / {max(recs):.1f}" if recs else "-"
            missing = sum(f.get("recovery_s") is None for f in fs) if kind in KINDS else ""
            lines.append(f"| {r['profile']} | {kind} | {len(fs)} | {rec} | {missing} |")
    lines += ["", "| profile | window min | soak min | straight min | steps | restarts | steps recomputed | faults within 10 s of a start | disk fill | needed a human |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in results:
        early = sum(1 for f in r["faults"] if f.get("since_start", 99) < 10)
        n_faults = sum(1 for f in r["faults"] if f["kind"] in KINDS)
        lines.append(
            f"| {r['profile']} | {r['window_s'] / 60:.1f} | {r['soak_s'] / 60:.1f} | {r['straight_s'] / 60:.1f} | "
            f"{r['steps']} | {r['restarts']} | {r['steps_recomputed']} | {early} of {n_faults} | {r['disk']} | "
            f"{len(r['needed_a_human'])} |"
        )
    lines += ["", "| profile | check | result | detail |", "|---|---|---|---|"]
    for r in results:
        for name, ok, detail in r["checks"]:
            lines.append(f"| {r['profile']} | {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="the fault window, over both profiles (3:1)")
    ap.add_argument("--quick", action="store_true", help="3 minutes of faults (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profiles", default="full,lora_tr_dpo")
    ap.add_argument("--work", default="/tmp/dpo_ds_soak", help="logs, run dirs, the straight runs (reused)")
    ap.add_argument(
        "--kinds", default=",".join(RUNNING), help="the running faults to draw from (comma-separated)"
    )
    ap.add_argument("--out", default=None, help="the report as JSON (default: WORK/soak.json)")
    args = ap.parse_args()
    minutes = 3.0 if args.quick else args.minutes
    profiles = args.profiles.split(",")
    share = {"full": 0.75, "lora_tr_dpo": 0.25} if len(profiles) == 2 else {p: 1.0 for p in profiles}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for profile in profiles:
        window = minutes * 60 * share[profile]
        # sized at a quarter of the window's seconds in fault-free steps; Soak.delays keeps it from finishing
        # inside the window
        soak = Soak(
            profile, window, max(60, int(window * 0.25 / STEP_S[profile])), work, args.seed, args.quick
        )
        try:
            straight_dir, straight_s = soak.straight()
            soak.step_s = max(0.01, (straight_s - START_S) / soak.total)
            soak.kinds = tuple(k for k in args.kinds.split(",") if k in RUNNING) or RUNNING
            print(f"[soak {profile}] straight run: {soak.total} steps in {straight_s:.0f} s", flush=True)
            result = soak.run()
            result["straight_s"] = straight_s
            result["checks"] = checks(soak, result, straight_dir)
        finally:
            soak.unmount()
        results.append(result)
    text = table(results)
    print(text)
    out = Path(args.out) if args.out else work / "soak.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"(report: {out}; logs: {work}/<profile>/logs)")
    ok = all(passed for r in results for _, passed, _ in r["checks"])
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
