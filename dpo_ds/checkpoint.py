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
{run_dir}/RUN_LOCK                  the running job's lock (RunLock): one job per run directory
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from contextlib import nullcontext
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
RUN_LOCK = "RUN_LOCK"
MANIFEST = "files"  # run_state.json's key: every file of the step dir and its size in bytes
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

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK

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


class RunDirLocked(ValueError):
    """Another job holds the run directory's lock; the message names the lock file and its holder."""


# The lock's holder touches it this often (the watchdog thread); a lock whose heartbeat is older than
# STALE_LOCK_S, held by no live process this host can see, belongs to a job that is gone.
LOCK_HEARTBEAT_S = 20.0
STALE_LOCK_S = 90.0


class RunLock:
    """One owner per run directory, taken by rank 0 before anything is written there.

    {run_dir}/RUN_LOCK holds its holder (host, pid, start, slurm job, command). The holder keeps an
    exclusive flock on it for the job's life and refreshes its mtime every LOCK_HEARTBEAT_S. A second
    job finds it and is refused, naming the file and the holder. A lock is stale, and taken over with
    a warning, when its flock is free and either its holder ran on this host and that pid is gone (a
    flock dies with its process, so a SIGKILLed job leaves a free one), or, held from another host
    (a shared filesystem, where flock may not reach across hosts), its heartbeat is older than
    STALE_LOCK_S. The holder removes it when the job ends."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.lock
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a warning to log when a stale one was taken over. Raises
        RunDirLocked when a live job holds it."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours; a checker that opened it meanwhile lets go at once
            self._claim(fd)
            return None
        except FileExistsError:
            pass
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(self._refusal(self._holder(), "its holder is running")) from None
        holder = self._holder()
        age = time.time() - self.path.stat().st_mtime
        here = holder.get("host") == socket.gethostname()
        if not holder and age < STALE_LOCK_S:
            live = "it is being written by a job starting now"
        elif here and holder.get("pid") and _pid_alive(holder["pid"]) and holder.get("pid") != os.getpid():
            live = "its holder's pid is alive on this host"
        elif not here and age < STALE_LOCK_S:
            live = f"its heartbeat is {age:.0f} s old (a job on another host)"
        else:
            live = ""
        if live:
            os.close(fd)
            raise RunDirLocked(self._refusal(holder, live))
        self._claim(fd)
        why = "its pid is gone" if here else f"no heartbeat for {age:.0f} s"
        return f"took over the stale lock {self.path} of {_describe(holder)} ({why})"

    def heartbeat(self) -> None:
        if self._fd is not None:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def _claim(self, fd: int) -> None:
        import socket
        import sys

        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _holder(self) -> dict:
        try:
            value = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _refusal(self, holder: dict, why: str) -> str:
        return (
            f"config key 'run_dir': {self.path.parent} is in use by another job ({_describe(holder)}; {why}): "
            f"its lock is {self.path}. Wait for that job to end or give this one another run_dir; if no job "
            f"uses the directory any more, delete {self.path} (a lock is also taken over by itself once its "
            f"holder's pid is gone on its host, or its heartbeat is older than {STALE_LOCK_S:.0f} s)"
        )


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    job = f", slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}{job}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a value we cannot check: assume alive
    return True


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


def manifest_bytes(step_dir: Path | None) -> int:
    """The size a complete checkpoint's manifest records (0: none, or written before manifests)."""
    if step_dir is None:
        return 0
    try:
        return int(sum(read_run_state(step_dir).get(MANIFEST, {}).values()))
    except ArchiveError:
        return 0


def verify(step_dir: Path) -> list[str]:
    """What is wrong with a complete checkpoint, checked against the manifest its save recorded: each
    file present with its size, and each torch file's zip directory readable (a file cut short has
    none). Cheap: no file is read whole. [] when it passes (or predates manifests: nothing to check)."""
    step_dir = Path(step_dir)
    try:
        manifest = read_run_state(step_dir).get(MANIFEST)
    except ArchiveError as e:
        return [str(e)]
    if manifest is None:
        return []
    problems = []
    for rel, size in manifest.items():
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{path} is missing (its save wrote {size} bytes)")
            continue
        have = path.stat().st_size
        if have != size:
            problems.append(f"{path} is {have} bytes, its save wrote {size}: cut short or overwritten")
        elif path.suffix in (".pt", ".bin") and not zipfile.is_zipfile(path):
            problems.append(f"{path} has no readable zip directory: not a whole torch file")
    return problems


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
    if (p.parent / RUN_STATE).is_file():  # a step dir's policy.pt: its save recorded what it wrote
        problems = [x for x in verify(p.parent) if str(p) in x]
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
DATA_ALLOW = "data"  # resume.allow_changes=[data]: the training data's token ids may differ


def resolve_resume(resume_from: str | None, run_dir: RunDir) -> Path | None:
    """The complete, verified step dir to resume from.

    resume_from=auto takes run_dir's LATEST; when it fails verify() (a file cut short, a shard gone),
    the newest older complete step dir that passes, saying which and why in the log; None when there
    is no checkpoint at all (a fresh start); an ArchiveError naming every problem when none passes. A
    path must name a complete checkpoint that passes, or the error says what is missing or wrong."""
    import logging

    if resume_from is None:
        return None
    if resume_from == "auto":
        latest = run_dir.latest_target()
        older = [p.resolve() for _, p in reversed(run_dir.step_dirs()) if is_complete(p)]
        if latest is not None:
            older = [p for p in older if p != latest and _examples(p) < _examples(latest)]
        candidates = ([latest] if latest is not None else []) + older
        rejected = []
        for step in candidates:
            problems = verify(step) + (
                [] if (step / DS_TAG).is_dir() else [f"{step} has no {DS_TAG}/ (weights only)"]
            )
            if not problems:
                if rejected:
                    logging.getLogger("dpo_ds").warning(
                        f"resume_from=auto: resuming from {step.name}, the newest checkpoint that passes its "
                        f"check; skipped: " + "; ".join(rejected)
                    )
                return step
            rejected.append(f"{step.name}: {'; '.join(problems)}")
        if rejected:
            raise ArchiveError(
                f"resume_from=auto: no checkpoint in {run_dir.root} passes its check: " + " | ".join(rejected)
            )
        return None
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
    problems = verify(step)
    if problems:
        raise ArchiveError(f"resume_from={resume_from}: {step} fails its check: " + "; ".join(problems))
    return step.resolve()


def _examples(step_dir: Path) -> int:
    tail = Path(step_dir).name[len(STEP_PREFIX) :]
    return int(tail) if tail.isdigit() else -1


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

    def allow_name(k: str) -> str:  # what resume.allow_changes calls it
        return DATA_ALLOW if k == DATA_KEY else k

    fixed = [k for k in diffs if k in RESUME_FIXED]
    refused = [k for k in diffs if allow_name(k) not in allow and k not in fixed]
    if fixed or refused:
        parts = []
        if refused:
            parts.append(
                "differs from the checkpoint's config: "
                + "; ".join(show(k) for k in refused)
                + f" (resume.allow_changes=[{','.join(allow_name(k) for k in refused)}] accepts these if that "
                f"is what you mean)"
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

    def __init__(self, run_dir: RunDir, settings, run_state: dict, rank: int, watchdog=None):
        self.run_dir = run_dir
        self.settings = settings  # config.CheckpointConfig
        self.run_state = run_state  # in every run_state.json besides its step: config, world, data digest
        self.rank = rank
        self.watchdog = watchdog  # names the save in a hang report
        self.failed_in_a_row = 0
        self.saves = 0
        self.last_bytes: int | None = None  # the last complete checkpoint's size: the free space a save needs

    def save(self, engine, step: int, examples: int, metrics: dict, final: bool = False) -> bool:
        """Whether step-{examples} is now LATEST; raises TrainingStopped when too many saves failed."""
        import logging

        from dpo_ds import engines
        from dpo_ds.guards import TrainingStopped

        log = logging.getLogger("dpo_ds")
        target = self.run_dir.step(examples)
        phase = (
            self.watchdog.phase(f"saving {target.name}", deadline=False) if self.watchdog else nullcontext()
        )
        try:
            with phase:
                self._check_space(target)
                self._prepare(target)
                engines.save_weights(engine, target, examples, metrics)  # policy.pt, or a LoRA adapter
                self.saves += 1
                _inject_fault(self.rank, self.saves)
                written = []
                if self.settings.save_optimizer:  # else weights only: policy.pt, nothing to resume from
                    written = engines.save_engine(engine, target, {"step": step, "examples": examples})
                # what every rank wrote through DeepSpeed, for the manifest rank 0 records
                written = [(os.path.relpath(p, target), n) for p, n in written]
                files = [f for part in engines.all_gather_objects(written) for f in part]
                state = {"step": step, "examples": examples, **self.run_state}
                self.last_bytes = self._complete(target, state, files)
        except engines.SaveError as e:
            self.failed_in_a_row += 1
            latest = self.run_dir.latest_target()
            if self.rank == 0:  # every rank knows the same error; once in the log is enough
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

    def _check_space(self, target: Path) -> None:
        """A save needs about what the last one took (its manifest says): every rank checks the free
        space it sees where the run dir is, and a save that would not fit is not begun."""
        from dpo_ds import engines

        if self.last_bytes is None:  # the first save of this process: the checkpoint LATEST names, if any
            self.last_bytes = engines.decided_by_rank0(lambda: manifest_bytes(self.run_dir.latest_target()))
        if not self.last_bytes:
            return
        free = engines.across_ranks([float(shutil.disk_usage(self.run_dir.root).free)])[:, 0]
        short = [(r, float(f)) for r, f in enumerate(free.tolist()) if f < self.last_bytes]
        if short:
            r, f = short[0]
            raise engines.SaveError(
                f"{target}: not begun: the last checkpoint took {self.last_bytes / 2**30:.2f} GiB and rank {r} "
                f"sees {f / 2**30:.2f} GiB free on the run dir's filesystem; free "
                f"{(self.last_bytes - f) / 2**30:.2f} GiB more, or keep fewer checkpoints (checkpoint.keep_last)"
            )

    def _complete(self, target: Path, state: dict, files: list[tuple[str, int]]) -> int:
        """run_state.json with the manifest, COMPLETE, then LATEST swapped to the step dir: rank 0, for
        all. Returns the checkpoint's size in bytes."""
        from dpo_ds import engines

        def complete():
            manifest = dict(files)  # DeepSpeed's files, from the ranks that wrote them; then all rank 0 sees
            for path in target.rglob("*"):
                if path.is_file() and path.name not in (RUN_STATE, COMPLETE):
                    manifest.setdefault(str(path.relative_to(target)), path.stat().st_size)
            mark_complete(target, {**state, MANIFEST: dict(sorted(manifest.items()))})
            point_latest(self.run_dir.root, target)
            return sum(manifest.values())

        try:
            return engines.decided_by_rank0(complete, (OSError,))
        except OSError as e:
            raise engines.SaveError(f"{target}: {type(e).__name__}: {e}") from None


def _inject_fault(rank: int, save_index: int) -> None:
    """Tests only: DPO_DS_TEST_KILL_IN_SAVE=R:K SIGKILLs rank R in its K-th save, once policy.pt is
    written and before its DeepSpeed shards are: a checkpoint half on disk."""
    import signal

    spec = os.environ.get("DPO_DS_TEST_KILL_IN_SAVE")
    if spec and spec == f"{rank}:{save_index}":
        os.kill(os.getpid(), signal.SIGKILL)
