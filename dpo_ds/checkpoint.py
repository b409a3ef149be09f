"""The run directory: every name in it is spelled here, and the one reader of model archives.

{run_dir}/config.yaml               the resolved dpo_ds config
{run_dir}/ds_config.json            the resolved DeepSpeed config
{run_dir}/metrics.jsonl             one JSON record per step and per eval (rank 0)
{run_dir}/samples.jsonl             greedy samples at each eval (sample_during_eval=true)
{run_dir}/reference_logps.pt        the precomputed reference log-probs (model.reference_mode=precomputed)
{run_dir}/step-{N}/policy.pt        {'step_idx', 'state', 'metrics'}: the full HF state dict, as the
                                    original DPO code writes and reads it (N = training examples seen)
{run_dir}/step-{N}/ds/              DeepSpeed's sharded checkpoint (module, optimizer, scheduler,
                                    client state) for resume_from
{run_dir}/LATEST -> step-{N}        a symlink, swapped atomically only once step-{N} is complete,
                                    so LATEST always names a whole checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
REFERENCE_CACHE = "reference_logps.pt"
LATEST = "LATEST"
POLICY = "policy.pt"
DS_TAG = "ds"  # the tag engines.save_engine / load_engine use: step-N/ds/
STEP_PREFIX = "step-"
ARCHIVE_KEYS = ("step_idx", "state", "metrics")
HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ArchiveError(ValueError):
    """An unusable checkpoint or model.archive; the message names the file and the key."""


class RunDir:
    """The names inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def ds_config(self) -> Path:
        return self.root / DS_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def reference_cache(self) -> Path:
        return self.root / REFERENCE_CACHE

    @property
    def latest(self) -> Path:
        return self.root / LATEST

    def step(self, examples: int) -> Path:
        return self.root / f"{STEP_PREFIX}{examples}"

    def taken(self) -> list[str]:
        """What of an earlier run is here (a run dir is never reused unless resuming)."""
        return [p.name for p in (self.metrics, self.latest) if p.exists() or p.is_symlink()]


def policy_file(step_dir: Path) -> Path:
    return Path(step_dir) / POLICY


def ds_dir(step_dir: Path) -> Path:
    return Path(step_dir) / DS_TAG


def find_step_dir(path: str | Path) -> Path:
    """A step dir from a step dir (or RUN_DIR/LATEST), a policy.pt inside one, or a run dir."""
    path = Path(path)
    if path.is_file() and path.name == POLICY:
        return path.parent
    if not path.is_dir():
        raise ArchiveError(
            f"{path}: no such checkpoint directory (expected RUN_DIR/LATEST or RUN_DIR/step-N)"
        )
    if not policy_file(path).exists() and not ds_dir(path).exists() and (path / LATEST).exists():
        return path / LATEST  # a run directory: its latest checkpoint
    return path


def run_dir_of(step_dir: Path) -> RunDir:
    """The run a step dir belongs to (through the LATEST link, if that is what was given)."""
    return RunDir(Path(step_dir).resolve().parent)


def point_latest(run_dir: Path, step_dir: Path) -> None:
    """Atomically make run_dir/LATEST name step_dir (relative link, so the run dir can move)."""
    link = Path(run_dir) / LATEST
    tmp = Path(run_dir) / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(step_dir).name, tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------- archives


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
    import json

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
    engines.save_policy, which streams."""
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"step_idx": step_idx, "state": state, "metrics": metrics}, tmp)
    os.replace(tmp, path)
