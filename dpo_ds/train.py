"""dpo_ds entry point: SFT, DPO, IPO, cDPO and reference-free DPO on DeepSpeed.

    deepspeed --num_gpus 8 dpo_ds/train.py --ds ds_configs/zero3.json loss=sft exp_name=sft datasets=[hh]
    deepspeed --num_gpus 8 dpo_ds/train.py --ds ds_configs/zero3.json loss=dpo loss.beta=0.1 \
        exp_name=dpo datasets=[hh] model.archive=runs/sft/LATEST/policy.pt

Reads top to bottom: parse -> init distributed -> check inputs -> build -> train -> close.
Every input is checked before any engine is built, identically on every rank, so a bad key, file,
row or archive stops all ranks with the same message instead of hanging a collective.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `dpo_ds` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_ds.adapters import AdapterError
from dpo_ds.checkpoint import ArchiveError, RunDirLocked
from dpo_ds.config import ConfigError
from dpo_ds.data.sources import DataError
from dpo_ds.data.tokenize import TokenizationError
from dpo_ds.model import ModelError

USER_ERRORS = (
    ConfigError,
    DataError,
    ArchiveError,
    ModelError,
    TokenizationError,
    RunDirLocked,
    AdapterError,
)
log = logging.getLogger("dpo_ds")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument(
        "--ds",
        default=str(Path(__file__).resolve().parent.parent / "ds_configs" / "zero3.json"),
        help="DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, zero3_offload.json)",
    )
    ap.add_argument(
        "--config", default=None, help="YAML file with dpo_ds config keys; key=value overrides win"
    )
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by launchers
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. loss=dpo loss.beta=0.1 datasets=[hh,shp]")
    return ap.parse_intermixed_args(argv)  # key=value before and after --ds / --config


def run(argv=None) -> dict:
    from dpo_ds import checkpoint as ckpt
    from dpo_ds import engines
    from dpo_ds.adapters import check_targets
    from dpo_ds.checkpoint import Checkpointer, RunDir, RunLock
    from dpo_ds.config import dump_yaml, load_config, to_dict
    from dpo_ds.data.batches import Batches, data_digest, legacy_digest
    from dpo_ds.data.cache import DATA_FORMAT_VERSION
    from dpo_ds.data.layout import choose as choose_layout
    from dpo_ds.data.prepare import prepare_data
    from dpo_ds.generation import Generation
    from dpo_ds.guards import load_checker
    from dpo_ds.model import load_tokenizer, resolve_model_dir
    from dpo_ds.objectives import build_objective
    from dpo_ds.reference import PrecomputedReference, build_reference_source, built_before_policy
    from dpo_ds.start import starting_point
    from dpo_ds.trainer import MetricsSink, Trainer
    from dpo_ds.watchdog import Preemption, Watchdog

    # 1. parse: the whole config is checked before anything starts
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # the one place the training mode is decided: the objective (its losses checked against their specs)
    # says whether it needs a reference
    objective = build_objective(cfg)

    # 2. distributed
    rank, world, device = engines.init_distributed(cfg.torch_threads, cfg.dist_timeout_s)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    on_cpu = device.type == "cpu"
    # sequence parallelism: groups of sp ranks share each row; data parallelism runs over world / sp
    sp_size = cfg.parallel.sequence_parallel_size
    dp_rank, sp_rank, dp_world = engines.sequence_parallel_place(rank, world, sp_size)
    ds_config = engines.resolve_ds_config(args.ds, cfg, dp_world, on_cpu)
    # the layout, decided once (data/layout.py): its rows, collator and the attention it needs
    layout = choose_layout(
        cfg.data.layout, max_length=cfg.max_length, row_tokens=cfg.data.row_tokens,
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, attn=cfg.model.attn_implementation,
        on_cpu=on_cpu, sequence_parallel=(sp_rank, sp_size),
    )  # fmt: skip
    ref_config = engines.reference_ds_config(ds_config, cfg) if objective.needs_reference else None
    stage = ds_config["zero_optimization"].get("stage", 0)
    log.info(
        f"world {world} on {device.type}, ZeRO stage {stage}, loss {cfg.loss.name}, run dir {cfg.run_dir}"
    )

    # One job per run directory: rank 0 takes its lock before anything is written there (and before the
    # data phase, so a second job is refused in seconds); every rank gets the answer.
    run_dir = RunDir(cfg.run_dir)
    lock = RunLock(run_dir)
    took_over = engines.decided_by_rank0(lock.acquire, (RunDirLocked,))
    if rank == 0:
        atexit.register(lock.release)  # every exit but SIGKILL; a killed job's lock is stale (RunLock)
    if took_over:
        log.warning(took_over)
    # Never write into an earlier run's directory (its checkpoints would be overwritten and its metrics
    # mixed with ours; the token cache is written there too) unless resuming it. Rank 0 decides for all:
    # with node-local disks ranks can see different things, and one rank raising alone would hang the others.
    taken = engines.decided_by_rank0(run_dir.taken)
    if taken and not cfg.resume_from:
        raise ConfigError(
            f"config key 'run_dir': {run_dir.root} already holds a run ({', '.join(taken)}); pick another "
            f"exp_name/run_dir, or continue it with resume_from=auto"
        )

    # 3. inputs: model directory, archive, data -- all checked before any engine exists
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    # the weights both models start from (start.py): no weights where there must be some is an error here
    start = starting_point(model_dir, cfg.model.init, cfg.model.archive, cfg.seed)
    log.info(f"starting weights: {start.describe()}")
    if start.step_idx is not None:
        log.info(f"archive {cfg.model.archive}: step_idx {start.step_idx} metrics {start.metrics}")
    if cfg.model.lora.r:  # a target that matches no module is an error before any engine
        wrapped = check_targets(cfg.model.lora, model_dir)
        log.info(f"LoRA r={cfg.model.lora.r} on {len(wrapped)} modules ({', '.join(wrapped[:4])}, ...)")
    engines.check_sequence_parallel(sp_size, model_dir)  # heads the group can split
    log_memory_estimate(cfg, ds_config, world, on_cpu, model_dir)  # dpo_ds.plan's total, before any engine
    tokenizer = load_tokenizer(model_dir)
    checker = load_checker(cfg.eval.checker) if cfg.eval.checker else None  # fails here, on every rank
    # the data phase (data/prepare.py): every row tokenized into the token cache (or mapped from it), by
    # the ranks together, before any engine
    sft = not objective.pairs  # each prompt's sft_target, or one example per preference pair
    tokenization, prepared = prepare_data(cfg, sft, tokenizer, model_dir, run_dir, rank=rank, world=world)
    batch_args = dict(  # every rank of a sequence-parallel group runs the same examples, its piece of them
        world=dp_world,
        rank=dp_rank,
        seed=cfg.seed,
        layout=layout,
        max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch,
        sync_max=engines.sync_max,
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

    # Resume checks itself before any engine exists: a complete checkpoint, and a config and data that
    # match it (resume.allow_changes lets named keys differ). Rank 0 decides for all.
    digest = data_digest([train_data])  # the cache's: each shard hashed as it was written

    def resume_decision():
        start = ckpt.resolve_resume(cfg.resume_from, run_dir)
        if start is None:
            return None, []
        state = ckpt.read_run_state(start)
        ours = digest
        if state.get("data") != digest and "data_format" not in state:
            # written before the token cache, whose digest is taken otherwise: compare it the old way
            # (one pass over the mapped data, on rank 0, only for such a checkpoint)
            legacy = legacy_digest([train_data])
            ours = legacy if state.get("data") == legacy else digest
        return start, ckpt.check_resume(state, to_dict(cfg), ours, world, cfg.resume.allow_changes)

    start_dir, allowed = engines.decided_by_rank0(resume_decision, (ConfigError, ckpt.ArchiveError))
    for change in allowed:
        log.warning(f"resume: {change} (allowed by resume.allow_changes)")
    if cfg.resume_from == "auto" and start_dir is None:
        log.info(f"resume_from=auto: no checkpoint in {run_dir.root}; starting from the beginning")
    if rank == 0:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        # a resumed run replays the steps after its checkpoint: their records go, so each step is logged once
        last = (
            ckpt.read_run_state(start_dir)["step"]
            if start_dir and start_dir.parent == run_dir.root.resolve()
            else -1
        )
        for path in (run_dir.metrics, run_dir.samples):
            if ckpt.truncate_records(path, last):
                log.info(
                    f"{path.name}: dropped the records after step {max(last, 0)}, which this run writes again"
                )
        dump_yaml(cfg, run_dir.config)
        run_dir.ds_config.write_text(json.dumps(ds_config, indent=2))
    # A rank that hangs is reported by the others; a preemption signal becomes a save and exit 0.
    preemption = Preemption().install()
    watchdog = Watchdog(
        rank,
        run_dir.root,
        cfg.dist_timeout_s,
        cfg.step_timeout_s,
        heartbeat=lock.heartbeat if rank == 0 else None,
        preemption=preemption,
    ).start()

    # 4. build: both models start from the same weights (start). A reference of its own comes first:
    # precomputed, it is built, run over the data and destroyed before the policy and its optimizer
    # take the memory. A LoRA policy's reference is the policy, its adapters off: it comes after.
    before_models = engines.memory_now_gib()
    sp = engines.start_sequence_parallel(sp_size, layout.attn, model_dir, stage)
    reference_args = dict(
        sp=sp,
        ref_config=ref_config,
        model_dir=model_dir,
        start=start,
        splits=[train_data, eval_data],
        run_dir=run_dir,
        rank=rank,
        world=world,
        device=device,
        resume_dir=start_dir,
        layout=layout,
    )
    reference = (
        build_reference_source(cfg, objective, **reference_args)
        if built_before_policy(cfg, objective)
        else None
    )
    policy_lm = engines.build_base(model_dir, ds_config, cfg.model.policy_dtype, start, attn=layout.attn)
    policy = engines.build_policy(policy_lm, ds_config, cfg, sp)
    start.release()
    if reference is None:
        reference = build_reference_source(cfg, objective, policy=policy, **reference_args)
    memory = engines.memory_across_ranks(
        {"memory/before_models_gib": before_models, "memory/models_built_gib": engines.memory_now_gib()}
    )

    start_step = 0
    if start_dir is not None:
        client = engines.load_engine(policy, start_dir)
        start_step = int(client["step"])
        if any(c.startswith(("lr:", "warmup_steps:")) for c in allowed):
            engines.apply_lr(policy, cfg.lr)  # the checkpoint restored the old schedule
        log.info(f"resumed from {start_dir} at step {start_step}")

    # 5. train, evaluate, save
    generation = Generation(
        tokenizer=tokenizer,
        eval_data=eval_data,
        max_new_tokens=cfg.max_new_tokens,
        gather=cfg.eval.gather_for_generation,
        samples_path=run_dir.samples,
        n_samples=cfg.n_eval_model_samples if cfg.sample_during_eval else 0,
        checker=checker,
        n_checked=cfg.eval.n_checked,
        rank=rank,
        world=world,
        device=device,
    )
    if cfg.sample_during_eval and isinstance(reference, PrecomputedReference):
        log.info("samples during eval come from the policy only: the reference is precomputed, no model")
    checkpoints = Checkpointer(
        run_dir,
        cfg.checkpoint,
        {"world": world, "config": to_dict(cfg), "data": digest, "data_format": DATA_FORMAT_VERSION},
        rank,
        watchdog,
    )
    trainer = Trainer(
        cfg,
        policy=policy,
        objective=objective,
        reference=reference,
        train_data=train_data,
        eval_data=eval_data,
        generation=generation,
        checkpoints=checkpoints,
        sink=MetricsSink(cfg, run_dir, rank),
        watchdog=watchdog,
        preemption=preemption,
        rank=rank,
        device=device,
        memory=memory,
    )
    metrics = trainer.train(start_step)

    # 6. close
    engines.barrier()
    watchdog.stop()
    engines.shutdown()
    return metrics


def log_memory_estimate(cfg, ds_config: dict, world: int, on_cpu: bool, model_dir) -> None:
    """Rank 0 logs dpo_ds.plan's estimate in one line; on a GPU, an estimate over the device's free
    memory is a warning naming the largest term and the first change that fits (a warning: the
    estimate is a bound, and the run may still fit)."""
    from dpo_ds import engines, plan
    from dpo_ds.estimate import GIB, estimate

    try:
        run = plan.describe(cfg, ds_config, world, on_cpu, model_dir)
    except (KeyError, TypeError, ValueError) as e:  # a config.json not shaped like a Llama
        log.info(f"memory estimate: not available for {model_dir} ({type(e).__name__}: {e})")
        return
    budget = None if on_cpu else engines.free_memory_bytes() / GIB
    log.info(plan.one_line(run, budget))
    total = plan.device_total(run) / GIB
    if budget is not None and total > budget:
        terms = plan.running_terms(estimate(run))
        largest = max(terms, key=terms.get)
        log.warning(
            f"the memory estimate ({total:.1f} GiB per rank) is over this GPU's free {budget:.1f} GiB; the largest "
            f"term is {largest} ({terms[largest] / GIB:.1f} GiB); first change that fits: {plan.first_fix(run, budget)} "
            f"(python -m dpo_ds.plan with the same keys shows them all)"
        )


def main(argv=None) -> int:
    from dpo_ds import engines
    from dpo_ds.guards import TrainingStopped

    try:
        run(argv)
    except USER_ERRORS as e:  # raised on every rank alike (rank 0 decides and broadcasts)
        engines.say(f"dpo_ds: error: {e}")
        engines.part_together()  # every rank's message out before any rank exits
        engines.shutdown()
        return 2
    except TrainingStopped as e:  # the guard, or too many failed saves: every rank stops alike
        engines.say(f"dpo_ds: stopped: {e}")  # no waiting for the others: a stop may mean they are gone
        engines.shutdown()
        return 3
    return 0


def exit_now(code: int) -> None:
    """End a rank whose run is over with `code`: the exit handlers run (the run dir's lock, the
    watchdog), logs and streams are flushed, and the interpreter's own teardown of torch, DeepSpeed and
    transformers' modules (2-3 s a rank, that writes nothing) is skipped."""
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
