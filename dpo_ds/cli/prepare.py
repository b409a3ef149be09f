"""The data phase alone (data/prepare.py), with train.py's config keys and the same launchers, to build
the token cache ahead of a GPU job (on CPU nodes, into data.cache_dir) and to time it:

    dpo-ds prepare --config demo_dpo run_dir=runs/demo-data      # the shipped demo, one process
    deepspeed --num_gpus 8 --module dpo_ds.cli.prepare --config my.yaml data.cache_dir=/shared/cache
    torchrun --nproc_per_node 16 -m dpo_ds.cli.prepare datasets=[ultrafeedback:/data/uf] ...

Rank 0 prints the data report (data/report.py: rows, pairs, shared prompts, train/test overlap,
identical pairs, truncations, token-length percentiles, the chosen-longer fraction; per source and in
total) and writes it as JSON to {run_dir}/data_report.json: the run dir the same config trains into
(runs/{exp_name} unless run_dir= says otherwise), where a training launch writes the same report.
Rank 0's JSON line names it as "report".

It prints one JSON line per rank with what it measured (wall and CPU seconds, peak and private
memory, tokens), which bench/data_prep.py reads.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time

from dpo_ds.data.prepare import prepare_data


def _memory() -> dict:
    from dpo_ds.dist.memory import proc_status

    return proc_status("VmHWM", "VmRSS", "RssAnon", "RssFile")


def main(argv=None, prog: str | None = None) -> int:
    from dpo_ds.cli.train import USER_ERRORS, parse_args
    from dpo_ds.config import load_config
    from dpo_ds.config.shipped import recipe_path
    from dpo_ds.dist import comm
    from dpo_ds.model.files import load_tokenizer, resolve_model_dir
    from dpo_ds.run.dir import RunDir
    from dpo_ds.training.objectives import build_objective

    argv = list(argv if argv is not None else sys.argv[1:])
    try:  # a bad flag, recipe or key: one line naming it, before any process group exists
        args = parse_args(argv, prog=prog or "python -m dpo_ds.cli.prepare", description=__doc__)
        cfg = load_config(recipe_path(args.config) if args.config else None, args.overrides)
    except USER_ERRORS as e:
        print(f"dpo_ds: error: {e}", file=sys.stderr)
        return 2
    wall0, cpu0 = time.time(), time.process_time()
    before = _memory()
    rank, world, _ = comm.init_distributed(cfg.torch_threads, cfg.dist_timeout_s)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)  # fmt: skip
    try:
        model_dir = resolve_model_dir(cfg.model.name_or_path)
        tokenizer = load_tokenizer(model_dir)
        started = time.time(), time.process_time(), _memory()
        run_dir = RunDir(cfg.run_dir)
        _, prepared = prepare_data(
            cfg, not build_objective(cfg).pairs, tokenizer, model_dir, run_dir, rank=rank, world=world
        )
        after = _memory()
        stores = prepared.stores
        tokens = sum(s.tokens for s in stores.values())
        result = {
            "rank": rank,
            "world": world,
            "built": prepared.built,
            "wall_s": time.time() - wall0,
            "data_wall_s": time.time() - started[0],
            "cpu_s": time.process_time() - cpu0,
            "data_cpu_s": time.process_time() - started[1],
            "children_cpu_s": sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) for k in ("ru_utime", "ru_stime")),
            "peak_rss": after.get("VmHWM", 0),
            "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,  # the build's worker
            "anon_held": after.get("RssAnon", 0) - started[2].get("RssAnon", 0),
            "file_held": after.get("RssFile", 0) - started[2].get("RssFile", 0),
            "rss_before": before.get("VmRSS", 0),
            "tokens": tokens,
            "examples": {k: len(v) for k, v in stores.items()},
            "cache": str(prepared.path),
            "report": str(run_dir.data_report) if prepared.data_report is not None else None,
        }  # fmt: skip
        sys.stdout.write("DPO_DS_PREPARE " + json.dumps(result) + "\n")  # one write: ranks share the pipe
        sys.stdout.flush()
        comm.barrier()
    except USER_ERRORS as e:
        comm.say(f"dpo_ds: error: {e}")
        comm.part_together()
        comm.shutdown()
        return 2
    comm.shutdown()
    return 0


if __name__ == "__main__":
    from dpo_ds.cli.train import exit_now

    exit_now(main())
