"""The data phase of a run: sources -> examples -> token cache -> each split's Batches.

train.py runs it before any engine exists; `python -m dpo_ds.data.prepare` runs it alone, with the
same config keys and the same launchers, to build the token cache ahead of a GPU job (on CPU nodes,
into data.cache_dir) and to time it:

    deepspeed --num_gpus 8 -m dpo_ds.data.prepare --config my.yaml data.cache_dir=/shared/cache
    torchrun --nproc_per_node 16 -m dpo_ds.data.prepare datasets=[ultrafeedback:/data/uf] ...

It prints one JSON line per rank with what it measured (wall and CPU seconds, peak and private
memory, tokens), which bench/data_prep.py reads.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

log = logging.getLogger("dpo_ds")


def tokenization_of(cfg, tokenizer):
    """One owner of row -> ids for training, eval and generation: the tokenizer's BOS rule, its chat
    template (or data.chat_template), truncation."""
    from dpo_ds.data.tokenize import Tokenization

    return Tokenization(
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncation_mode=cfg.data.truncation_mode,
        add_bos=cfg.data.add_bos,
        chat_template=Path(cfg.data.chat_template).read_text() if cfg.data.chat_template else None,
    )


def prepare_data(cfg, sft: bool, tokenizer, model_dir: Path, run_dir, *, rank: int, world: int):
    """(tokenization, the cache's Prepared): every row tokenized (now, or by an earlier launch with the
    same fingerprint), before any engine, so a row the tokenizer or template cannot take stops every
    rank with its file, row and field."""
    from dpo_ds import engines
    from dpo_ds.config import ConfigError
    from dpo_ds.data import cache
    from dpo_ds.data.batches import flatten
    from dpo_ds.data.sources import load_source

    tokenization = tokenization_of(cfg, tokenizer)

    def load_examples(split: str):
        groups = [(spec, load_source(spec, split, cfg.data.cache_dir)) for spec in cfg.datasets]
        examples = flatten([g for _, gs in groups for g in gs], sft)
        if split == "train":
            load_examples.sources = [tokenization.describe(spec, gs) for spec, gs in groups]
            if not examples:
                raise ConfigError(
                    f"config key 'datasets': {cfg.datasets} hold no {'SFT targets' if sft else 'preference pairs'} "
                    f"for the train split{'' if sft else ' (rows with only `messages` are SFT data: use loss=sft)'}"
                )
        return examples

    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.root
    prepared = cache.prepare(
        cfg, tokenization, model_dir, root, sft, rank=rank, world=world, comm=engines,
        load_examples=load_examples, describe=lambda split, _: getattr(load_examples, "sources", []),
        num_proc=cfg.data.num_proc,
    )  # fmt: skip
    for line in prepared.sources + prepared.summary:  # sources may mix conversations and plain text
        log.info(line)
    return tokenization, prepared


def _memory() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def main(argv=None) -> int:
    from dpo_ds import engines
    from dpo_ds.checkpoint import RunDir
    from dpo_ds.config import load_config
    from dpo_ds.model import load_tokenizer, resolve_model_dir
    from dpo_ds.objectives import build_objective
    from dpo_ds.train import USER_ERRORS, parse_args

    args = parse_args(argv if argv is not None else sys.argv[1:])
    cfg = load_config(args.config, args.overrides)
    wall0, cpu0 = time.time(), time.process_time()
    before = _memory()
    rank, world, _ = engines.init_distributed(cfg.torch_threads, cfg.dist_timeout_s)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)  # fmt: skip
    try:
        model_dir = resolve_model_dir(cfg.model.name_or_path)
        tokenizer = load_tokenizer(model_dir)
        started = time.time(), time.process_time(), _memory()
        _, prepared = prepare_data(
            cfg,
            not build_objective(cfg).pairs,
            tokenizer,
            model_dir,
            RunDir(cfg.run_dir),
            rank=rank,
            world=world,
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
        }  # fmt: skip
        sys.stdout.write("DPO_DS_PREPARE " + json.dumps(result) + "\n")  # one write: ranks share the pipe
        sys.stdout.flush()
        engines.barrier()
    except USER_ERRORS as e:
        engines.say(f"dpo_ds: error: {e}")
        engines.part_together()
        engines.shutdown()
        return 2
    engines.shutdown()
    return 0


if __name__ == "__main__":
    from dpo_ds.train import exit_now

    exit_now(main())
