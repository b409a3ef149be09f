"""Helpers for tests that run the real `deepspeed` launcher with 2 CPU ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dpo_ds" / "demo" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(
        {
            "PYTHONPATH": str(ROOT),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    return e


# The tiny shipped Llama on the short addition rows: what every launcher test trains.
TINY = [
    "model.name_or_path=tiny",
    "batch_size=16",
    "eval_batch_size=16",
    "n_eval_examples=32",
    "max_length=16",
    "max_prompt_length=8",
]


def single_process_env(**extra: str) -> dict:
    """A world of one without a launcher: train.py's init needs these set."""
    e = env()
    e.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    )
    e.update(extra)
    return e


def launcher() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


def deepspeed_cmd(*args: str, ranks: int = 2) -> list[str]:
    return [
        launcher(),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(ROOT / "dpo_ds" / "train.py"),
        *args,
    ]


def run_train(*args: str, timeout: int = 300, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        deepspeed_cmd(*args, ranks=ranks),
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(
            f"launcher exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if any(k.endswith("/train") or "_train/" in k for k in r)]
    evals = [r for r in rows if any(k.endswith("/eval") or "_eval/" in k for k in r)]
    return train, evals


def small_demo(dst: Path, n_train: int = 48, n_test: int = 32) -> Path:
    """A slice of the demo data small enough to repeat for many epochs in a test."""
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        (dst / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return dst
