"""The steps of a training run, in the order cli/train.py's run() calls them. Every input is checked
before any engine is built, identically on every rank, so a bad key, file, row or archive stops all
ranks with the same message instead of hanging a collective. Every rank runs every step, in order."""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ds.config import ConfigError
from dpo_ds.dist import comm
from dpo_ds.model.logprobs import triton_unavailable_reason

log = logging.getLogger("dpo_ds")


@dataclass
class Place:
    """Where this rank is, and what the run's DeepSpeed JSONs and layout are."""

    rank: int
    world: int
    device: torch.device
    on_cpu: bool
    dp_rank: int  # sequence parallelism: groups of sp ranks share each row; data parallelism over world / sp
    sp_rank: int
    dp_world: int
    sp_size: int
    ds_config: dict
    ref_config: dict | None
    stage: int
    layout: object  # data.layout.Layout


@dataclass
class Inputs:
    """What the run was checked to start from: the model directory, its starting weights, the data."""

    model_dir: Path
    start: object  # run.start.Start
    tokenizer: object
    checker: object
    train_data: object  # data.batches.Batches
    eval_data: object
    digest: str
    planned_gib: float | None = (
        None  # dpo_ds.plan's peak per rank for this run (the end of run says the measured)
    )
    router_aux_coef: float | None = (
        None  # an MoE's router loss coefficient (model/router.py); None: no router
    )


@dataclass
class Resume:
    start_dir: Path | None
    allowed: list[str]


def start_distributed(cfg, ds_path: str, objective, set_keys=None) -> Place:
    """set_keys: the config keys the user set (config.read_config), for the TRL-defaults note; None: the
    keys still at their defaults count as not set."""
    from dpo_ds.data.layout import for_config as layout_for
    from dpo_ds.engine import ds_config as engine_config
    from dpo_ds.engine import sequence_parallel as engine_sp

    rank, world, device = comm.init_distributed(cfg.torch_threads, cfg.dist_timeout_s)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    on_cpu = device.type == "cpu"
    if cfg.model.logprob_impl == "triton" and (why := triton_unavailable_reason(on_cpu)) is not None:
        # here, on every rank before any model is built, not at the first forward
        raise ConfigError(f"config key 'model.logprob_impl': triton cannot run here: {why}; or use chunked")
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        # here, on every rank before anything is built: rank 0 alone imports wandb, after the models
        raise ConfigError(
            "config key 'wandb.enabled': true needs the wandb package: pip install 'dpo_ds[wandb]'"
        )
    sp_size = cfg.parallel.sequence_parallel_size
    dp_rank, sp_rank, dp_world = engine_sp.sequence_parallel_place(rank, world, sp_size)
    ds_config = engine_config.resolve_ds_config(ds_path, cfg, dp_world, on_cpu)
    # the layout, decided once (data/layout.py): its rows, collator and the attention it needs
    layout = layout_for(cfg, on_cpu, sequence_parallel=(sp_rank, sp_size))
    ref_config = engine_config.reference_ds_config(ds_config, cfg) if objective.needs_reference else None
    if cfg.model.reference_sync_steps and ref_config is None:  # TR-DPO moves a reference: one must exist
        raise ConfigError(
            f"config key 'model.reference_sync_steps': moves the reference model, and loss={cfg.loss.name} uses "
            "none; set it to 0"
        )
    stage = ds_config["zero_optimization"].get("stage", 0)
    log.info(
        f"world {world} on {device.type}, ZeRO stage {stage}, loss {cfg.loss.name}, run dir {cfg.run_dir}"
    )
    if rank == 0:
        log_trl_defaults(cfg, set_keys, ds_path, ds_config)
    return Place(rank, world, device, on_cpu, dp_rank, sp_rank, dp_world, sp_size, ds_config, ref_config,
                 stage, layout)  # fmt: skip


def log_trl_defaults(cfg, set_keys, ds_path: str, ds_config: dict) -> None:
    """Once at launch: the defaults this run uses that differ from TRL's (config/trl_defaults.py); the
    optimizer betas count only when they come from a shipped DeepSpeed JSON, not the user's own file."""
    from dpo_ds.config.shipped import DS_CONFIGS
    from dpo_ds.config.trl_defaults import trl_default_notes

    shipped = Path(ds_path).resolve().parent == DS_CONFIGS.resolve()
    betas = ds_config.get("optimizer", {}).get("params", {}).get("betas") if shipped else None
    notes = trl_default_notes(cfg, set_keys, betas)
    if notes:
        log.info("defaults that differ from TRL's (docs/coming-from-trl.md): " + "; ".join(notes))


def claim_run_dir(cfg, rank: int):
    """One job per run directory: rank 0 takes its lock before anything is written there (and before the
    data phase, so a second job is refused in seconds); every rank gets the answer. (RunDir, RunLock,
    whether this launch made the directory: only then may a failed start remove it, drop_unused_run_dir)"""
    from dpo_ds.run.dir import RunDir
    from dpo_ds.run.lock import RunDirLocked, RunDirUnwritable, RunLock

    run_dir = RunDir(cfg.run_dir)
    lock = RunLock(run_dir)

    def take():  # looked at before the lock's mkdir makes the directory
        created = not (run_dir.root.exists() or run_dir.root.is_symlink())
        return created, lock.acquire()

    created, took_over = comm.decided_by_rank0(take, (RunDirLocked, RunDirUnwritable))
    if rank == 0:
        atexit.register(lock.release)  # every exit but SIGKILL; a killed job's lock is stale (RunLock)
    if took_over:
        log.warning(took_over)
    # Never write into an earlier run's directory (its checkpoints would be overwritten and its metrics
    # mixed with ours; the token cache is written there too) unless resuming it. Rank 0 decides for all:
    # with node-local disks ranks can see different things, and one rank raising alone would hang the others.
    taken = comm.decided_by_rank0(run_dir.taken)
    if taken and not cfg.resume_from:
        raise ConfigError(
            f"config key 'run_dir': {run_dir.root} already holds a run ({', '.join(taken)}); pick another "
            f"exp_name/run_dir, or continue it with resume_from=auto"
        )
    return run_dir, lock, created


def drop_unused_run_dir(run_dir, lock, created: bool, rank: int) -> bool:
    """A start that failed on a user error (raised on every rank alike) leaves behind no run dir this
    launch made: once every rank is here, rank 0 releases the lock and removes the directory, unless it
    holds a result (RunDir.results). A directory that was there before (a resume, one the user made) stays.
    Every rank calls it; returns whether the directory went."""
    if not created or not _ranks_meet():  # a rank that never comes: someone may still write there
        return False
    return rank == 0 and remove_unused_run_dir(run_dir, lock)


def remove_unused_run_dir(run_dir, lock) -> bool:
    """Rank 0: the lock released and run_dir removed, unless it holds a result; whether it went."""
    import shutil

    kept = run_dir.results()
    if kept:
        log.info(f"{run_dir.root} is kept: it holds {', '.join(kept)}")
        return False
    lock.release()
    shutil.rmtree(run_dir.root, ignore_errors=True)
    log.info(f"removed {run_dir.root}, which this launch made: nothing was trained into it")
    return True


def _ranks_meet(timeout_s: float = 30.0) -> bool:
    """Whether every rank reached this point within timeout_s (a barrier in a thread: never a hang)."""
    import threading

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return True
    met = threading.Event()

    def wait():
        torch.distributed.barrier()
        met.set()

    threading.Thread(target=wait, daemon=True).start()
    return met.wait(timeout_s)


def check_inputs(cfg, place: Place, objective, run_dir) -> Inputs:
    """Model directory, archive, data: all checked before any engine exists."""
    from dpo_ds.data.batches import data_digest
    from dpo_ds.data.prepare import prepare_data
    from dpo_ds.engine import sequence_parallel as engine_sp
    from dpo_ds.model.adapters import check_targets
    from dpo_ds.model.files import check_not_quantized, load_tokenizer, resolve_model_dir
    from dpo_ds.run.start import starting_point
    from dpo_ds.training.guards import load_checker

    model_dir = resolve_model_dir(cfg.model.name_or_path)
    check_not_quantized(model_dir)  # gpt-oss's mxfp4 and other quantized checkpoints: refused by name
    # the weights both models start from (start.py): no weights where there must be some is an error here
    start = starting_point(model_dir, cfg.model.init, cfg.model.archive, cfg.seed)
    log.info(f"starting weights: {start.describe()}")
    if start.step_idx is not None:
        log.info(f"archive {cfg.model.archive}: step_idx {start.step_idx} metrics {start.metrics}")
    if cfg.model.lora.r:  # a target that matches no module is an error before any engine
        wrapped = check_targets(cfg.model.lora, model_dir)
        log.info(f"LoRA r={cfg.model.lora.r} on {len(wrapped)} modules ({', '.join(wrapped[:4])}, ...)")
    engine_sp.check_sequence_parallel(place.sp_size, model_dir)  # heads the group can split
    router_aux_coef = moe_settings(cfg, model_dir, place.rank)  # loss.router_aux_coef, model.freeze_router
    tokenizer = load_tokenizer(model_dir)
    checker = load_checker(cfg.eval.checker) if cfg.eval.checker else None  # fails here, on every rank
    # the data phase (data/prepare.py): every row tokenized into the token cache (or mapped from it), by
    # the ranks together, before any engine
    sft = not objective.pairs  # each prompt's sft_target, or one example per preference pair
    tokenization, prepared = prepare_data(
        cfg, sft, tokenizer, model_dir, run_dir, rank=place.rank, world=place.world
    )
    train_data, eval_data = _batches(cfg, place, tokenization, prepared)
    digest = data_digest([train_data])  # the cache's: each shard hashed as it was written
    # the planner's peak per rank, at the micro-batches this data makes (its token cache, sampled)
    planned_gib = log_memory_estimate(cfg, place, model_dir, train_data)
    return Inputs(
        model_dir, start, tokenizer, checker, train_data, eval_data, digest, planned_gib, router_aux_coef
    )


def moe_settings(cfg, model_dir, rank: int) -> float | None:
    """The MoE keys against the model's config (model.freeze_router, loss.router_aux_coef), before any
    engine; returns the router loss coefficient (None: no router dpo_ds reproduces), said once."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.files import load_config
    from dpo_ds.model.router import check_router_keys, router_aux_coef

    config = load_config(model_dir)
    if cfg.model.freeze_router:
        with torch.device("meta"):
            check_router_keys(cfg, config, AutoModelForCausalLM.from_config(config))
    coef = router_aux_coef(config, cfg.loss.router_aux_coef)
    if coef is not None and cfg.parallel.tiled_mlp_tokens:
        raise ConfigError(
            f"config key 'parallel.tiled_mlp_tokens': {config.model_type} is a Mixture-of-Experts model whose router "
            "loss dpo_ds computes per layer from the router logits; tiled MLPs route each tile apart (one set of "
            f"logits a tile), got {cfg.parallel.tiled_mlp_tokens}"
        )
    if coef is not None and rank == 0:
        own = "the model config's own" if cfg.loss.router_aux_coef is None else "loss.router_aux_coef"
        log.info(
            f"router load-balancing loss: coefficient {coef:g} ({own}); logged as aux_loss/train and aux_loss/eval"
            + ("" if coef else ", not added to the objective")
        )
    return coef


def _batches(cfg, place: Place, tokenization, prepared):
    from dpo_ds.data.batches import Batches

    batch_args = dict(  # every rank of a sequence-parallel group runs the same examples, its piece of them
        world=place.dp_world,
        rank=place.dp_rank,
        seed=cfg.seed,
        layout=place.layout,
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
        sync_max=comm.sync_max,
    )
    train_data = Batches(
        prepared.stores["train"],
        tokenization,
        global_batch=cfg.batch_size,
        micro_batches_per_step=cfg.gradient_accumulation_steps,
        **batch_args,
    )
    eval_data = Batches(
        prepared.stores["test"],
        tokenization,
        global_batch=cfg.eval_batch_size,
        micro_batches_per_step=1,
        split="test",
        **batch_args,
    )
    n_steps = train_data.n_steps(cfg.n_epochs, cfg.n_examples)
    if n_steps == 0:
        raise ConfigError(
            f"config key 'batch_size': {cfg.batch_size} is more than the {len(train_data)} "
            f"training examples of datasets={cfg.datasets}; no optimizer step would run"
        )
    if cfg.n_eval_examples and min(cfg.n_eval_examples, len(eval_data)) < cfg.eval_batch_size:
        raise ConfigError(
            f"config key 'eval_batch_size': {cfg.eval_batch_size} is more than the "
            f"{min(cfg.n_eval_examples, len(eval_data))} eval examples available (n_eval_examples)"
        )
    log.info(f"{len(train_data)} train / {len(eval_data)} eval examples, {n_steps} steps of {cfg.batch_size}")
    return train_data, eval_data


def decide_resume(cfg, place: Place, inputs: Inputs, run_dir) -> Resume:
    """Resume checks itself before any engine exists: a complete checkpoint, and a config and data that
    match it (resume.allow_changes lets named keys differ). Rank 0 decides for all; then rank 0 writes the
    run's config files and drops the records a resumed run writes again."""
    from dpo_ds.config import dump_yaml, to_dict
    from dpo_ds.data.batches import legacy_digest
    from dpo_ds.run import dir as run_dirs
    from dpo_ds.run import resume as run_resume

    digest = inputs.digest

    def resume_decision():
        start = run_resume.resolve_resume(cfg.resume_from, run_dir, cfg.checkpoint.verify_checksums)
        if start is None:
            return None, []
        state = run_dirs.read_run_state(start)
        ours = digest
        if state.get("data") != digest and "data_format" not in state:
            # written before the token cache, whose digest is taken otherwise: compare it the old way
            # (one pass over the mapped data, on rank 0, only for such a checkpoint)
            legacy = legacy_digest([inputs.train_data])
            ours = legacy if state.get("data") == legacy else digest
        return start, run_resume.check_resume(
            state, to_dict(cfg), ours, place.world, cfg.resume.allow_changes
        )

    start_dir, allowed = comm.decided_by_rank0(resume_decision, (ConfigError, run_dirs.ArchiveError))
    for change in allowed:
        log.warning(f"resume: {change} (allowed by resume.allow_changes)")
    if cfg.resume_from == "auto" and start_dir is None:
        log.info(f"resume_from=auto: no checkpoint in {run_dir.root}; starting from the beginning")
    if place.rank == 0 and cfg.resume_from == "auto" and start_dir is not None:
        moved = run_dirs.set_aside_newer(run_dir, start_dir)  # the step dirs auto skipped
        if moved:
            log.warning(
                f"resume_from=auto: set aside {', '.join(p.name for p in moved)} (each failed its check) and "
                f"pointed LATEST at {start_dir.name}; the next complete checkpoint removes them"
            )
    if place.rank == 0:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        # a resumed run replays the steps after its checkpoint: their records go, so each step is logged once
        last = (
            run_dirs.read_run_state(start_dir)["step"]
            if start_dir and start_dir.parent == run_dir.root.resolve()
            else -1
        )
        for path in (run_dir.metrics, run_dir.samples):
            if run_dirs.truncate_records(path, last):
                log.info(
                    f"{path.name}: dropped the records after step {max(last, 0)}, which this run writes again"
                )
        dump_yaml(cfg, run_dir.config)
        run_dir.ds_config.write_text(json.dumps(place.ds_config, indent=2))
    return Resume(start_dir, allowed)


def watch(cfg, rank: int, run_dir, lock):
    """A rank that hangs is reported by the others; a preemption signal becomes a save and exit 0."""
    from dpo_ds.dist.watchdog import Preemption, Watchdog

    preemption = Preemption().install()
    watchdog = Watchdog(
        rank,
        run_dir.root,
        cfg.dist_timeout_s,
        cfg.step_timeout_s,
        heartbeat=lock.heartbeat if rank == 0 else None,
        preemption=preemption,
    ).start()
    return preemption, watchdog


def build_models(cfg, place: Place, objective, inputs: Inputs, run_dir, resume: Resume):
    """Both models start from the same weights (inputs.start). A reference of its own comes first: it is
    built (and, precomputed, run over the data and destroyed) before the policy and its optimizer take
    the memory; a reference that is the policy itself (LoRA's adapters off) comes after, the reference
    mode decides. Returns (policy engine, reference source, memory figures)."""
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.engine import build as engine_build
    from dpo_ds.engine import sequence_parallel as engine_sp
    from dpo_ds.training.reference import build_reference_source, built_before_policy

    before_models = dist_memory.memory_now_gib()
    sp = engine_sp.start_sequence_parallel(place.sp_size, place.layout.attn, inputs.model_dir, place.stage)
    reference_args = dict(
        sp=sp,
        ref_config=place.ref_config,
        model_dir=inputs.model_dir,
        start=inputs.start,
        splits=[inputs.train_data, inputs.eval_data],
        run_dir=run_dir,
        rank=place.rank,
        world=place.world,
        device=place.device,
        resume_dir=resume.start_dir,
        layout=place.layout,
    )
    reference = (
        build_reference_source(cfg, objective, **reference_args)
        if built_before_policy(cfg, objective)
        else None
    )
    policy_lm = engine_build.build_base(
        inputs.model_dir, place.ds_config, cfg.model.policy_dtype, inputs.start, attn=place.layout.attn
    )
    total = inputs.train_data.n_steps(cfg.n_epochs, cfg.n_examples)  # where a decaying lr_schedule reaches 0
    policy = engine_build.build_policy(policy_lm, place.ds_config, cfg, sp, total_steps=total)
    inputs.start.release()
    if reference is None:
        reference = build_reference_source(cfg, objective, policy=policy, **reference_args)
    memory = dist_memory.memory_across_ranks(
        {"memory/before_models_gib": before_models, "memory/models_built_gib": dist_memory.memory_now_gib()}
    )
    return policy, reference, memory


def resume_policy(cfg, policy, resume: Resume, reference=None) -> int:
    """The step to start from: 0, or the checkpoint's, its DeepSpeed state loaded into the policy (and, under
    TR-DPO, the moved reference's state into the reference)."""
    from dpo_ds.dist.comm import by_rank, fail_alike
    from dpo_ds.engine import step as engine_step
    from dpo_ds.run import resume as run_resume
    from dpo_ds.run.dir import ArchiveError

    if resume.start_dir is None:
        return 0
    client = run_resume.load_engine(policy, resume.start_dir)
    if cfg.model.reference_sync_steps:
        error = None
        try:
            reference.load_state(resume.start_dir)
        except (OSError, ValueError, RuntimeError) as e:  # ModelError is a ValueError
            error = f"{type(e).__name__}: {e}"
        fail_alike(error, lambda failed: ArchiveError(f"resume_from: {resume.start_dir}: {by_rank(failed)}"))
    start_step = int(client["step"])
    if any(c.startswith(("lr:", "warmup_steps:")) for c in resume.allowed):
        engine_step.apply_lr(policy, cfg.lr)  # the checkpoint restored the old schedule
    log.info(f"resumed from {resume.start_dir} at step {start_step}")
    return start_step


def trainer(cfg, place, objective, inputs, run_dir, resume, policy, reference, memory, preemption, watchdog):
    """The loop and the objects it asks: generation at eval, the save protocol, the metrics sink."""
    from dpo_ds.config import to_dict
    from dpo_ds.data.cache import DATA_FORMAT_VERSION
    from dpo_ds.run.save import Checkpointer
    from dpo_ds.training.generation import Generation
    from dpo_ds.training.objectives import with_router_loss
    from dpo_ds.training.reference import PrecomputedReference
    from dpo_ds.training.trainer import MetricsSink, Trainer

    generation = Generation(
        tokenizer=inputs.tokenizer,
        eval_data=inputs.eval_data,
        max_new_tokens=cfg.max_new_tokens,
        gather=cfg.eval.gather_for_generation,
        samples_path=run_dir.samples,
        n_samples=cfg.n_eval_model_samples if cfg.sample_during_eval else 0,
        checker=inputs.checker,
        n_checked=cfg.eval.n_checked,
        rank=place.rank,
        world=place.world,
        device=place.device,
    )
    if cfg.sample_during_eval and isinstance(reference, PrecomputedReference):
        log.info("samples during eval come from the policy only: the reference is precomputed, no model")
    state = {
        "world": place.world,
        "config": to_dict(cfg),
        "data": inputs.digest,
        "data_format": DATA_FORMAT_VERSION,
    }
    # TR-DPO's moved reference is part of what a resume needs
    extra = reference.save_state if cfg.model.reference_sync_steps else None
    checkpoints = Checkpointer(run_dir, cfg.checkpoint, state, place.rank, watchdog, extra_state=extra)
    return Trainer(
        cfg,
        policy=policy,
        objective=with_router_loss(objective, inputs.router_aux_coef),
        reference=reference,
        train_data=inputs.train_data,
        eval_data=inputs.eval_data,
        generation=generation,
        checkpoints=checkpoints,
        sink=MetricsSink(cfg, run_dir, place.rank),
        watchdog=watchdog,
        preemption=preemption,
        rank=place.rank,
        device=place.device,
        memory=memory,
    )


DATA_SAMPLE = 1024  # examples of the token cache the launch's memory estimate collates


def log_memory_estimate(cfg, place: Place, model_dir, train_data) -> float | None:
    """Rank 0 logs dpo_ds.plan's estimate in one line, planned at the largest micro-batch the layout makes
    of the first DATA_SAMPLE examples of the token cache; on a GPU, an estimate over the device's free
    memory is a warning naming the largest term and the first change that fits (a warning: the
    estimate is a bound, and the run may still fit). Returns the planned peak per rank, GiB (or None)."""
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.plan import planner as plan
    from dpo_ds.plan.data import micro_batch_tokens
    from dpo_ds.plan.estimate import GIB, estimate

    ds_config, world, on_cpu = place.ds_config, place.world, place.on_cpu
    examples = [train_data.tokenized(i) for i in range(min(DATA_SAMPLE, len(train_data)))]
    data = micro_batch_tokens(examples, place.layout, plan.micro_pairs(cfg, world), train_data.pad_id)
    try:
        # on CPU what this rank holds before any model (libraries, the data) is measured, not assumed
        now = plan.process_now_gib() if on_cpu else None
        run = plan.describe(cfg, ds_config, world, on_cpu, model_dir, data=data, process_gib=now)
    except (KeyError, TypeError, ValueError) as e:  # a config.json not shaped like a Llama
        log.info(f"memory estimate: not available for {model_dir} ({type(e).__name__}: {e})")
        return None
    budget = None if on_cpu else dist_memory.free_memory_bytes() / GIB
    log.info(plan.one_line(run, budget))
    total = plan.worst_total(run) / GIB  # the peak the verdict and first_fix compare: training or saving
    if budget is not None and total > budget:
        terms = plan.running_terms(estimate(run))
        largest = max(terms, key=terms.get)
        log.warning(
            f"the memory estimate ({total:.1f} GiB per rank at its peak) is over this GPU's free {budget:.1f} GiB; the largest "
            f"term is {largest} ({terms[largest] / GIB:.1f} GiB); first change that fits: {plan.first_fix(run, budget)} "
            f"(dpo-ds plan with the same keys shows them all)"
        )
    return total


def log_planned_vs_measured(planned_gib: float | None, rank: int) -> None:
    """At the end of a run: dpo_ds.plan's peak per rank beside the measured one (every rank's, the largest
    named), so every run checks the planner. Every rank calls it (one all-reduce)."""
    from dpo_ds.dist import memory as dist_memory

    measured = dist_memory.memory_across_ranks({"peak": dist_memory.peak_memory_gib()})
    if planned_gib is None or rank != 0:
        return
    peak, worst = measured["peak_max"], measured["peak_max_rank"]
    log.info(
        f"memory per rank: planned {planned_gib:.2f} GiB, measured peak {peak:.2f} GiB (rank {worst}; rank 0 "
        f"{measured['peak']:.2f}) since training started: planned / measured {planned_gib / max(peak, 1e-9):.2f}"
    )
