"""Code run on 2 spawned gloo ranks without the launcher: the tests that need DeepSpeed engines or a process
group but not train.py (the launcher tests use tests/launch.py)."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp


def on_two_ranks(work, *args, timeout: float = 400) -> dict:
    """work(rank, *args) on 2 spawned processes with torch.distributed started over gloo (one torch thread a
    rank). {rank: what it returned, or its error's repr and traceback as a string}. `work` must be a module-level
    function and its return value picklable (tensors by value: .tolist() or a float)."""
    from dpo_ds.dist.launcher import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out, work, args)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(30)
    return results


def _rank(rank: int, port: int, out, work, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from dpo_ds.dist import comm

    try:
        comm.init_distributed(1)
        out.put((rank, work(rank, *args)))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put((rank, repr(e) + "\n" + traceback.format_exc()))
    finally:
        comm.shutdown()
