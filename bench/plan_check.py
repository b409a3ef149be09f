"""The planner's estimate beside the measured peak, for every training row of bench/memory.py.

    python bench/plan_check.py              # CPU, 2 ranks, the 58M Llama: ~12 min on 2 cores
    python bench/plan_check.py --rows 1,13,14
    python bench/plan_check.py --quick      # memory.py --smoke's sizes (8.6M Llama), rows 1,5,10: ~1 min, the code

Each row is bench/memory.py's own run (memory.row_overrides: the same train.py arguments, the same data,
the same model), measured as memory.py measures it (rank 0's memory/peak_gib: the resident set's high-water
mark over the training steps); beside it dpo_ds.plan's total for the same arguments, read from the
model's config.json alone. On CPU the total includes the planner's per-process constants (libraries and
interpreter, DeepSpeed's fixed buffers: dpo_ds/plan/estimate.py), which it says it adds. Target: every row
within 20% of its measured peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import memory  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row keys of bench/memory.py (default: all)")
    ap.add_argument("--run-timeout", type=float, default=600)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="bench/memory.py --smoke's sizes, rows 1,5,10 unless --rows: the code, not the figures; "
        "exit 1 if a row failed",
    )
    args = ap.parse_args()
    args.gpu_short = args.cuda = False
    memory.set_sizes(args, "cpu_smoke" if args.quick else "full")  # memory.py's own sizes
    if args.quick and not args.rows:
        args.rows = "1,5,10"  # ZeRO-3 with a reference engine, ZeRO-2, one rank
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_plan_check_"))
    n_params = memory.make_model(work / "model", memory.SHAPES[args.shape])
    memory.make_data(work / "data_short", args.batch * args.steps, args.max_length, fill=False)
    memory.make_data(work / "data_long", args.long_batch * args.long_steps, args.long_length, fill=True)
    specs = memory.training_specs(args)
    if args.rows:
        keep = set(args.rows.split(","))
        specs = [s for s in specs if s["key"] in keep]
    rows = []
    t0 = time.time()
    try:
        for spec in specs:
            rows.append(memory.train_row(spec, args, work))  # it plans the row too (planned_row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Planner vs measured peak per rank, bench/memory.py's rows ({n_params / 1e6:.1f}M Llama, fp32, CPU; "
        f"{time.time() - t0:.0f} s). Planned totals include the CPU constants (libraries "
        f"{rows[0]['planned_terms'].get('libraries (CPU)', 0):.2f} GiB per process)."
        if rows
        else "no rows",
        "",
        "| row | config | ranks | measured peak GiB | planned GiB | planned / measured | largest planned terms |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    ok = True
    for r in rows:
        if "error" in r:
            ok = False
            lines.append(
                f"| {r['key']} | {r['name']} | {r['ranks']} | {r['error']} | {r['planned_gib']:.3f} | | |"
            )
            continue
        ratio = r["planned_gib"] / r["peak_gib"]
        ok &= abs(ratio - 1) <= 0.2
        top = sorted(((k, v) for k, v in r["planned_terms"].items() if k not in ("total", "save peak (rank 0)")),
                     key=lambda kv: -kv[1])[:3]  # fmt: skip
        lines.append(f"| {r['key']} | {r['name']} | {r['ranks']} | {r['peak_gib']:.3f} | {r['planned_gib']:.3f} | "
                     f"{ratio:.2f} | {', '.join(f'{k} {v:.2f}' for k, v in top)} |")  # fmt: skip
    lines += ["", f"target every row within 20% of its measured peak: {'PASS' if ok and rows else 'MISS'}"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    if args.quick and (not rows or any("error" in r or "planned_error" in r for r in rows)):
        print("plan_check --quick: FAILED (a row did not run or was not planned)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
