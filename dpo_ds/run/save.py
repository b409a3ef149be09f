"""The save protocol: a step dir written by every rank alike (the weights streamed while gathering, the
DeepSpeed checkpoint, run_state.json with its manifest, COMPLETE), then LATEST moved to it."""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from dpo_ds.dist.comm import across_ranks, all_gather_objects, by_rank, decided_by_rank0, fail_alike
from dpo_ds.dist.faults import kill_in_save
from dpo_ds.dist.memory import format_bytes
from dpo_ds.engine import checksum
from dpo_ds.engine import io as engine_io
from dpo_ds.engine.step import unwrap_lm
from dpo_ds.model import adapters
from dpo_ds.run.dir import (
    CHECKSUMS,
    COMPLETE,
    DS_TAG,
    MANIFEST,
    RUN_STATE,
    RunDir,
    ds_dir,
    manifest_bytes,
    mark_complete,
    point_latest,
    policy_file,
    rotate,
)


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite steps in a row, saves failing in a row); raised on every rank."""


class SaveError(RuntimeError):
    """A checkpoint that was not written (or must not become LATEST); raised on every rank alike."""


def save_weights(engine, step_dir: Path, step_idx: int, metrics: dict) -> None:
    """The step dir's weights: policy.pt (the full model), or with LoRA the adapter alone in peft's
    format; nothing gathers the base of a LoRA policy."""
    if adapters.is_lora(unwrap_lm(engine)):
        save_adapter(engine, step_dir)
    else:
        save_policy(engine, policy_file(step_dir), step_idx, metrics)


def save_adapter(engine, step_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) in step_dir: every rank gathers
    each adapter parameter in turn (ZeRO-3), rank 0 keeps a copy and writes; SaveError on every rank if
    it could not."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    peft_model = unwrap_lm(engine)
    rank = torch.distributed.get_rank()
    state = {}
    for name, p in engine_io.gathered(engine_io.trainable_parameters(engine)):
        if rank == 0:
            state[name] = p.detach().clone().cpu().contiguous()

    def write():
        adapter = get_peft_model_state_dict(peft_model, state_dict=state)
        tmp = Path(step_dir) / f".{adapters.ADAPTER_WEIGHTS}.tmp"
        digest = checksum.write_bytes(tmp, save(adapter, metadata={"format": "pt"}))
        checksum.take(tmp)
        os.replace(tmp, Path(step_dir) / adapters.ADAPTER_WEIGHTS)
        checksum.record(Path(step_dir) / adapters.ADAPTER_WEIGHTS, digest)
        config = peft_model.peft_config["default"]
        config.save_pretrained(str(step_dir))

    try:
        decided_by_rank0(write, (OSError, RuntimeError, ValueError))
    except (OSError, RuntimeError, ValueError) as e:
        raise SaveError(f"{step_dir}: the adapter: {type(e).__name__}: {e}") from None


def save_policy(engine, path: Path, step_idx: int, metrics: dict) -> None:
    """{'step_idx', 'state', 'metrics'} at `path`, as torch.save would write the HF model's state dict,
    streamed while gathering: every rank gathers one ZeRO-3 parameter at a time, rank 0 writes its
    bytes and drops it, so no rank ever holds more than the largest tensor beyond its own shard. The
    weights are checked finite on the way. Every rank must call this; every rank raises SaveError
    alike if rank 0 could not write the file (which is then absent) or found non-finite weights."""
    from dpo_ds.run.archive_writer import STATE, ArchiveWriter, TensorSpec

    lm = unwrap_lm(engine)
    rank = torch.distributed.get_rank()
    state = lm.state_dict(keep_vars=True)  # names in state-dict order; tied names share one tensor
    first: dict[int, str] = {}
    specs = []
    for name, t in state.items():
        owner = first.setdefault(id(t), name)
        shape = tuple(getattr(t, "ds_shape", t.shape))  # a ZeRO-3 parameter's full shape
        specs.append(TensorSpec(name, shape, t.dtype, alias_of=None if owner == name else owner))
    error, nonfinite = None, []
    writer = None
    if rank == 0:
        try:
            writer = ArchiveWriter(path, {"step_idx": step_idx, "state": STATE, "metrics": metrics}, specs)
            writer.__enter__()
        except Exception as e:  # noqa: BLE001 - reported on every rank below, after the gathers
            error, writer = f"{type(e).__name__}: {e}", None
    for name, t in engine_io.gathered((n, t) for n, t in state.items() if first[id(t)] == n):
        if writer is not None:
            try:
                full = t.detach()
                # in chunks: a whole isfinite() mask of the largest tensor would be a second copy of it
                if full.is_floating_point() and not all(
                    bool(torch.isfinite(c).all()) for c in full.reshape(-1).split(1 << 22)
                ):
                    nonfinite.append(name)
                writer.write(name, full)
            except Exception as e:  # noqa: BLE001 - keep gathering: the other ranks are in this loop too
                error = error or f"{type(e).__name__}: {e}"

    def finish():  # rank 0: the file whole, or no file and the reason
        problem = error
        if writer is not None:
            try:
                if problem or nonfinite:
                    writer.__exit__(SaveError, SaveError("not saved"), None)  # leaves no file behind
                else:
                    writer.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001
                problem = problem or f"{type(e).__name__}: {e}"
        if nonfinite and not problem:
            problem = (
                f"non-finite weights in {nonfinite[:4]}{' ...' if len(nonfinite) > 4 else ''}; not saved"
            )
        if problem:
            raise SaveError(f"{path}: {problem}")

    decided_by_rank0(finish, (SaveError,))


def save_engine(engine, directory: Path, client_state: dict) -> list[tuple[str, int, str]]:
    """Sharded DeepSpeed checkpoint (module, optimizer, scheduler) for resume, in directory/ds; every rank
    calls it. Returns (path, bytes, checksum) of the files this rank wrote; raises SaveError on every rank
    alike when a write failed on any (the failing ranks' errors named)."""
    errors, written = engine_io.save_checkpoint(engine, directory, DS_TAG, client_state)
    fail_alike("; ".join(errors) or None, lambda failed: SaveError(f"{ds_dir(directory)}: {by_rank(failed)}"))
    return _described(written)


def _described(paths: list[str]) -> list[tuple[str, int, str]]:
    """(path, bytes, checksum) of each written file: the checksum its writer recorded, or read once."""
    return [(p, os.path.getsize(p), checksum.taken_or_read(p)) for p in paths if os.path.exists(p)]


def save_extra(directory: Path, write) -> list[tuple[str, int, str]]:
    """write(directory) on every rank (a resume's state beside DeepSpeed's, written with checksum.save_torch);
    (path, bytes, checksum) of what this rank wrote; SaveError on every rank alike when a write failed on
    any."""
    error, written = None, []
    try:
        written = write(directory)
    except (OSError, RuntimeError) as e:  # torch.save's full disk is a RuntimeError
        error = f"{type(e).__name__}: {e}"
    fail_alike(error, lambda failed: SaveError(f"{directory}: {by_rank(failed)}"))
    return _described(written)


class Checkpointer:
    """The save protocol, which every rank runs alike: step-{examples}/ gets policy.pt (streamed while
    gathering: rank 0 never holds the whole model), the DeepSpeed checkpoint, run_state.json, then
    COMPLETE; only then does LATEST move to it, and old step dirs are rotated out. Every rank agrees on
    the outcome. A failed save is logged and training goes on with the previous LATEST, until
    checkpoint.max_failed_saves fail in a row (or the final one fails): then TrainingStopped."""

    def __init__(
        self, run_dir: RunDir, settings, run_state: dict, rank: int, watchdog=None, extra_state=None
    ):
        self.run_dir = run_dir
        # what else a resume needs, beside DeepSpeed's checkpoint: step_dir -> the paths this rank wrote there
        # (TR-DPO's moved reference); None: nothing
        self.extra_state = extra_state
        self.settings = settings  # config.CheckpointConfig
        self.run_state = run_state  # in every run_state.json besides its step: config, world, data digest
        self.rank = rank
        self.watchdog = watchdog  # names the save in a hang report
        self.failed_in_a_row = 0
        self.saves = 0
        self.last_bytes: int | None = None  # the last complete checkpoint's size: the free space a save needs

    def save(
        self, engine, step: int, examples: int, metrics: dict, final: bool = False, blocked: str | None = None
    ) -> bool:
        """Whether step-{examples} is now LATEST; raises TrainingStopped when too many saves failed. `blocked`:
        why this save must not begin (agreed on every rank), a failed save like any other."""
        import logging

        log = logging.getLogger("dpo_ds")
        target = self.run_dir.step(examples)
        phase = (
            self.watchdog.phase(f"saving {target.name}", deadline=False) if self.watchdog else nullcontext()
        )
        try:
            with phase:
                if blocked:
                    raise SaveError(f"{target}: not begun: {blocked}")
                self._check_space(target)
                self._prepare(target)
                save_weights(engine, target, examples, metrics)  # policy.pt, or a LoRA adapter
                self.saves += 1
                kill_in_save(self.rank, self.saves)
                written = []
                if self.settings.save_optimizer:  # else weights only: policy.pt, nothing to resume from
                    written = save_engine(engine, target, {"step": step, "examples": examples})
                    if self.extra_state is not None:
                        written += save_extra(target, self.extra_state)
                # what every rank wrote through DeepSpeed, for the manifest rank 0 records
                written = [(os.path.relpath(p, target), n, digest) for p, n, digest in written]
                files = [f for part in all_gather_objects(written) for f in part]
                state = {"step": step, "examples": examples, **self.run_state}
                self.last_bytes = self._complete(target, state, files)
        except SaveError as e:
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

        def make():
            if target.exists() and target.resolve() != self.run_dir.latest_target():
                shutil.rmtree(target)
                checksum.forget_under(target)
            target.mkdir(parents=True, exist_ok=True)

        try:
            decided_by_rank0(make, (OSError,))
        except OSError as e:  # the OSError rank 0 met, raised on every rank
            raise SaveError(f"{target}: {type(e).__name__}: {e}") from None

    def _check_space(self, target: Path) -> None:
        """A save needs about what the last one took (its manifest says): every rank checks the free
        space it sees where the run dir is, and a save that would not fit is not begun."""
        if self.last_bytes is None:  # the first save of this process: the checkpoint LATEST names, if any
            self.last_bytes = decided_by_rank0(lambda: manifest_bytes(self.run_dir.latest_target()))
        if not self.last_bytes:
            return
        free = across_ranks([float(shutil.disk_usage(self.run_dir.root).free)])[:, 0]
        short = [(r, float(f)) for r, f in enumerate(free.tolist()) if f < self.last_bytes]
        if short:
            r, f = short[0]
            raise SaveError(
                f"{target}: not begun: the last checkpoint took {format_bytes(self.last_bytes)} and rank {r} "
                f"sees {format_bytes(f)} free on the run dir's filesystem; free "
                f"{format_bytes(self.last_bytes - f)} more, or keep fewer checkpoints (checkpoint.keep_last)"
            )

    def _complete(self, target: Path, state: dict, files: list[tuple[str, int, str]]) -> int:
        """run_state.json with the manifest (each file's size and checksum), COMPLETE, then LATEST swapped
        to the step dir: rank 0, for all. Returns the checkpoint's size in bytes."""

        def complete():
            # DeepSpeed's files, from the ranks that wrote them; then all rank 0 sees (policy.pt's checksum
            # recorded by its writer, a library's own small files read once)
            manifest = {rel: n for rel, n, _ in files}
            sums = {rel: digest for rel, _, digest in files}
            for path in target.rglob("*"):
                rel = str(path.relative_to(target))
                if path.is_file() and path.name not in (RUN_STATE, COMPLETE) and rel not in manifest:
                    manifest[rel] = path.stat().st_size
                    sums[rel] = checksum.taken_or_read(path)
            mark_complete(
                target,
                {**state, MANIFEST: dict(sorted(manifest.items())), CHECKSUMS: dict(sorted(sums.items()))},
            )
            point_latest(self.run_dir.root, target)
            return sum(manifest.values())

        try:
            return decided_by_rank0(complete, (OSError,))
        except OSError as e:
            raise SaveError(f"{target}: {type(e).__name__}: {e}") from None
