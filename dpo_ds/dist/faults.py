"""Faults injected by tests through the environment, read in one place.

DPO_DS_TEST_KILL_IN_SAVE=R:K        rank R SIGKILLs itself in its K-th save, once policy.pt is written
                                    and before its DeepSpeed shards are: a checkpoint half on disk
DPO_DS_TEST_FAIL_WRITE=R:K:TEXT     rank R's K-th DeepSpeed save fails, as a full disk does, at the
                                    first file whose path contains TEXT (e.g. optim_states)
"""

from __future__ import annotations

import os
import signal


def injected(variable: str, rank: int, index: int) -> str | None:
    """The rest of `variable`'s R:K[:REST] when it names this rank and this (1-based) occurrence, else None."""
    spec = os.environ.get(variable) or ""
    head = f"{rank}:{index}"
    if spec == head:
        return ""
    return spec[len(head) + 1 :] if spec.startswith(head + ":") else None


def kill_in_save(rank: int, save_index: int) -> None:
    if injected("DPO_DS_TEST_KILL_IN_SAVE", rank, save_index) is not None:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_write(rank: int, save_index: int, path: str) -> None:
    text = injected("DPO_DS_TEST_FAIL_WRITE", rank, save_index)
    if text is not None and text in path:
        raise RuntimeError(
            f"[Errno 28] No space left on device (injected by DPO_DS_TEST_FAIL_WRITE) writing {path}"
        )
