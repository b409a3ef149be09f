"""The data phase of a run: sources -> examples -> token cache -> each split's Batches.

The training entry (cli/train.py) runs it before any engine exists; `python -m dpo_ds.cli.prepare`
(cli/prepare.py) runs it alone, to build the token cache ahead of a GPU job.
"""

from __future__ import annotations

import logging
import sys
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
    from dpo_ds.config import ConfigError
    from dpo_ds.data import cache
    from dpo_ds.data.batches import flatten
    from dpo_ds.data.report import Survey
    from dpo_ds.data.sources import load_source
    from dpo_ds.dist import comm

    tokenization = tokenization_of(cfg, tokenizer)
    survey = Survey(sft)  # counts the rows for the data report, only where the cache's manifest is written

    def load_examples(split: str):
        groups = [(spec, load_source(spec, split, cfg.data.cache_dir)) for spec in cfg.datasets]
        for spec, gs in groups:
            survey.add(split, spec, gs)
        examples = [e for spec, gs in groups for e in flatten(gs, sft, spec)]
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
        cfg, tokenization, model_dir, root, sft, rank=rank, world=world, comm=comm,
        load_examples=load_examples, describe=lambda split, _: getattr(load_examples, "sources", []),
        num_proc=cfg.data.num_proc, survey=survey,
    )  # fmt: skip
    for line in prepared.sources + prepared.summary:  # sources may mix conversations and plain text
        log.info(line)
    if rank == 0:
        report_data(cfg, sft, prepared, run_dir.data_report)
    return tokenization, prepared


def report_data(cfg, sft: bool, prepared, path: Path) -> None:
    """Rank 0: the data report (data/report.py) as a table in the log and as JSON at `path` (the run
    dir's data_report.json), kept on `prepared.data_report`. A report that cannot be written is a
    warning: it describes the run, it does not stop it."""
    from dpo_ds.data import report

    prepared.data_report = report.build(
        prepared.report,
        prepared.stores,
        sft=sft,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
    )
    try:
        report.write(prepared.data_report, path)
        where = f"written to {path}"
    except OSError as e:
        where = f"not written to {path}: {e}"
        log.warning(f"data report {where}")
    log.info(f"{report.table(prepared.data_report)}\n(the data report, {where})")


# this module is the library of the prepare command, not the command: never a silent exit 0 that built nothing
PREPARE_HELP = """\
usage: dpo-ds prepare [-h] [--ds DS] [--config CONFIG] [overrides ...]
       python -m dpo_ds.cli.prepare ...   (deepspeed --module dpo_ds.cli.prepare ... under a launcher)

prepare: the data phase of a run alone. It tokenizes the data sets into the token cache (data.cache_dir,
or the run dir) and writes the data report ({run_dir}/data_report.json), ahead of a GPU job. It takes
the trainer's --ds, --config and key=value; `dpo-ds prepare --help` describes them.

This module, dpo_ds.data.prepare, is the library the prepare command runs: run the command instead."""

if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(PREPARE_HELP)
        sys.exit(0)
    sys.exit(
        "dpo_ds: error: this module is the library of the prepare command: run `dpo-ds prepare` or "
        "`python -m dpo_ds.cli.prepare` (`deepspeed --module dpo_ds.cli.prepare`), with the same arguments"
    )
