"""The planner's estimate beside the measured peak: bench/memory.py's rows, and configurations outside them.

    python bench/plan_check.py                     # CPU, 2 ranks: memory.py's rows, then the outside section
    python bench/plan_check.py --section outside   # bench/plan_heldout.py's configurations alone (~6 min)
    python bench/plan_check.py --rows 1,13,o2
    python bench/plan_check.py --quick             # smoke sizes, rows 1,5,10 and o2: the code, not the figures

Each row is a real run (memory.train_row: the deepspeed launcher, 2 CPU ranks), measured as memory.py
measures it (rank 0's memory/peak_gib: the resident set's high-water mark over the training steps); beside
it dpo_ds.plan's total for the same arguments, read from the model's config.json (and the data, where the
run's token cache says how long the rows are). On CPU the total includes the planner's per-process
constants, which it says it adds. The outside section (bench/plan_heldout.py) shares neither model shape
nor data with memory.py's rows: other head counts and head dims, GQA, tied embeddings, a 49k BPE's data,
LoRA, sequence parallelism, ZeRO-2, a bf16 policy, checkpointing, eager attention. Target: every row planned at 0.90x to
1.25x of its measured peak.
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
from bench._plan_estimate import plan_table, target_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=None, help="comma-separated row keys (memory.py's, or o1..o6 outside)")
    ap.add_argument("--section", choices=["bench", "outside", "all"], default="all",
                    help="bench: memory.py's rows; outside: bench/plan_heldout.py's configurations")  # fmt: skip
    ap.add_argument("--whole-runs", action="store_true",
                    help="outside rows: run each to its end (an eval, the final save with the optimizer state) and "
                         "read the planned / measured line every run ends with")  # fmt: skip
    ap.add_argument("--run-timeout", type=float, default=600)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="bench/memory.py --smoke's sizes, rows 1,5,10 and o2 unless --rows: the code, not the figures; "
        "exit 1 if a row failed",
    )
    args = ap.parse_args()
    args.gpu_short = args.cuda = False
    memory.set_sizes(args, "cpu_smoke" if args.quick else "full")  # memory.py's own sizes
    if args.quick and not args.rows:
        args.rows = "1,5,10,o2"  # ZeRO-3 with a reference engine, ZeRO-2, one rank; LoRA on a 49k-shaped BPE
    keep = set(args.rows.split(",")) if args.rows else None
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_plan_check_"))
    t0 = time.time()
    sections = []
    try:
        if args.section in ("bench", "all"):
            sections.append(("bench", *bench_rows(args, work, keep)))
        if args.section in ("outside", "all"):
            sections.append(
                ("outside", "configurations of bench/plan_heldout.py", outside_rows(args, work, keep))
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok, lines, rows = True, [], []
    for name, title, section in sections:
        good, text = plan_table(name, title, section)
        ok &= good
        lines += [text, ""]
        rows += section
    lines.append(target_line(ok and bool(rows), time.time() - t0, judged=not args.quick))
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    if args.quick and (not rows or any("error" in r or "planned_error" in r for r in rows)):
        print("plan_check --quick: FAILED (a row did not run or was not planned)")
        return 1
    return 0


def bench_rows(args, work: Path, keep) -> tuple[str, list[dict]]:
    n_params = memory.make_model(work / "model", memory.SHAPES[args.shape])
    memory.make_data(work / "data_short", args.batch * args.steps, args.max_length, fill=False)
    memory.make_data(work / "data_long", args.long_batch * args.long_steps, args.long_length, fill=True)
    specs = [s for s in memory.training_specs(args) if keep is None or s["key"] in keep]
    rows = [memory.train_row(spec, args, work) for spec in specs]  # it plans the row too (planned_row)
    return f"bench/memory.py's rows ({n_params / 1e6:.1f}M Llama, fp32)", rows


def outside_rows(args, work: Path, keep) -> list[dict]:
    from bench import plan_heldout

    specs = [s for s in plan_heldout.specs(args.quick) if keep is None or s["key"] in keep]
    built: dict[str, Path] = {}
    rows = []
    for spec in specs:
        for kind, key in (("model", spec["model_key"]), ("data", spec["data_key"])):
            if (kind, key) not in built:
                out = work / "outside" / f"{kind}_{key}"
                built[kind, key] = (plan_heldout.build_model(out, key, args.quick) if kind == "model"
                                    else plan_heldout.build_data(out, key, plan_heldout.ROWS_OF_DATA))  # fmt: skip
        data = built["data", spec["data_key"]]
        source = f"ultrafeedback:{data}" if spec["data_key"] == "uf" else str(data)
        spec = {**spec, "model": str(built["model", spec["model_key"]]),
                "overrides": [f"datasets=[{source}]", *spec["overrides"]]}  # fmt: skip
        rows.append(whole_run(spec, args, work) if args.whole_runs else memory.train_row(spec, args, work))
    return rows


def whole_run(spec: dict, args, work: Path) -> dict:
    """A row run as a user runs it, to its end: the steps, an eval, the final save (optimizer state too); its
    own last line says planned vs measured (cli/steps.log_planned_vs_measured: the launch's data-aware plan of
    the peak, training or saving, beside the largest VmHWM of any rank since training started)."""
    import re
    import subprocess

    batch = next(int(o.split("=")[1]) for o in spec["overrides"] if o.startswith("batch_size="))
    overrides = [*memory.row_overrides(spec, args, work), f"eval_every={batch * spec['steps']}", "n_eval_examples=8",
                 "checkpoint.save_optimizer=true"]  # fmt: skip
    cmd, env = memory.train_cmd(overrides, spec["ranks"], args)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    found = re.search(
        r"memory per rank: planned ([\d.]+) GiB, measured peak ([\d.]+) GiB", proc.stdout + proc.stderr
    )
    out = {**spec, "wall_s": time.time() - t0}
    if proc.returncode != 0 or not found:
        return {**out, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"}
    planned, peak = float(found.group(1)), float(found.group(2))
    return {**out, "peak_gib": peak, "planned_gib": planned, "planned_terms": {"(launch log)": planned}}


if __name__ == "__main__":
    sys.exit(main())
