"""dpo_ds entry point: SFT, DPO, IPO, cDPO and reference-free DPO on DeepSpeed.

    dpo-ds train --gpus 8 --ds zero3 loss=sft exp_name=sft datasets=[hh]
    dpo-ds train --gpus 8 --ds zero3 loss=dpo loss.beta=0.1 exp_name=dpo datasets=[hh] \
        model.archive=runs/sft/LATEST/policy.pt

(`dpo-ds train` runs the DeepSpeed launcher; `deepspeed --num_gpus 8 --module dpo_ds.train ...`,
`torchrun --nproc_per_node 8 -m dpo_ds.train ...` and, in a clone, `deepspeed dpo_ds/train.py ...` run the
same entry.)

Reads top to bottom: parse -> init distributed -> check inputs -> build -> train -> close.
Every input is checked before any engine is built, identically on every rank, so a bad key, file,
row or archive stops all ranks with the same message instead of hanging a collective.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import sys
import warnings

from dpo_ds.config import ConfigError
from dpo_ds.config.keys import add_help_keys, keys_overview
from dpo_ds.config.shipped import DEFAULT_DS, ds_config_names, ds_config_path, recipe_path
from dpo_ds.data.sources import DataError
from dpo_ds.data.tokenize import TokenizationError
from dpo_ds.model.adapters import AdapterError
from dpo_ds.model.files import ModelError
from dpo_ds.run.dir import ArchiveError
from dpo_ds.run.lock import RunDirLocked, RunDirUnwritable

USER_ERRORS = (
    ConfigError,
    DataError,
    ArchiveError,
    ModelError,
    TokenizationError,
    RunDirLocked,
    RunDirUnwritable,
    AdapterError,
)
log = logging.getLogger("dpo_ds")


def parse_args(argv, prog: str | None = None, description: str | None = None):
    ap = argparse.ArgumentParser(
        prog=prog or "python -m dpo_ds.train",
        description=description or __doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=keys_overview(),
        allow_abbrev=False,
    )
    add_help_keys(ap)
    ap.add_argument(
        "--ds",
        default=DEFAULT_DS,
        help=f"DeepSpeed JSON: a shipped one by name ({', '.join(ds_config_names())}) or a file (default {DEFAULT_DS})",
    )
    ap.add_argument(
        "--config",
        default=None,
        help="YAML of dpo_ds config keys: a file, or a shipped recipe by name (`dpo-ds recipes`); key=value wins",
    )
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by launchers
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. loss=dpo loss.beta=0.1 datasets=[hh,shp]")
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_trl_flags(argv, ap)
    return ap.parse_intermixed_args(argv)  # key=value before and after --ds / --config


def _refuse_trl_flags(argv: list[str], ap: argparse.ArgumentParser) -> None:
    """A flag TRL or transformers' Trainer takes (`--deepspeed ds.json`, `--output_dir runs/x`) gets what dpo_ds
    calls it, as a config error, before argparse's bare 'unrecognized arguments'."""
    from dpo_ds.config.trl_names import flag_hint

    known = {opt for action in ap._actions for opt in action.option_strings}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg.split("=", 1)[0] in known:
            continue
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
        hint = flag_hint(arg, value)
        if hint is not None:
            raise ConfigError(hint)


def run(argv=None) -> dict:
    from dpo_ds.cli import steps
    from dpo_ds.config import read_config
    from dpo_ds.dist import comm
    from dpo_ds.training.objectives import build_objective

    # 1. parse: the whole config is checked before anything starts
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    ds_path = ds_config_path(args.ds)
    cfg, set_keys = read_config(recipe_path(args.config) if args.config else None, args.overrides)
    # the one place the training mode is decided: the objective (its losses checked against their specs)
    # says whether it needs a reference
    objective = build_objective(cfg)

    # 2. distributed: the ranks, the DeepSpeed JSONs, the layout; then the run dir, locked
    place = steps.start_distributed(cfg, str(ds_path), objective, set_keys)
    run_dir, lock, created = steps.claim_run_dir(cfg, place.rank)
    try:
        # 3. inputs: model directory, archive, data, resume -- all checked before any engine exists
        inputs = steps.check_inputs(cfg, place, objective, run_dir)
        resume = steps.decide_resume(cfg, place, inputs, run_dir)
        preemption, watchdog = steps.watch(cfg, place.rank, run_dir, lock)

        # 4. build: both models start from the same weights; the policy resumed from its checkpoint
        policy, reference, memory = steps.build_models(cfg, place, objective, inputs, run_dir, resume)
        start_step = steps.resume_policy(cfg, policy, resume, reference)
    except USER_ERRORS:  # a start that failed leaves no empty run dir behind (only one this launch made)
        steps.drop_unused_run_dir(run_dir, lock, created, place.rank)
        raise

    # 5. train, evaluate, save
    trainer = steps.trainer(cfg, place, objective, inputs, run_dir, resume, policy, reference, memory,
                            preemption, watchdog)  # fmt: skip
    metrics = trainer.train(start_step)
    steps.log_planned_vs_measured(inputs.planned_gib, place.rank)  # every run checks the planner

    # 6. close
    comm.barrier()
    watchdog.stop()
    comm.shutdown()
    return metrics


def main(argv=None) -> int:
    from dpo_ds.dist import comm
    from dpo_ds.training.guards import TrainingStopped

    try:
        run(argv)
    except USER_ERRORS as e:  # raised on every rank alike (rank 0 decides and broadcasts)
        comm.say(f"dpo_ds: error: {e}")
        comm.part_together()  # every rank's message out before any rank exits
        comm.shutdown()
        return 2
    except TrainingStopped as e:  # the guard, or too many failed saves: every rank stops alike
        comm.say(f"dpo_ds: stopped: {e}")  # no waiting for the others: a stop may mean they are gone
        comm.shutdown()
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
