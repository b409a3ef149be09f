"""dpo_ds.plan's estimate of one bench/memory.py training row, from its train.py arguments alone.

Shared by bench/memory.py (each row's planned_gib beside its measured peak, gpu_check's (d) too) and
bench/plan_check.py (the table of both), and the tolerance both judge it by: plan_table and target_line
(bench/plan_check.py's tables, bench/memory.py --moe's). A helper, not a bench: it imports neither of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_ds.config import load_config
from dpo_ds.model.files import resolve_model_dir
from dpo_ds.plan.estimate import GIB, GPU_OVERHEAD_TERMS, estimate
from dpo_ds.plan.planner import describe, device_total, sampled_data

LOW, HIGH = 0.90, 1.25  # planned / measured: never under by more than 10%, never over by more than 25%


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


def plan_table(name: str, title: str, rows: list[dict]) -> tuple[bool, str]:
    """A markdown table of rows (each with peak_gib, planned_gib and planned_terms, or an error), and whether
    every row's planned / measured lies in [LOW, HIGH]."""
    libraries = rows[0].get("planned_terms", {}).get("libraries (CPU)") if rows else None
    lines = [
        f"Planner vs measured peak per rank, {title}; CPU, "
        + (
            f"planned totals include the CPU constants (libraries {libraries:.2f} GiB per process)."
            if libraries is not None
            else "whole runs: planned and measured as each run's last log line says."
        )
        if rows
        else f"{name}: no rows",
        "",
        "| row | config | ranks | measured peak GiB | planned GiB | planned / measured | largest planned terms |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    ok = True
    for r in rows:
        if "error" in r or "planned_gib" not in r:
            ok = False
            why = r.get("error") or r.get("planned_error")
            lines.append(
                f"| {r['key']} | {r['name']} | {r['ranks']} | {why} | {r.get('planned_gib', '')} | | |"
            )
            continue
        ratio = r["planned_gib"] / r["peak_gib"]
        ok &= LOW <= ratio <= HIGH
        top = sorted(((k, v) for k, v in r["planned_terms"].items() if k not in ("total", "save peak (rank 0)")),
                     key=lambda kv: -kv[1])[:3]  # fmt: skip
        lines.append(f"| {r['key']} | {r['name']} | {r['ranks']} | {r['peak_gib']:.3f} | {r['planned_gib']:.3f} | "
                     f"{ratio:.2f} | {', '.join(f'{k} {v:.2f}' for k, v in top)} |")  # fmt: skip
    return ok, "\n".join(lines)


def target_line(ok: bool, seconds: float, judged: bool = True) -> str:
    """The verdict line under the tables: every row planned within LOW..HIGH of its measured peak."""
    verdict = ("PASS" if ok else "MISS") if judged else (
        "not judged: smoke sizes, where the per-process constant is most of every row (run at full size)")  # fmt: skip
    return f"target every row within -{1 - LOW:.0%} / +{HIGH - 1:.0%} of its measured peak ({seconds:.0f} s): {verdict}"
