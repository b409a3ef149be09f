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
{run_dir}/step-{N}/run_state.json   the resolved config, the data's digest, world size, step: what a
                                    resume is checked against before any engine is built
{run_dir}/step-{N}/COMPLETE         written last: a step dir without it is never resumed from
{run_dir}/LATEST -> step-{N}        a symlink, swapped atomically only once step-{N} is complete,
                                    so LATEST always names a whole checkpoint
{run_dir}/hang-rank{r}.txt          every thread's stack of a rank the watchdog stopped
"""

from __future__ import annotations

import json
import os
import shutil
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
COMPLETE = "COMPLETE"
RUN_STATE = "run_state.json"
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

    def hang_report(self, rank: int) -> Path:
        return self.root / f"hang-rank{rank}.txt"

    def step_dirs(self) -> list[tuple[int, Path]]:
        """(examples, dir) of every step dir here, oldest first, complete or not."""
        out = []
        for p in self.root.glob(f"{STEP_PREFIX}*"):
            tail = p.name[len(STEP_PREFIX) :]
            if p.is_dir() and tail.isdigit():
                out.append((int(tail), p))
        return sorted(out)

    def latest_target(self) -> Path | None:
        return self.latest.resolve() if self.latest.is_symlink() and self.latest.exists() else None


def is_complete(step_dir: Path) -> bool:
    return (Path(step_dir) / COMPLETE).is_file()


def mark_complete(step_dir: Path, run_state: dict) -> None:
    """run_state.json, then COMPLETE: the last two files of a checkpoint, fsynced, in this order."""
    for name, text in ((RUN_STATE, json.dumps(run_state, indent=1, sort_keys=True)), (COMPLETE, "")):
        path = Path(step_dir) / name
        with open(path, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_run_state(step_dir: Path) -> dict:
    path = Path(step_dir) / RUN_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArchiveError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def rotate(run_dir: RunDir, keep_last: int) -> list[Path]:
    """Delete step dirs beyond the `keep_last` newest complete ones, and incomplete ones (a failed or
    killed save); never LATEST's target. Rank 0 only. Returns what it deleted."""
    target = run_dir.latest_target()
    complete = [p for _, p in run_dir.step_dirs() if is_complete(p)]
    keep = set(complete[-keep_last:]) if keep_last else set(complete)
    gone = []
    for _, p in run_dir.step_dirs():
        if p in keep or (target is not None and p.resolve() == target):
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def truncate_records(path: Path, last_step: int) -> int:
    """Keep the JSON lines of `path` whose "step" is <= last_step (a resumed run replays the rest);
    returns how many were dropped. Atomic: a temporary file, then a rename."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            dropped += 1  # a line cut short by a kill
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


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


# ----------------------------------------------------------------------------- resume

# Keys whose change leaves the training trajectory alone: never compared on resume. Everything else
# (batch sizes, world size, data, seed, model, loss, optimizer, schedule, lengths, layout) must match
# the checkpoint's config unless resume.allow_changes names it.
RESUME_FREE = (
    "exp_name", "run_dir", "resume_from", "n_epochs", "n_examples", "eval_every", "do_first_eval",
    "n_eval_examples", "eval_batch_size", "sample_during_eval", "n_eval_model_samples", "max_new_tokens",
    "log_every", "torch_threads", "dist_timeout_s", "step_timeout_s", "data.cache_dir",
)  # fmt: skip
RESUME_FREE_GROUPS = ("wandb.", "checkpoint.", "guard.", "resume.", "eval.")
# What a DeepSpeed checkpoint cannot take changed, allowed or not: the step <-> example mapping and
# the partitioning of the optimizer state.
RESUME_FIXED = ("batch_size", "world size")
DATA_KEY = "data (token ids of the training data)"


def resolve_resume(resume_from: str | None, run_dir: RunDir) -> Path | None:
    """The complete step dir to resume from: resume_from=auto takes run_dir's LATEST (None when
    there is none: a fresh start); a path must name a complete checkpoint, or the error says what
    is missing."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        return run_dir.latest_target()
    p = Path(resume_from)
    if not p.exists():
        raise ArchiveError(f"resume_from={resume_from}: {p} does not exist")
    step = find_step_dir(p)
    if not step.is_dir():
        raise ArchiveError(f"resume_from={resume_from}: {step} is not a checkpoint directory")
    if not is_complete(step):
        raise ArchiveError(
            f"resume_from={resume_from}: {step} is not a complete checkpoint ({COMPLETE} is missing: its save "
            f"was cut short or failed); resume from the run's LATEST, which only ever names complete ones"
        )
    missing = [n for n in (RUN_STATE, DS_TAG) if not (step / n).exists()]
    if missing:
        why = " (saved with checkpoint.save_optimizer=false: weights only)" if DS_TAG in missing else ""
        raise ArchiveError(f"resume_from={resume_from}: {step} has no {' and no '.join(missing)}{why}")
    return step.resolve()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _free(key: str) -> bool:
    return key in RESUME_FREE or key.startswith(RESUME_FREE_GROUPS)


def check_resume(state: dict, config: dict, data_digest: str, world: int, allow: list[str]) -> list[str]:
    """Compare a checkpoint's run_state with this run. Returns the changes resume.allow_changes lets
    through (to log); raises ConfigError naming every other key that differs."""
    from dpo_ds.config import Config, ConfigError, to_dict

    # a key the checkpoint's config does not have (written by an older dpo_ds) had its default's meaning
    old = {**_flat(to_dict(Config())), **_flat(state.get("config", {}))}
    old.update({"world size": state.get("world"), DATA_KEY: state.get("data")})
    new = {**_flat(config), "world size": world, DATA_KEY: data_digest}
    diffs = [k for k in sorted(set(old) | set(new)) if not _free(k) and old.get(k) != new.get(k)]

    def show(k: str) -> str:
        return f"{k}: changed" if k == DATA_KEY else f"{k}: {old.get(k)!r} -> {new.get(k)!r}"

    fixed = [k for k in diffs if k in RESUME_FIXED]
    refused = [k for k in diffs if k not in allow and k not in fixed]
    if fixed or refused:
        parts = []
        if refused:
            parts.append(
                "differs from the checkpoint's config: "
                + "; ".join(show(k) for k in refused)
                + f" (resume.allow_changes=[{','.join(refused)}] accepts these if that is what you mean)"
            )
        if fixed:
            parts.append("cannot change on resume: " + "; ".join(show(k) for k in fixed))
        raise ConfigError(f"resume from step {state.get('step')}: " + ". ".join(parts))
    return [show(k) for k in diffs]


# ----------------------------------------------------------------------------- the save protocol


class Checkpointer:
    """The save protocol, which every rank runs alike: step-{examples}/ gets policy.pt (streamed while
    gathering: rank 0 never holds the whole model), the DeepSpeed checkpoint, run_state.json, then
    COMPLETE; only then does LATEST move to it, and old step dirs are rotated out. Every rank agrees on
    the outcome. A failed save is logged and training goes on with the previous LATEST, until
    checkpoint.max_failed_saves fail in a row (or the final one fails): then TrainingStopped."""

    def __init__(self, run_dir: RunDir, settings, run_state: dict, rank: int):
        self.run_dir = run_dir
        self.settings = settings  # config.CheckpointConfig
        self.run_state = (
            run_state  # what every step's run_state.json holds besides its step: config, world, data
        )
        self.rank = rank
        self.failed_in_a_row = 0
        self.saves = 0

    def save(self, engine, step: int, examples: int, metrics: dict, final: bool = False) -> bool:
        """Whether step-{examples} is now LATEST; raises TrainingStopped when too many saves failed."""
        import logging

        from dpo_ds import engines
        from dpo_ds.guards import TrainingStopped

        log = logging.getLogger("dpo_ds")
        target = self.run_dir.step(examples)
        try:
            self._prepare(target)
            engines.save_policy(engine, policy_file(target), examples, metrics)
            self.saves += 1
            _inject_fault(self.rank, self.saves)
            if self.settings.save_optimizer:  # else weights only: policy.pt, nothing to resume from
                error = None
                try:
                    engines.save_engine(engine, target, {"step": step, "examples": examples})
                except Exception as e:  # noqa: BLE001 - agreed on below
                    error = f"rank {self.rank}: {type(e).__name__}: {e}"
                failed = engines.all_gather_objects(error)
                if any(failed):
                    raise engines.SaveError(f"{ds_dir(target)}: " + "; ".join(f for f in failed if f))
            self._complete(target, {"step": step, "examples": examples, **self.run_state})
        except engines.SaveError as e:
            self.failed_in_a_row += 1
            latest = self.run_dir.latest_target()
            log.error(
                f"save failed ({e}); LATEST still names {latest}; {self.failed_in_a_row} in a row of "
                f"checkpoint.max_failed_saves={self.settings.max_failed_saves}"
            )
            if self.rank == 0 and target.exists() and target.resolve() != latest:
                shutil.rmtree(target, ignore_errors=True)
            if final or self.failed_in_a_row >= self.settings.max_failed_saves:
                why = "the final save" if final else f"{self.failed_in_a_row} saves in a row"
                raise TrainingStopped(f"{why} failed at step {step}: {e}; LATEST names {latest}") from None
            return False
        self.failed_in_a_row = 0
        if self.rank == 0:
            gone = rotate(self.run_dir, self.settings.keep_last)
            log.info(
                f"saved {target} (LATEST)" + (f"; removed {', '.join(p.name for p in gone)}" if gone else "")
            )
        return True

    def _prepare(self, target: Path) -> None:
        """A fresh step dir (one left over from a save that was cut short goes), made by rank 0 for all."""
        from dpo_ds import engines

        def make():
            if target.exists() and target.resolve() != self.run_dir.latest_target():
                shutil.rmtree(target)
            target.mkdir(parents=True, exist_ok=True)

        try:
            engines.decided_by_rank0(make, (OSError,))
        except OSError as e:  # the OSError rank 0 met, raised on every rank
            raise engines.SaveError(f"{target}: {type(e).__name__}: {e}") from None

    def _complete(self, target: Path, state: dict) -> None:
        """run_state.json and COMPLETE, then LATEST swapped to the step dir: rank 0, for all."""
        from dpo_ds import engines

        def complete():
            mark_complete(target, state)
            point_latest(self.run_dir.root, target)

        try:
            engines.decided_by_rank0(complete, (OSError,))
        except OSError as e:
            raise engines.SaveError(f"{target}: {type(e).__name__}: {e}") from None


def _inject_fault(rank: int, save_index: int) -> None:
    """Tests only: DPO_DS_TEST_KILL_IN_SAVE=R:K SIGKILLs rank R in its K-th save, once policy.pt is
    written and before its DeepSpeed shards are: a checkpoint half on disk."""
    import signal

    spec = os.environ.get("DPO_DS_TEST_KILL_IN_SAVE")
    if spec and spec == f"{rank}:{save_index}":
        os.kill(os.getpid(), signal.SIGKILL)
