"""The process group and the collective idioms every layer above uses.

init_distributed        torch.distributed through DeepSpeed, under any launcher or none
rendezvous_deadline     its forming under dist_timeout_s: a rank whose peers never join exits, named
decided_by_rank0        rank 0 looks and decides, every rank gets the answer or the same exception
any_rank_flagged        whether any rank raised each of some flags (one all-reduce)
fail_alike              every rank's error (or None) gathered, the same exception raised everywhere
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import torch

from dpo_ds.dist.launcher import free_port
from dpo_ds.dist.watchdog import EXIT_HANG  # a rank whose peers never join is a hang found at the start


def set_threads(n: int, on_cpu: bool) -> None:
    """On CPU every rank defaults to all cores; 2 ranks x N threads on N cores thrash (14x slower
    seen on 2 cores), so CPU ranks take 1 thread unless told otherwise."""
    if n > 0:
        torch.set_num_threads(n)
    elif on_cpu:
        torch.set_num_threads(1)


# The process group's timeout is a backstop behind the watchdog (which polls twice a second): were
# they equal, gloo's own exception would often win the race and the hang report would be lost.
BACKEND_TIMEOUT_MARGIN_S = 60.0


def init_distributed(torch_threads: int = 0, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size, device).

    Works under the `deepspeed` launcher, torchrun, and a bare `python` (a world of one). timeout_s
    is the watchdog's deadline for a collective; the process group's own timeout (gloo raises, NCCL
    aborts) is BACKEND_TIMEOUT_MARGIN_S later, so the watchdog reports first, with every stack."""
    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    set_threads(torch_threads, on_cpu)
    if on_cpu and os.environ.get("DPO_DS_CPU_SHM", "0") != "1":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce (~2 min) on first use; gloo is
        # fine for CPU runs. Patch the module object itself: `import deepspeed.comm.torch as m`
        # binds the real `torch` package instead.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # torch.distributed.nn binds `group=group.WORLD` as default arguments when first imported (by
    # transformers/accelerate, when a tokenizer loads): imported after the process group exists, it
    # pins the group forever, destroy_process_group() cannot join gloo's threads, and one of them
    # may take the GIL during interpreter shutdown ('terminate called without an active exception',
    # exit 250, seen about one run in six). Imported first, the defaults are None.
    importlib.import_module("torch.distributed.nn")
    if timeout_s is not None:
        from datetime import timedelta

        with rendezvous_deadline(timeout_s):
            deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s + BACKEND_TIMEOUT_MARGIN_S))
    else:
        deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc.set_device(local_rank)
    device = torch.device(acc.device_name(local_rank)) if not on_cpu else torch.device("cpu")
    return rank, world, device


@contextmanager
def rendezvous_deadline(timeout_s: float):
    """The process group's forming is the job's first collective and gets the same deadline (dist_timeout_s).
    torch's store connect does not keep it: a worker whose master never answers (rank 0 stopped or killed
    in its start-up, its node not started) times out after the backend's timeout and then retries, and the
    master waits for workers that never come; the watchdog does not run yet. So a thread (the store's wait
    releases the GIL) ends the rank with a named message and the hang code when the deadline passes."""
    import threading
    import time

    formed = threading.Event()
    started = time.monotonic()
    rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"

    def watch() -> None:
        if formed.wait(timeout_s):
            return
        who = (
            f"the other ranks did not all join it at {master}"
            if rank == "0"
            else f"rank 0 at {master} did not answer, or not every rank joined"
        )
        say(
            f"dpo_ds: rank {rank} of {world}: the process group did not form within {time.monotonic() - started:.0f} s "
            f"(dist_timeout_s={timeout_s:g}): {who}. A node that did not start, or a rank killed or stopped "
            f"during its start-up (see each node's log). Exiting "
            f"{EXIT_HANG} so that the launcher ends the job and a restart can form it again"
        )
        os._exit(EXIT_HANG)  # the main thread is inside torch's store connect: no clean-up

    threading.Thread(target=watch, name="dpo_ds-rendezvous", daemon=True).start()
    try:
        yield
    finally:
        formed.set()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def sync_max(n: int) -> int:
    t = torch.tensor([n], dtype=torch.long, device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def across_ranks(values: list[float]) -> torch.Tensor:
    """(world, len(values)) float64: every rank's values, in one all-reduce (each rank fills its row)."""
    t = torch.zeros(
        torch.distributed.get_world_size(), len(values), dtype=torch.float64, device=comm_device()
    )
    t[torch.distributed.get_rank()] = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(t).cpu()


def all_gather_objects(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_rank0(decide, errors: tuple[type[BaseException], ...] = (Exception,)):
    """decide() run on rank 0 alone, its result given to every rank; an exception of `errors` it raises
    is raised on every rank alike (same type, same message). With node-local disks ranks can see
    different files, and one rank raising alone would leave the others waiting in the next collective:
    so rank 0 looks and decides for all. Every rank must call this, in the same order."""
    outcome = None
    if torch.distributed.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except errors as e:
            outcome = ("error", type(e), str(e))
    outcome = broadcast_from_rank0(outcome)
    if outcome[0] == "error":
        _, cls, message = outcome
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments: still raised alike everywhere
            error = RuntimeError(f"{cls.__name__}: {message}")
        raise error
    return outcome[1]


def any_rank_flagged(*flags: bool) -> list[bool]:
    """Whether any rank raised each flag (one all-reduce)."""
    t = torch.tensor([float(f) for f in flags], device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def fail_alike(error, make) -> None:
    """Every rank's error (anything picklable, or None) gathered; if any rank had one, `make(failed)` builds
    the exception every rank raises alike, failed = [(rank, its error), ...] in rank order. Every rank must
    call this, in the same order: one rank raising alone would leave the others in the next collective."""
    errors = all_gather_objects(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise make(failed)


def by_rank(failed) -> str:
    """fail_alike's failures as one message: "rank R: error; rank S: error"."""
    return "; ".join(f"rank {r}: {e}" for r, e in failed)


def barrier() -> None:
    torch.distributed.barrier()


def say(message: str) -> None:
    """A line on stderr in one write: ranks print their refusals at once into one pipe, and print()'s
    separate write of the newline let two ranks' messages run into one line."""
    import sys

    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def part_together(timeout_s: float = 30.0) -> None:
    """Before a rank exits on an error raised on every rank alike: wait (at most timeout_s) until every
    rank has reached this point, so each has printed its message before the launcher, seeing the first
    rank exit, kills the rest mid-sentence. A rank that never arrives (an error raised on one rank only)
    costs the others timeout_s, never a hang."""
    import threading

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    waiter = threading.Thread(target=torch.distributed.barrier, daemon=True)
    waiter.start()
    waiter.join(timeout_s)


def shutdown() -> None:
    """Tear the process group down while Python is alive: this joins gloo's worker threads, which,
    left running into interpreter shutdown, can abort the process there (see init_distributed)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.current_device_name())
