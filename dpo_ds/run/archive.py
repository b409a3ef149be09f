"""Model archives: the one reader of policy.pt files, step dirs, run dirs and Hugging Face model
directories, and the in-memory writer of policy.pt (training streams it: run/save.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dpo_ds.run.dir import (
    ARCHIVE_KEYS,
    HF_WEIGHTS,
    RUN_STATE,
    ArchiveError,
    find_step_dir,
    policy_file,
    verify,
)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in HF_WEIGHTS)


def archive_files(archive: str | Path) -> list[Path]:
    """The files whose bytes an archive's weights come from (for fingerprints)."""
    p = Path(archive)
    if is_hf_dir(p):
        return sorted(f for pat in ("*.safetensors", "*.bin") for f in p.glob(pat))
    if p.is_dir():
        p = policy_file(find_step_dir(p))
    return [p] if p.is_file() else []


def read_archive(path: str | Path) -> dict:
    """{'step_idx', 'state', 'metrics'} from a policy.pt, a step dir, a run dir (its LATEST), or a
    Hugging Face model directory (safetensors or .bin, sharded or not; step_idx None). Checked
    before any engine is built; every rank reads it alike, so a bad file fails on every rank."""
    p = Path(path)
    if is_hf_dir(p):
        return {"step_idx": None, "state": _read_hf_state(p), "metrics": {}}
    if p.is_dir():
        p = policy_file(find_step_dir(p))
    if not p.is_file():
        raise ArchiveError(
            f"model.archive={path}: file {p} does not exist (expected a run's LATEST/policy.pt or a Hugging "
            f"Face model directory with {' / '.join(HF_WEIGHTS[::2])})"
        )
    if (p.parent / RUN_STATE).is_file():  # a step dir's policy.pt: its save recorded what it wrote
        problems = verify(p.parent, checksums=True, only=p.name)  # its size, zip directory and checksum
        if problems:
            raise ArchiveError(f"model.archive={path}: " + "; ".join(problems))
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


def _read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    index = next((directory / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (directory / n).is_file()), None)  # fmt: skip
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ArchiveError(
                f"model.archive={directory}: {index.name} has no usable weight_map ({e})"
            ) from None
        files = [directory / s for s in shards]
    else:
        files = [
            directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()
        ][:1]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ArchiveError(f"model.archive={directory}: shard {f.name} named by the index is missing")
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f), device="cpu"))
            else:
                state.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # noqa: BLE001
            raise ArchiveError(
                f"model.archive={directory}: cannot read {f.name} ({type(e).__name__}: {e})"
            ) from None
    return state


def write_policy(path: Path, step_idx: int, state: dict, metrics: dict) -> None:
    """policy.pt from a state dict in memory (tests, small models); training saves through
    run/save.py's save_policy, which streams."""
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"step_idx": step_idx, "state": state, "metrics": metrics}, tmp)
    os.replace(tmp, path)
