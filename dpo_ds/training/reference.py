"""Where the reference log-probs of a micro-batch come from: the one thing the trainer asks.

    LiveReference         a frozen inference engine beside the policy (model.reference_mode=engine)
    PrecomputedReference  a table computed once before training by a reference engine that is then
                          destroyed, so none exists while the policy trains (reference_mode=precomputed)
    NoReference           the objective needs none (SFT, reference-free losses): nothing is built

Each answers `logps(batch)` with the reference's per-sequence log-probs (2 * pairs,) in the
collators' order, or None; and `sampler()`, a context giving the model the reference's samples are
generated from at eval, or None (a precomputed or absent reference has none).

The precomputed table lives in `reference_logps.pt` (run/dir.py's RunDir names it) with a fingerprint
of everything that changes its numbers. A rerun or resume with the same fingerprint reuses it when it
holds every example the run uses (else computes it again, keeping the values it held); a cache whose
fingerprint differs is refused, naming what changed; it is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from dpo_ds.config import ConfigError
from dpo_ds.data.batches import data_digest
from dpo_ds.engine import checksum
from dpo_ds.model.lm import sequence_logps

log = logging.getLogger("dpo_ds")


class ReferenceMode:
    """A reference mode, registered in config.REFERENCE_MODES under the value of model.reference_mode that
    picks it: what it needs of the config, when it is built, what it holds, and how it is built. Config
    validation, the planner and the run ask it; a new mode is a subclass and a register() call."""

    holds_engine = False  # whether a reference model is resident beside the policy while it trains (planner)

    @classmethod
    def check(cls, cfg, need) -> None:
        """The mode's own requirements of the config: need(ok, key, message) raises naming the key."""

    @classmethod
    def built_before_policy(cls, cfg) -> bool:
        """Whether it is built before the policy (a model of its own, which should take its memory first)."""
        return True

    @classmethod
    def build(cls, cfg, *, policy=None, **context):
        """The reference source for the run (build_reference_source's arguments; `policy` given after it)."""
        raise NotImplementedError


class NoReference:
    last_load = None  # an MoE reference's expert load of its latest micro-batch (training/experts.py)

    def logps(self, batch: dict) -> torch.Tensor | None:
        return None

    def sampler(self):
        """The model the reference's samples are generated from: none here."""
        return nullcontext(None)


class LiveReference(ReferenceMode):
    """A frozen inference engine run on the same micro-batch as the policy, under no_grad
    (model.reference_mode=engine)."""

    holds_engine = True

    @classmethod
    def check(cls, cfg, need) -> None:
        if cfg.model.lora.r:
            need(
                False,
                "model.reference_mode",
                "is engine, a second copy of the base model beside a LoRA policy whose own base, adapters off, is "
                "that reference; use adapters_off (the default with LoRA) or precomputed",
            )

    @classmethod
    def build(cls, cfg, *, ref_config, model_dir, start, layout, sp=None, **context):
        from dpo_ds.engine import build as engine_build

        lm = engine_build.build_base(
            model_dir, ref_config, cfg.model.reference_dtype, start, attn=layout.attn
        )
        return cls(engine_build.build_reference(lm, ref_config, cfg, sp))

    def __init__(self, engine):
        self.engine = engine
        self.last_load = None  # an MoE's expert load of the latest micro-batch (training/experts.py)

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            seqs = sequence_logps(self.engine, batch)
        self.last_load = seqs.load
        return seqs.logps.float()

    def sampler(self):
        return nullcontext(self.engine)

    # TR-DPO (model.reference_sync_steps): the reference moves toward the policy, and its state is checkpointed

    def sync(self, policy, alpha: float) -> None:
        """reference <- alpha * policy + (1 - alpha) * reference, each shard where it lives (every rank alike)."""
        from dpo_ds.engine.reference_sync import mix_into

        mix_into(self.engine.module, policy.module, alpha)

    def save_state(self, step_dir: Path) -> list[str]:
        """This rank's part of the moved reference, in step_dir/reference/rank{r}.pt; the paths written."""
        return _save_moved(self.engine.module, step_dir)

    def load_state(self, step_dir: Path) -> None:
        """save_state's file for this rank back into the reference; an error naming it when it is missing."""
        _load_moved(self.engine.module, step_dir)


def _save_moved(module, step_dir: Path) -> list[str]:
    """TR-DPO: this rank's part of a moved reference engine (engine.reference_sync.local_state) in
    step_dir/reference/rank{r}.pt; the paths written."""
    from dpo_ds.engine.reference_sync import local_state

    path = _state_file(step_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    checksum.save_torch(local_state(module), path)
    return [str(path)]


def _load_moved(module, step_dir: Path) -> None:
    """_save_moved's file for this rank back into `module`; an error naming the file when it is missing."""
    from dpo_ds.engine.reference_sync import load_local_state

    path = _state_file(step_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the moved reference of this checkpoint is missing (model.reference_sync_steps needs it to "
            "resume; a checkpoint written without TR-DPO has none)"
        )
    load_local_state(module, torch.load(path, map_location="cpu", weights_only=True), str(path))


def initial_eval_logps(run_dir: Path, reference, eval_batches, device) -> PrecomputedReference:
    """TR-DPO: the initial reference's log-probs of this rank's eval examples, taken before the first sync and
    kept in {run_dir}/reference_initial_eval/rank{r}.pt (a resumed run reads them back: its reference has moved
    since), as a precomputed table, so that the eval's likelihood-displacement statistics (and the guard that
    reads them) measure against the reference the run started from."""
    path = Path(run_dir) / "reference_initial_eval" / f"rank{_rank()}.pt"
    if path.is_file():
        return PrecomputedReference(torch.load(path, weights_only=True))
    rows: dict[str, dict[int, torch.Tensor]] = {}
    for micro_batches, _ in eval_batches:
        for micro in micro_batches:
            chosen, rejected = reference.logps(micro.to(device)).detach().cpu().float().chunk(2)
            for i, example in enumerate(micro.example_ids.tolist()):
                rows.setdefault(micro.split, {})[example] = torch.stack([chosen[i], rejected[i]])
    tables = {}
    for split, by_id in rows.items():  # PrecomputedReference's layout: NaN for the examples not held here
        tables[split] = torch.full((max(by_id) + 1, 2), float("nan"))
        for example, pair in by_id.items():
            tables[split][example] = pair
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tables, path)
    return PrecomputedReference(tables)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _state_file(step_dir: Path) -> Path:
    return Path(step_dir) / "reference" / f"rank{_rank()}.pt"


class AdaptersOffReference(ReferenceMode):
    """The LoRA policy's own base: the same engine, its adapters switched off, under no_grad, on the
    same micro-batch and in the same order on every rank. No second copy of the weights
    (model.reference_mode=adapters_off)."""

    @classmethod
    def check(cls, cfg, need) -> None:
        need(
            cfg.model.lora.r > 0,
            "model.reference_mode",
            "is adapters_off, which needs LoRA (model.lora.r > 0)",
        )

    @classmethod
    def built_before_policy(cls, cfg) -> bool:
        return False  # it is the policy

    @classmethod
    def build(cls, cfg, *, policy=None, **context):
        return cls(policy)

    def __init__(self, engine):
        self.engine = engine
        self.last_load = None  # an MoE's expert load of the latest micro-batch (training/experts.py)
        # TR-DPO: the rank of the reference adapter in use (model.adapters.add_reference_adapter); 0: the base
        self.used = 0

    def _as_reference(self):
        """The policy's engine as the reference: its adapters off, or, once TR-DPO has moved the reference,
        the reference adapter in place of the policy's."""
        from dpo_ds.engine.step import unwrap_lm
        from dpo_ds.model.adapters import reference_adapter_active

        lm = unwrap_lm(self.engine)
        return reference_adapter_active(lm) if self.used else lm.disable_adapter()

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self._as_reference():
            seqs = sequence_logps(self.engine, batch)
        self.last_load = seqs.load
        return seqs.logps.float()

    @contextmanager
    def sampler(self):
        """The reference's samples: the policy's engine as the reference."""
        with self._as_reference():
            yield self.engine

    # TR-DPO (model.reference_sync_steps) under LoRA: the reference adapter moves, exactly (reference_sync.py)

    def sync(self, policy, alpha: float) -> None:
        from dpo_ds.engine.reference_sync import mix_reference_adapter
        from dpo_ds.engine.step import unwrap_lm

        self.used = mix_reference_adapter(unwrap_lm(self.engine), alpha, self.used)

    def save_state(self, step_dir: Path) -> list[str]:
        """The reference adapter's columns in use, gathered (every rank), written by rank 0 to
        step_dir/reference/adapter.pt: a resume may then run longer or on other ranks."""
        from dpo_ds.engine.reference_sync import adapter_state
        from dpo_ds.engine.step import unwrap_lm

        state = {"used": self.used, "layers": adapter_state(unwrap_lm(self.engine), self.used)}
        if _rank():
            return []
        path = Path(step_dir) / "reference" / "adapter.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        checksum.save_torch(state, path)
        return [str(path)]

    def load_state(self, step_dir: Path) -> None:
        """save_state's file back into the reference adapter; an error naming it when it is missing."""
        from dpo_ds.engine.reference_sync import load_adapter_state
        from dpo_ds.engine.step import unwrap_lm

        path = Path(step_dir) / "reference" / "adapter.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the moved reference adapter of this checkpoint is missing")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.used = int(state["used"])
        load_adapter_state(unwrap_lm(self.engine), state["layers"], self.used, str(path))


class PrecomputedReference(NoReference, ReferenceMode):
    """Looks a micro-batch's reference log-probs up by its examples' ids: tables[split] is
    (examples, 2) fp32 (chosen, rejected), NaN for examples the run never uses. No model to sample from
    (model.reference_mode=precomputed; built by precompute())."""

    @classmethod
    def built_before_policy(cls, cfg) -> bool:
        return not cfg.model.lora.r  # with LoRA the policy, adapters off, computes the table

    @classmethod
    def build(cls, cfg, **context):
        return precompute(cfg, **context)

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def logps(self, batch: dict) -> torch.Tensor:
        rows = self.tables[batch.split][batch.example_ids.cpu()]  # (pairs, 2)
        if torch.isnan(rows).any():  # an example the pre-pass did not compute: never guess
            missing = batch.example_ids[torch.isnan(rows).any(dim=1).to(batch.example_ids.device)]
            raise RuntimeError(
                f"no precomputed reference log-probs for {batch.split} examples {missing.tolist()}"
            )
        device = batch.input_ids.device
        return torch.cat([rows[:, 0], rows[:, 1]]).to(device)  # (2 * pairs,) chosen then rejected


# ----------------------------------------------------------------------------- fingerprint


def _file_facts(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()} {st.st_size} bytes, mtime {int(st.st_mtime)}"


def weights_facts(start) -> str:
    """What the reference's weights are (start.Start): the files they come from, or a seeded init."""
    facts = "; ".join(_file_facts(f) for f in start.files if f.is_file())
    return f"{start.describe()}: {facts}" if facts else start.describe()


def fingerprint(cfg, model_dir: Path, splits, start, layout, by_policy: bool = False) -> dict[str, str]:
    """by_policy: the LoRA policy, adapters off, computes the table, in model.policy_dtype; else a
    reference engine, in model.reference_dtype. The key names the one it is computed in."""
    dtype = "model.policy_dtype" if by_policy else "model.reference_dtype"
    return {
        "reference weights": weights_facts(start),
        "model config": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "data (token ids of every example)": data_digest(splits),
        dtype: cfg.model.policy_dtype if by_policy else cfg.model.reference_dtype,
        "model.logprob_impl": cfg.model.logprob_impl,
        "data.layout": layout.describe(),
        # LD-DPO weighs the reference's tokens too: a table of one ld_alpha is no table of another
        **({"loss.ld_alpha": str(cfg.loss.ld_alpha)} if cfg.loss.ld_alpha is not None else {}),
    }


def _changed(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def needed(cfg, splits) -> dict[str, list[int]]:
    """Split -> the examples whose reference log-probs the run looks up: every one it trains on
    (n_epochs, n_examples) and every one its evals run (n_eval_examples)."""
    train, evaluation = splits
    return {
        train.split: train.first_pass_examples(cfg.n_epochs, cfg.n_examples),
        evaluation.split: evaluation.eval_examples(cfg.n_eval_examples),
    }


def lacking(tables: dict[str, torch.Tensor], need: dict[str, list[int]]) -> dict[str, int]:
    """Split -> how many of the examples `need` names `tables` holds no values for (splits lacking none left out)."""
    out = {}
    for split, ids in need.items():
        table = tables.get(split, torch.empty(0, 2))
        idx = torch.tensor(ids, dtype=torch.long)
        inside = idx < table.shape[0]
        n = int((~inside).sum()) + int(torch.isnan(table[idx[inside]]).any(dim=1).sum())
        if n:
            out[split] = n
    return out


def read_cache(
    path: Path, want: dict[str, str], need: dict[str, list[int]] | None = None
) -> dict[str, torch.Tensor] | None:
    """The cached tables when `path` holds a complete cache with this fingerprint that has values for
    every example `need` names; None when there is none, when it lacks some of them, or when its
    fingerprint differs in its keys alone (an older dpo_ds's): computed again, said in the log; a
    ConfigError naming what changed when there is one for something else."""
    if not path.is_file():
        return None
    cache = _load(path)
    changed = _changed(cache["fingerprint"], want)
    if changed and all(k not in cache["fingerprint"] or k not in want for k in changed):  # keys only
        log.info(
            f"reference cache {path} has a fingerprint of other keys ({', '.join(changed)}); computing it again"
        )
        return None
    if changed:
        what = "; ".join(f"{k}: {cache['fingerprint'].get(k)!r} -> {want.get(k)!r}" for k in changed)
        raise ConfigError(
            f"reference cache {path} was computed for a different run ({what}); delete it to compute it "
            f"again, or point data.cache_dir elsewhere"
        )
    try:  # rank 0 decides for every rank (decided_by_rank0 passes ConfigError on): nothing else may escape
        missing = lacking(cache["tables"], need or {})
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        raise ConfigError(
            f"reference cache {path} is malformed ({type(e).__name__}: {e}); delete it to compute it again"
        ) from None
    if missing:
        what = ", ".join(f"{n} of the {len(need[split])} {split} examples" for split, n in missing.items())
        log.info(
            f"reference cache {path} lacks {what} this run uses (it was computed for fewer or other examples: "
            f"n_examples, n_epochs, n_eval_examples); computing it again"
        )
        return None
    return cache["tables"]


def _load(path: Path) -> dict:
    """A complete cache file's contents; a ConfigError for one that cannot be read or is incomplete."""
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a cut-short or foreign file is refused, never half-used
        raise ConfigError(
            f"reference cache {path} cannot be read ({type(e).__name__}: {e}); delete it"
        ) from None
    if not isinstance(cache, dict) or not cache.get("complete") or "fingerprint" not in cache:
        raise ConfigError(f"reference cache {path} is incomplete; delete it to compute it again")
    return cache


def with_cached(path: Path, want: dict[str, str], tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tables`, the examples they lack filled from a complete cache at `path` with this fingerprint, if
    any: runs sharing data.cache_dir with fewer or other examples grow one table rather than take turns."""
    try:
        cache = _load(path) if path.is_file() else None
    except ConfigError:  # nothing to keep from a file that cannot be read
        cache = None
    if cache is None or cache["fingerprint"] != want:
        return tables
    try:
        old = cache["tables"]
        return {
            split: torch.where(torch.isnan(t), old[split], t)
            if split in old and old[split].shape == t.shape
            else t
            for split, t in tables.items()
        }
    except (KeyError, TypeError, AttributeError, RuntimeError):  # a malformed cache: nothing to keep from it
        return tables


def write_cache(path: Path, want: dict[str, str], tables: dict[str, torch.Tensor]) -> None:
    """Whole or nothing: a temporary file, fsync, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"fingerprint": want, "tables": tables, "complete": True}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the pre-pass


@torch.no_grad()
def compute_tables(engine, passes: dict[str, tuple[int, Iterable[dict]]], device, gather) -> dict:
    """passes: split -> (its number of examples, the micro-batches this rank's training steps or evals
    will run, in their order). Running those very micro-batches (same examples together, same padding
    or rows, same order) makes every value what the live engine would compute at that step, bit for
    bit: the pre-pass sums each sequence's log-probs in the training forward's order. Every rank runs
    its own (the same count on every rank, as training does); `gather` (all_gather_object) then gives
    every rank the whole table. An example met again (a later epoch) keeps its first value."""
    tables = {}
    for split, (n_examples, micro_batches) in passes.items():
        rows: dict[int, tuple[float, float]] = {}
        for micro in micro_batches:
            seqs = sequence_logps(engine, micro.to(device))
            chosen, rejected = seqs.chosen.float().cpu(), seqs.rejected.float().cpu()
            for k, i in enumerate(micro.example_ids.tolist()):
                rows.setdefault(i, (chosen[k].item(), rejected[k].item()))
        table = torch.full((n_examples, 2), float("nan"), dtype=torch.float32)
        for part in gather(rows):
            for i, (c, r) in part.items():
                table[i, 0], table[i, 1] = c, r
        tables[split] = table
        done = int((~torch.isnan(table[:, 0])).sum())
        if done:
            log.info(f"reference log-probs precomputed for {done} {split} examples")
    return tables


def built_before_policy(cfg, objective) -> bool:
    """Whether the reference is built before the policy (the mode says: a model of its own, live or a
    precomputed pre-pass whose engine is destroyed before the policy and its optimizer take the memory)."""
    from dpo_ds.config import REFERENCE_MODES, reference_mode

    return objective.needs_reference and REFERENCE_MODES.get(reference_mode(cfg)).built_before_policy(cfg)


def build_reference_source(cfg, objective, **context):
    """The reference the objective asked for, from the mode model.reference_mode names: nothing; a live
    engine; the policy with its adapters off (LoRA, `policy` given); or a table precomputed by a reference
    engine destroyed before the policy exists (or, with LoRA, by the policy with its adapters off)."""
    from dpo_ds.config import REFERENCE_MODES, reference_mode

    if not objective.needs_reference:
        return NoReference()
    return REFERENCE_MODES.get(reference_mode(cfg)).build(cfg, **context)


def precompute(
    cfg,
    *,
    ref_config: dict | None,
    model_dir: Path,
    start,
    splits,
    run_dir,
    rank: int,
    world: int,
    device,
    resume_dir: Path | None = None,
    layout,
    sp=None,
    policy=None,
):
    """The table of a precomputed reference: read from a cache whose fingerprint matches, or computed now
    by a reference engine destroyed afterwards (or, with LoRA, by the policy with its adapters off)."""
    from dpo_ds.dist import comm
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.engine import build as engine_build
    from dpo_ds.engine import step as engine_step

    want = fingerprint(cfg, model_dir, splits, start, layout, by_policy=policy is not None)
    need = needed(cfg, splits)
    path = cache_path(cfg, run_dir, want)
    candidates = [path]
    if resume_dir is not None:  # the run being resumed may hold it
        from dpo_ds.run.dir import run_dir_of

        candidates.append(run_dir_of(resume_dir).reference_cache)
    found = comm.decided_by_rank0(  # (path, tables) of the first cache that matches, or None
        lambda: next(((str(p), t) for p in candidates if (t := read_cache(p, want, need)) is not None), None),
        (ConfigError,),
    )
    if found is not None:
        log.info(f"reference log-probs from {found[0]} (fingerprint matches); no reference model is built")
        return PrecomputedReference(found[1])

    train, evaluation = splits
    passes = {
        train.split: (len(train), train.first_pass(cfg.n_epochs, cfg.n_examples)),
        evaluation.split: (len(evaluation), evaluation.eval_pass(cfg.n_eval_examples)),
    }
    if policy is not None:  # LoRA: the policy's base, its adapters off, computes them; nothing to destroy
        with engine_step.unwrap_lm(policy).disable_adapter():
            tables = compute_tables(policy, passes, device, comm.all_gather_objects)
        log.info("reference pre-pass done by the policy with its adapters off")
    else:
        before = dist_memory.memory_now_gib()
        lm = engine_build.build_base(
            model_dir, ref_config, cfg.model.reference_dtype, start, attn=layout.attn
        )
        engine = engine_build.build_reference(lm, ref_config, cfg, sp)
        built = dist_memory.memory_now_gib()
        tables = compute_tables(engine, passes, device, comm.all_gather_objects)
        engine_build.destroy(engine)
        del engine, lm
        after = dist_memory.memory_now_gib()
        log.info(
            f"reference pre-pass done; its engine is destroyed: memory {before:.2f} GiB before it, {built:.2f} GiB "
            f"with it, {after:.2f} GiB after (rank {rank}), before the policy is built"
        )
    if rank == 0:
        write_cache(path, want, with_cached(path, want, tables))
        log.info(f"reference log-probs cached in {path}")
    comm.barrier()
    return PrecomputedReference(tables)


def cache_path(cfg, run_dir, want: dict[str, str]) -> Path:
    """data.cache_dir/reference_logps-{digest}.pt, shared by every run with the same fingerprint; or
    the run dir's reference_logps.pt, which a resume must match."""
    if cfg.data.cache_dir:
        digest = hashlib.sha256(repr(sorted(want.items())).encode()).hexdigest()[:16]
        return Path(cfg.data.cache_dir) / f"{run_dir.reference_cache.stem}-{digest}.pt"
    return run_dir.reference_cache
