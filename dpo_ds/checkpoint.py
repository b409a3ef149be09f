"""Run-directory checkpoints.

{run_dir}/step-{N}/policy.pt   {'step_idx', 'state', 'metrics'}: the full HF state dict, rank 0
{run_dir}/step-{N}/ds/         DeepSpeed's sharded checkpoint (module, optimizer, scheduler,
                               client state) for resume_from
{run_dir}/LATEST -> step-{N}   a symlink, swapped atomically only once step-{N} is complete,
                               so LATEST always names a whole checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ARCHIVE_KEYS = ("step_idx", "state", "metrics")


class ArchiveError(ValueError):
    """An unusable model.archive; the message names the file and the key."""


def read_archive(path: str) -> dict:
    """Load and check an archive before any engine is built (every rank does this, so a bad file
    fails on every rank alike instead of hanging a collective)."""
    p = Path(path)
    if p.is_dir():
        p = p / "policy.pt"
    if not p.is_file():
        raise ArchiveError(
            f"model.archive={path}: file {p} does not exist (expected a run's LATEST/policy.pt)"
        )
    try:
        # mmap: on a node of 8 ranks the state is read once into the page cache, not 8 times into RAM
        archive = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ArchiveError(
            f"model.archive={path}: cannot read {p} as a torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(archive, dict) or "state" not in archive:
        keys = sorted(archive) if isinstance(archive, dict) else type(archive).__name__
        raise ArchiveError(
            f"model.archive={path}: {p} has no 'state' key (found {keys}); expected {list(ARCHIVE_KEYS)}"
        )
    state = archive["state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArchiveError(f"model.archive={path}: {p}['state'] must be a state dict of tensors")
    return archive


def write_policy(path: Path, step_idx: int, state: dict, metrics: dict) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"step_idx": step_idx, "state": state, "metrics": metrics}, tmp)
    os.replace(tmp, path)


def point_latest(run_dir: Path, step_dir: Path) -> None:
    """Atomically make run_dir/LATEST name step_dir (relative link, so the run dir can move)."""
    link = run_dir / "LATEST"
    tmp = run_dir / ".LATEST.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(step_dir.name, tmp)
    os.replace(tmp, link)


def step_dir(run_dir: Path, examples: int) -> Path:
    return run_dir / f"step-{examples}"
