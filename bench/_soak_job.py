"""The soak's job (bench/soak.py): a 2-"node" dpo_ds run on loopback, two `deepspeed --no_ssh --node_rank R`
launchers of one rank each (as tests/dist/test_multinode.py and launch/multi_node.sh run them), each in a
session of its own so that a whole "node" can be killed; what it writes (metrics, step dirs) read back."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpo_ds.dist.launcher import env, free_port, launcher, train_records  # noqa: E402

DEMO = ROOT / "dpo_ds" / "demo" / "data"
ROWS, BATCH = 48, 16  # 3 steps an epoch

# name: the job's own keys beyond the base ones
PROFILES = {
    "full": [],
    # LoRA with TR-DPO: the reference adapter's moved state is part of every checkpoint too
    "lora_tr_dpo": ["model.lora.r=8", "model.reference_sync_steps=3", "model.reference_mixup_alpha=0.6"],
}


def write_data(dst: Path) -> Path:
    """The first rows of the shipped demo data: small enough to repeat for many epochs."""
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", ROWS), ("test", 32)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        (dst / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def job_args(profile: str, steps: int, data: Path, run_dir: Path, cache: Path) -> list[str]:
    epochs = max(1, steps * BATCH // ROWS)
    return [
        "--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", "loss.beta=0.1", "exp_name=soak",
        "model.name_or_path=tiny", f"datasets=[{data}]", f"batch_size={BATCH}", f"eval_batch_size={BATCH}",
        "n_eval_examples=32", "max_length=16", "max_prompt_length=8", f"n_epochs={epochs}", "lr=1e-3",
        "warmup_steps=4", "eval_every=1000000000", "do_first_eval=false", "checkpoint.save_every=2",
        "checkpoint.keep_last=2", "resume_from=auto", "step_timeout_s=10", "dist_timeout_s=20",
        f"run_dir={run_dir}", f"data.cache_dir={cache}", *PROFILES[profile],
    ]  # fmt: skip


def total_steps(steps: int) -> int:
    return max(1, steps * BATCH // ROWS) * ROWS // BATCH


class Job:
    """One attempt: two launchers, one per "node", their output in log files."""

    def __init__(self, args: list[str], logs: Path, attempt: int, hostfile: Path, extra_env: dict):
        self.attempt = attempt
        self.logs = [logs / f"attempt{attempt:03d}-node{r}.log" for r in (0, 1)]
        port = free_port()
        self.started = time.time()
        self.procs = []
        for r in (0, 1):
            cmd = [
                launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "dpo_ds" / "train.py"),
                *args,
            ]  # fmt: skip
            with open(self.logs[r], "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd, env=env(**extra_env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                    )
                )  # fmt: skip

    def codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def kill_node(self, r: int) -> None:
        """SIGKILL a node: its launcher and every process of its session (its rank)."""
        try:
            os.killpg(self.procs[r].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_text(self, r: int = 0) -> str:
        try:
            return self.logs[r].read_text(errors="replace")
        except OSError:
            return ""

    def resumed_at(self, text: str | None = None) -> int | None:
        """The step this start resumed from (rank 0's "resumed from ... at step N"), None if not (yet);
        text: rank 0's log, when the caller has read it already."""
        found = re.search(r"resumed from \S+ at step (\d+)", self.log_text(0) if text is None else text)
        return int(found.group(1)) if found else None


def _run_processes(run_dir: Path):
    """(pid, argv) of every other process whose command line names run_dir (launchers included)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            args = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"run_dir={run_dir}" in args:
            yield int(p.name), args


def rank_pids(run_dir: Path) -> dict[int, int]:
    """The training processes writing run_dir, by global rank (their RANK from /proc)."""
    out = {}
    for pid, args in _run_processes(run_dir):
        if not any(a.endswith("train.py") for a in args):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None and rank.isdigit():
            out[int(rank)] = pid
    return out


def left_running(run_dir: Path) -> list[int]:
    """Every process whose command line names run_dir (launchers included)."""
    return [pid for pid, _ in _run_processes(run_dir)]


def train_steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of each training record in metrics.jsonl now (a half-written last line skipped)."""
    return [(int(r["step"]), float(r["loss/train"])) for r in train_records(run_dir / "metrics.jsonl")]


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def straight(args: list[str], logs: Path, hostfile: Path, timeout: float) -> float:
    """The same job run straight through, no faults; its seconds. Raises if it fails."""
    job = Job(args, logs, 0, hostfile, {})
    deadline = time.time() + timeout
    while None in job.codes() and time.time() < deadline:
        time.sleep(0.5)
    codes = job.codes()
    if codes != [0, 0]:
        for r in (0, 1):
            job.kill_node(r)
        raise RuntimeError(f"the straight run failed (exit codes {codes}); its log: {job.logs[0]}")
    return time.time() - job.started
