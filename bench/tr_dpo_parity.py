"""TR-DPO (a reference that moves), dpo_ds against TRL 1.16's DPOTrainer with sync_ref_model: the same full-
parameter model, data, optimizer and order, alpha 0.6, a sync every 2 steps, 6 steps; per-step losses side by side.

    pip install -r bench/requirements-trl.txt    # trl==1.16.0
    python bench/tr_dpo_parity.py                # ~1 min on a 2-core CPU

Both frameworks train a random Llama (hidden 128, 2 layers, the shipped char tokenizer: bench/lora_parity.py's
model, here trained whole) in fp32 on the same 8 preference pairs, batch 8, sigmoid DPO with beta 0.1, torch
AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), constant lr, no warmup, no clipping (bench/moe_parity.py's
common settings). TRL: sync_ref_model=True, ref_model_mixup_alpha, ref_model_sync_steps (its
SyncRefModelCallback mixes ref = alpha * policy + (1 - alpha) * ref at the end of every N-th step, in the
reference's dtype). dpo_ds: model.reference_sync_steps=N model.reference_mixup_alpha=alpha, one process, ZeRO-2
policy and a ZeRO-0 reference engine (the update: whole parameters, in fp32, rounded once).

That the moving reference matters at this tolerance is measured, not assumed: dpo_ds runs a second time with
the reference frozen, and its losses after the first sync must differ from the synced run's by more than 10x
the tolerance.

Target: every per-step loss within 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._trl_parity import make_rows, report, run_dpo_ds, trl_logs, trl_trainer, write_pairs  # noqa: E402
from bench.lora_parity import make_model  # noqa: E402

TOLERANCE = 1e-5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--sync-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep model, data and logs here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpo_ds_tr_dpo_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = work / "model", work / "data"
    make_model(model_dir, args.seed)
    rows = make_rows(args.pairs)
    write_pairs(data_dir, rows)

    sync = [f"model.reference_sync_steps={args.sync_steps}", f"model.reference_mixup_alpha={args.alpha}"]
    ours = run_dpo_ds(work, "dpo_ds", model_dir, data_dir, args, sync)
    frozen = run_dpo_ds(work, "dpo_ds_frozen", model_dir, data_dir, args)
    logs = trl_logs()
    trainer = trl_trainer(
        work, model_dir, rows, args, logs, sync_ref_model=True, ref_model_mixup_alpha=args.alpha,
        ref_model_sync_steps=args.sync_steps,
    )  # fmt: skip
    trainer.train()

    print(
        f"\nTR-DPO parity: random Llama hidden 128, 2 layers, char tokenizer, full parameters; {args.pairs} pairs "
        f"per step, {args.steps} steps, AdamW lr {args.lr}, fp32; alpha {args.alpha}, a sync every "
        f"{args.sync_steps} steps; dpo_ds ZeRO-2 policy, ZeRO-0 reference engine, one process\n"
    )
    print("| step | TRL loss | dpo_ds loss/train | diff | dpo_ds, reference frozen | synced - frozen |")
    print("|---:|---:|---:|---:|---:|---:|")
    diffs, moved = [], []
    for k, (t, o, f) in enumerate(zip(logs.loss, ours["loss"], frozen["loss"]), start=1):
        diffs.append(abs(t - o))
        moved.append(abs(o - f) if k > args.sync_steps else 0.0)
        print(f"| {k} | {t:.7f} | {o:.7f} | {diffs[-1]:.1e} | {f:.7f} | {o - f:+.1e} |")
    worst = max(diffs, default=math.nan)
    results = {
        f"same number of steps ({args.steps}) logged by both": len(ours["loss"])
        == len(logs.loss)
        == args.steps,
        f"every per-step loss within {TOLERANCE:g} (max {worst:.1e})": worst <= TOLERANCE,
        f"the moving reference changes dpo_ds's losses by more than {10 * TOLERANCE:g} (max {max(moved):.1e})": (
            max(moved) > 10 * TOLERANCE
        ),
        "step 1 is ln 2 in both": all(abs(x[0] - math.log(2)) <= 1e-6 for x in (logs.loss, ours["loss"])),
    }
    ok = report(results, f"every per-step loss within {TOLERANCE:g} of TRL's")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
