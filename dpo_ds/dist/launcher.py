"""Starting dpo_ds processes: a free port, the environment, the `deepspeed` command line.

One helper for the engines (a world of one under plain `python`), the tests and the benches, which
run several launcher jobs on one machine: each needs its own --master_port, or they collide on
DeepSpeed's default 29500.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # dpo_ds/
TRAIN_PY = PACKAGE / "train.py"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int = 1, **extra: str) -> dict:
    """The environment of an offline CPU run: no hub, wandb offline, `threads` per rank."""
    e = dict(os.environ)
    e.update(
        {
            "PYTHONPATH": str(PACKAGE.parent),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
        }
    )
    e.update(extra)
    return e


def single_process_env(**extra: str) -> dict:
    """A world of one without a launcher: what train.py's init needs set."""
    return env(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        **extra,
    )


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG): a forked
    worker of a rank must not outlive a rank that was killed. A no-op where prctl is missing."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def launcher() -> str:
    """The `deepspeed` launcher of this interpreter's environment."""
    return str(Path(sys.executable).parent / "deepspeed")


def deepspeed_cmd(
    *args: str, ranks: int = 2, script: Path = TRAIN_PY, module: str | None = None
) -> list[str]:
    """`deepspeed --num_gpus R --master_port P script args...` with this interpreter's launcher (or
    `--module M args...`: the ranks run `python -m M`)."""
    target = ["--module", module] if module else [str(script)]
    return [launcher(), "--num_gpus", str(ranks), "--master_port", str(free_port()), *target, *args]


def train_records(metrics_path: Path) -> list[dict]:
    """The training-step records of a run's metrics.jsonl so far (a half-written last line is skipped)."""
    if not metrics_path.exists():
        return []
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line the trainer is writing now
        if "loss/train" in rec:
            records.append(rec)
    return records


def wait_for_train_steps(proc: subprocess.Popen, metrics_path: Path, steps: int, deadline: float):
    """Poll a launched run until its metrics hold `steps` training records, it exits, or time.time()
    passes `deadline`. Returns (records, status): status "ok", "exited with RC after N steps" or
    "timed out". Stopping the run is the caller's business (the benches stop it once the steps they time
    are written, before the final checkpoint)."""
    records: list[dict] = []
    while time.time() < deadline:
        records = train_records(metrics_path)
        if len(records) >= steps:
            return records, "ok"
        if proc.poll() is not None:
            records = train_records(metrics_path)  # lines written between the poll and the exit
            if len(records) >= steps:
                return records, "ok"
            return records, f"exited with {proc.returncode} after {len(records)} steps"
        time.sleep(0.5)
    records = train_records(metrics_path)
    return records, "ok" if len(records) >= steps else "timed out"


def missing_modules(names=("deepspeed", "datasets")) -> str | None:
    """What a launched run needs but this interpreter cannot import (the GPU machine ships without
    deepspeed and datasets unless their wheels are carried), or None."""
    bad = []
    for mod in names:
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or a broken install raising something else at import
            bad.append(f"{mod} ({type(e).__name__}: {str(e)[:120]})")
    if bad:
        return f"not importable: {', '.join(bad)}; carry bench/wheels (see bench/gpu_check.sh)"
    return None
