"""The run directory: every name in it is spelled here (run/: the run dir and its lock, archives,
resume rules, the save protocol; everything in it reads these names from this module).

{run_dir}/config.yaml               the resolved dpo_ds config
{run_dir}/ds_config.json            the resolved DeepSpeed config
{run_dir}/metrics.jsonl             one JSON record per step and per eval (rank 0)
{run_dir}/samples.jsonl             greedy samples at each eval (sample_during_eval=true)
{run_dir}/data_report.json          the data report of the data phase (data/report.py), rank 0
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
import zipfile
from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
DATA_REPORT = "data_report.json"
REFERENCE_CACHE = "reference_logps.pt"
LATEST = "LATEST"
POLICY = "policy.pt"
DS_TAG = "ds"  # the tag of DeepSpeed's checkpoint in a step dir (run/save.py, run/resume.py): step-N/ds/
STEP_PREFIX = "step-"
COMPLETE = "COMPLETE"
RUN_STATE = "run_state.json"
RUN_LOCK = "RUN_LOCK"
MANIFEST = "files"  # run_state.json's key: every file of the step dir and its size in bytes
CHECKSUMS = "checksums"  # run_state.json's key: every file's checksum, computed as it was written
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
    def data_report(self) -> Path:
        return self.root / DATA_REPORT

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

    def hang_report(self, rank: int | str) -> Path:
        return self.root / f"hang-rank{rank}.txt"

    def results(self) -> list[str]:
        """What a run produced here, beyond a failed start's leftovers (its lock, config files, token cache):
        taken(), the reference log-probs, hang reports, step dirs. A failed start removes a run dir it made
        only without any of them."""
        extra = [self.reference_cache, *self.root.glob(self.hang_report("*").name)]
        found = [p.name for p in extra if p.exists() or p.is_symlink()]
        return self.taken() + found + [p.name for _, p in self.step_dirs()]

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


def manifest_bytes(step_dir: Path | None) -> int:
    """The size a complete checkpoint's manifest records (0: none, or written before manifests)."""
    if step_dir is None:
        return 0
    try:
        return int(sum(read_run_state(step_dir).get(MANIFEST, {}).values()))
    except ArchiveError:
        return 0


def verify(
    step_dir: Path, checksums: bool = False, read: list | None = None, only: str | None = None
) -> list[str]:
    """What is wrong with a complete checkpoint, checked against the manifest its save recorded: each
    file present with its size, and each torch file's zip directory readable (a file cut short has
    none); that much reads no file whole. With `checksums`, each file that passes is then read once and
    its checksum compared with the one recorded as it was written (a file damaged at its own size); the
    bytes read are added to `read` ([bytes]) when given; `only`: that file of the step dir alone. [] when it
    passes (or predates manifests: nothing to check)."""
    step_dir = Path(step_dir)
    try:
        state = read_run_state(step_dir)
    except ArchiveError as e:
        return [str(e)]
    manifest = state.get(MANIFEST)
    if manifest is None:
        return []
    sums = state.get(CHECKSUMS) or {}
    if only is not None:
        manifest = {k: v for k, v in manifest.items() if k == only}
        sums = {k: v for k, v in sums.items() if k == only}
    problems = _check_sizes(step_dir, manifest)
    if checksums and not problems:
        problems = _check_sums(step_dir, sums, read)
    return problems


def _check_sums(step_dir: Path, sums: dict, read: list | None) -> list[str]:
    from dpo_ds.engine.checksum import file_digest

    problems = []
    for rel, want in sums.items():
        path = step_dir / rel
        have = file_digest(path)
        if read is not None:
            read[0] += path.stat().st_size
        if have != want:
            problems.append(
                f"{path} does not match the checksum its save recorded ({want}; the file now gives {have}): "
                f"damaged at its own size"
            )
    return problems


def _check_sizes(step_dir: Path, manifest: dict) -> list[str]:
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


REJECTED = ".rejected"  # a step dir a resume skipped, set aside until the next checkpoint completes


def set_aside_newer(run_dir: RunDir, start: Path) -> list[Path]:
    """After resume_from=auto skipped the newer step dirs (each failed its check): rename them to
    step-N.rejected and point LATEST at `start`. Left in place, a damaged step dir would count among
    checkpoint.keep_last's newest and rotate out the good ones, and a save of the same step would write into
    a dir whose COMPLETE is already there. rotate() removes them once a newer checkpoint is complete. Rank 0
    only. Returns the new paths."""
    moved = []
    for examples, p in run_dir.step_dirs():
        if examples > int(start.name[len(STEP_PREFIX) :]):
            aside = p.with_name(p.name + REJECTED)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(p, aside)
            moved.append(aside)
    if run_dir.latest_target() != Path(start).resolve():
        point_latest(run_dir.root, Path(start))
    return moved


def rotate(run_dir: RunDir, keep_last: int) -> list[Path]:
    """Delete step dirs beyond the `keep_last` newest complete ones, incomplete ones (a failed or killed
    save), and those a resume set aside (set_aside_newer); never LATEST's target. Rank 0 only. Returns
    what it deleted."""
    target = run_dir.latest_target()
    complete = [p for _, p in run_dir.step_dirs() if is_complete(p)]
    keep = set(complete[-keep_last:]) if keep_last else set(complete)
    gone = []
    for p in sorted(run_dir.root.glob(f"{STEP_PREFIX}*{REJECTED}")):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
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
