"""Resume rules: which step dir a run resumes from, whether its config and data may, and loading its
DeepSpeed state into the policy engine."""

from __future__ import annotations

from pathlib import Path

from dpo_ds.config import ConfigError
from dpo_ds.dist.comm import by_rank, fail_alike
from dpo_ds.engine import io as engine_io
from dpo_ds.run.dir import (
    COMPLETE,
    DS_TAG,
    RUN_STATE,
    STEP_PREFIX,
    ArchiveError,
    RunDir,
    ds_dir,
    find_step_dir,
    is_complete,
)
from dpo_ds.run.dir import verify as verify_step

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


def resolve_resume(resume_from: str | None, run_dir: RunDir, checksums: bool = True) -> Path | None:
    """The complete, verified step dir to resume from.

    resume_from=auto takes run_dir's LATEST; when it fails verify() (a file cut short, a shard gone, with
    `checksums` a file whose bytes no longer match the checksum its save recorded), the newest older
    complete step dir that passes, saying which and why in the log; None when there is no checkpoint at
    all (a fresh start); an ArchiveError naming every problem when none passes. A path must name a
    complete checkpoint that passes, or the error says what is missing or wrong. The checksums' read is
    logged with its size and time (checkpoint.verify_checksums=false skips it)."""
    import logging
    import time

    if resume_from is None:
        return None

    def verify(step: Path) -> list[str]:
        read, began = [0], time.perf_counter()
        problems = verify_step(step, checksums, read)
        if read[0]:
            logging.getLogger("dpo_ds").info(
                f"resume: read {read[0] / 2**30:.2f} GiB of {step.name} to compare each file with the checksum "
                f"its save recorded, in {time.perf_counter() - began:.1f} s "
                f"(checkpoint.verify_checksums=false skips this read)"
            )
        return problems

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


def load_engine(engine, directory: Path) -> dict:
    if not ds_dir(directory).is_dir():
        raise ConfigError(
            f"resume_from: {directory} holds no DeepSpeed checkpoint ({ds_dir(directory)} is missing; a run "
            f"with checkpoint.save_optimizer=false saves weights only, which cannot resume a run)"
        )
    error, client_state = engine_io.load_checkpoint(engine, directory, DS_TAG)
    fail_alike(
        error, lambda failed: ArchiveError(f"resume_from: {directory} cannot be loaded: {by_rank(failed)}")
    )
    return client_state
