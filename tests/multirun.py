"""Several dpo_ds runs behind one launcher run (tests/launch.py: run_many): the tests' way to pay the
launcher's and the libraries' start-up (~12 s of a tiny 2-rank run here) once for a series of runs.

    deepspeed --num_gpus 2 --master_port P tests/multirun.py SPEC.json

SPEC.json is a list of runs, each {"name", "args": train.py's argv, "ranks": 1 or the world, "port",
"log"}. Each rank imports what train.py imports, then, run after run, forks a child that is a fresh rank
of that run: its own process group on the run's port (a world of one on rank 0 for "ranks": 1), its
stdout and stderr appended to the run's log, `dpo_ds.cli.train.main` and train.py's exit, dying with its
parent. Nothing a run leaves in a process (patched attention, a process group, a thread) reaches the
next one. A run that exits non-zero ends this rank with its code, so the launcher stops the others as it
would stop a single run, and the test names the run from the logs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def preload() -> None:
    """What a rank of train.py imports before its first step, imported here once for every run."""
    import importlib

    for name in (
        "torch.distributed.nn",  # before any process group exists (dist.comm.init_distributed says why)
        "deepspeed",
        "datasets",
        "transformers.models.llama.modeling_llama",
        "dpo_ds.cli.train",
        "dpo_ds.engine.build",
        "dpo_ds.training.trainer",
        "dpo_ds.training.reference",
        "dpo_ds.training.generation",
        "dpo_ds.data.prepare",
        "dpo_ds.data.batches",
        "dpo_ds.run.start",
        "dpo_ds.dist.watchdog",
    ):
        importlib.import_module(name)


def child(run: dict, rank: int) -> None:
    """This process as rank `rank` of `run` (never returns)."""
    from dpo_ds.cli.train import exit_now, main
    from dpo_ds.dist.launcher import die_with_parent

    die_with_parent()
    os.environ["MASTER_PORT"] = str(run["port"])
    if run["ranks"] == 1:
        os.environ.update(WORLD_SIZE="1", LOCAL_SIZE="1", CROSS_SIZE="1")
    log = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    try:
        code = main(run["args"])
    except BaseException:  # noqa: BLE001 - a crash is this run's failure, reported like train.py's
        import traceback

        traceback.print_exc()
        code = 1
    exit_now(code)


def main() -> int:
    spec = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    runs = json.loads(Path(spec).read_text())
    rank = int(os.environ.get("RANK", "0"))
    preload()
    for run in runs:
        if rank >= run["ranks"]:
            continue  # a world smaller than the launch's: the other ranks go on to the next run
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(run, rank)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0:
            print(
                f"multirun: run {run['name']!r} exited with {code} on rank {rank}",
                file=sys.stderr,
                flush=True,
            )
            return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    os._exit(main())
