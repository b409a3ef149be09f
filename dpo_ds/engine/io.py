"""Checkpoint I/O through DeepSpeed. The weights: each tensor gathered in turn for a writer above
(run/save.py streams policy.pt, or writes a LoRA adapter), so no rank holds more than one full tensor
beyond its shard. DeepSpeed's sharded checkpoint (module, optimizer, scheduler), saved with every write
guarded, and loaded. The caller agrees on the outcome over the ranks (dist.comm.fail_alike)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from dpo_ds.dist.faults import fail_write
from dpo_ds.engine import checksum
from dpo_ds.engine.step import unwrap_lm
from dpo_ds.model import adapters


def gathered(tensors):
    """Each (name, tensor) of `tensors` in turn, whole while the caller's loop body runs: a ZeRO-3
    parameter is gathered on every rank (read-only, released after), anything else is as it is. Every
    rank must iterate the same tensors in the same order (a gather is a collective)."""
    import deepspeed

    for name, t in tensors:
        zero3 = hasattr(t, "ds_id")
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None) if zero3 else nullcontext():
            yield name, t


def trainable_parameters(engine) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of what trains in the HF model inside the engine (LoRA: the adapters)."""
    return [(name, p) for name, p in unwrap_lm(engine).named_parameters() if p.requires_grad]


class _GuardedWrites:
    """Stands in for engine.checkpoint_engine during a save. A write that fails inside DeepSpeed's
    save_checkpoint (a full disk: torch.save raises RuntimeError, os calls OSError) would leave its rank
    raising out of DeepSpeed while the others wait in DeepSpeed's own barrier or all-gather, and gloo
    would abort the job. Here it is recorded instead (the partial file removed, later writes skipped),
    every rank goes through DeepSpeed's collectives in step, and save_engine raises SaveError on every
    rank alike. Also records what this rank wrote, for the step dir's manifest, with each file's checksum
    computed while torch.save writes it (engine/checksum.py)."""

    def __init__(self, inner, rank: int, save_index: int):
        self.inner = inner
        self.rank, self.save_index = rank, save_index
        self.errors: list[str] = []
        self.written: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path):
        if self.errors:
            return None  # the save has failed already; the rest would fail as well
        try:
            fail_write(self.rank, self.save_index, str(path))
            if (
                type(self.inner).__name__ == "TorchCheckpointEngine"
            ):  # what its save() does, hashed on the way
                zipped = getattr(self.inner, "zipfile_serialization", True)
                checksum.save_torch(state_dict, path, _use_new_zipfile_serialization=zipped)
                result = None
            else:  # another checkpoint engine writes by itself: its files are hashed once they exist
                result = self.inner.save(state_dict, path)
            self.written.append(str(path))
            return result
        except Exception as e:  # noqa: BLE001 - every failure takes the named path (save_engine)
            self.errors.append(f"{path}: {type(e).__name__}: {e}")
            try:
                os.remove(path)
            except OSError:
                pass
            return None

    def makedirs(self, path, exist_ok=False):
        try:
            return self.inner.makedirs(path, exist_ok=exist_ok)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{path}: {type(e).__name__}: {e}")
            return None

    def guard(self, fn, what: str):
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"{what}: {type(e).__name__}: {e}")
                return None

        return guarded


_SAVES: dict[str, int] = {"count": 0}


def save_checkpoint(engine, directory: Path, tag: str, client_state: dict) -> tuple[list[str], list[str]]:
    """DeepSpeed's sharded checkpoint (module, optimizer, scheduler) into directory/tag; every rank calls it.
    A LoRA policy's frozen base is left out (it is rebuilt from the run's starting point on resume).
    Returns (this rank's write errors, the paths it wrote): a failed write is recorded, never raised, so
    every rank goes through DeepSpeed's own collectives in step."""
    exclude_frozen = adapters.is_lora(unwrap_lm(engine))
    _SAVES["count"] += 1
    rank = torch.distributed.get_rank()
    guard = _GuardedWrites(engine.checkpoint_engine, rank, _SAVES["count"])
    engine.checkpoint_engine = guard
    engine._copy_recovery_script = guard.guard(engine._copy_recovery_script, "copying zero_to_fp32.py")
    try:
        engine.save_checkpoint(
            str(directory),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )
    except Exception as e:  # noqa: BLE001 - raised outside the guarded writes: still agreed on by the caller
        guard.errors.append(f"{type(e).__name__}: {e}")
    finally:
        engine.checkpoint_engine = guard.inner
        del engine._copy_recovery_script  # the class's method again
    return guard.errors, guard.written


def load_checkpoint(engine, directory: Path, tag: str) -> tuple[str | None, dict | None]:
    """(this rank's error or None, the client state) of DeepSpeed's checkpoint in directory/tag. A LoRA
    checkpoint holds the adapters only: the frozen base was built from the starting point."""
    try:
        strict = not adapters.is_lora(unwrap_lm(engine))
        path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=strict)
        if path is None:
            return f"no DeepSpeed checkpoint under {Path(directory) / tag}", None
        return None, client_state
    except Exception as e:  # noqa: BLE001 - a file missing or unreadable on some rank: agreed on by the caller
        return f"{type(e).__name__}: {e}", None
