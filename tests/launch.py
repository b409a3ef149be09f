"""Helpers for tests that run the real `deepspeed` launcher with 2 CPU ranks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dpo_ds.dist.launcher import deepspeed_cmd, env, free_port, launcher, single_process_env  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dpo_ds" / "demo" / "data"


# The tiny shipped Llama on the short addition rows: what every launcher test trains.
TINY = [
    "model.name_or_path=tiny",
    "batch_size=16",
    "eval_batch_size=16",
    "n_eval_examples=32",
    "max_length=16",
    "max_prompt_length=8",
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


def run_many(
    work: Path, runs: dict[str, list[str]], ranks: int = 2, timeout: int = 900, one_rank=(), script=None
) -> dict[str, str]:
    """Several train.py runs, one after another, behind one launcher run (tests/multirun.py): `runs` maps
    a name to train.py's arguments; the names in `one_rank` run as a world of one. Returns each run's
    log (its ranks' stdout and stderr). A run that fails fails the launch, with that run's log."""
    work.mkdir(parents=True, exist_ok=True)
    spec = [
        {"name": name, "args": list(args), "ranks": 1 if name in one_rank else ranks, "port": free_port(),
         "log": str(work / f"{i}.log")}
        for i, (name, args) in enumerate(runs.items())
    ]  # fmt: skip
    (work / "runs.json").write_text(json.dumps(spec, indent=1))
    proc = subprocess.run(
        deepspeed_cmd(str(work / "runs.json"), ranks=ranks, script=script or ROOT / "tests" / "multirun.py"),
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    logs = {r["name"]: Path(r["log"]).read_text() if Path(r["log"]).exists() else "" for r in spec}
    if proc.returncode != 0:
        failed = [n for n in logs if f"multirun: run {n!r} exited" in proc.stderr + proc.stdout]
        # else the last run that wrote a log: the one running when the launch died
        name = failed[0] if failed else next((n for n in reversed(logs) if logs[n]), list(logs)[0])
        raise AssertionError(
            f"run {name!r} of the launch failed (launcher exit {proc.returncode})\n--- its log\n{logs[name][-6000:]}"
            f"\n--- launcher\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return logs


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
