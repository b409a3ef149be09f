"""dpo_ds.plan's estimate of one bench/memory.py training row, from its train.py arguments alone.

Shared by bench/memory.py (each row's planned_gib beside its measured peak, gpu_check's (d) too) and
bench/plan_check.py (the table of both). A helper, not a bench: it imports neither of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_ds.config import load_config
from dpo_ds.model.files import resolve_model_dir
from dpo_ds.plan.estimate import GIB, GPU_OVERHEAD_TERMS, estimate
from dpo_ds.plan.planner import describe, device_total, sampled_data


def longest_sequence(data: Path, max_length: int) -> int:
    """The data's longest prompt + response in tokens (the char tokenizer: a token a character, plus BOS and
    EOS), at most max_length: what the planner is told with --sequence-tokens, as a user knowing their data
    would; without it the planner plans every sequence at max_length (a bound)."""
    longest = 0
    for line in (data / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        longest = max(longest, len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"])) + 2)
    return min(longest, max_length)


def planned(
    overrides: list[str], ranks: int, on_cpu: bool = True, data_sample: int = 0
) -> tuple[float, dict]:
    """(planned GiB per rank, {term: GiB}) for a row's `--ds PATH key=value ...` train.py arguments. With
    data_sample the planner reads that many examples of the row's data itself (`dpo-ds plan --data-sample`);
    else it is told the longest sequence (`--sequence-tokens`), counted here in characters."""
    ds_path = overrides[overrides.index("--ds") + 1]
    keys = [o for i, o in enumerate(overrides) if o != "--ds" and (i == 0 or overrides[i - 1] != "--ds")]
    cfg = load_config(None, keys)
    model_dir = resolve_model_dir(cfg.model.name_or_path)
    ds = json.loads(Path(ds_path).read_text())
    if data_sample:
        data = sampled_data(cfg, model_dir, ranks, on_cpu, data_sample)
        run = describe(cfg, ds, ranks, on_cpu, model_dir, data=data)
    else:
        run = describe(
            cfg, ds, ranks, on_cpu, model_dir, longest_sequence(Path(cfg.datasets[0]), cfg.max_length)
        )
    terms = estimate(run)
    # the steps alone (no save measured); on a GPU what torch allocates, as max_memory_allocated counts it: the
    # CUDA context and the allocator's reserve are outside it
    total = device_total(run) - sum(terms.get(k, 0.0) for k in GPU_OVERHEAD_TERMS)
    return total / GIB, {k: v / GIB for k, v in terms.items()}
