"""bench/memory.py --moe: its training rows on a Mixture-of-Experts model, the planner's estimate beside each.

    python bench/memory.py --moe            # CPU, 2 ranks, a 91.5M-parameter Qwen3-MoE: 2 rows (~3 min on 2 cores)
    python bench/memory.py --moe --smoke    # the 9.1M smoke MoE: the code path, figures of no meaning

The model: the shipped tiny_moe's layout (Qwen3-MoE, 8 experts, top-2, every layer sparse, q/k norms, the
character tokenizer) at the dense rows' width, depth and 32000-row untied vocabulary, each expert's MLP as
wide as the hidden size, seeded random init. tiny_moe itself (0.14M parameters) holds a few MiB of model
states, nothing beside the ~0.55 GiB every rank holds whatever the model (memory.py rows 11, 12); here the
model states are most of the models+opt column, as the dense rows' are. The rows run as memory.py's short
rows run (memory.train_row: the deepspeed launcher, 2 CPU ranks, ZeRO-3, the same data and steps):
  m1  full DPO, reference engine fp32: the MoE counterpart of row 1
  m2  LoRA r=16 on the attention (all-linear) and on every fused expert weight (model.lora.target_parameters=
      [experts]), reference = adapters off: row 13's, with the experts adapted too
Besides memory.py's figures each row has dpo_ds.plan's total for the same arguments (bench/_plan_estimate.py)
and bench/plan_check.py's check of it: planned within 0.90x-1.25x of the measured peak.

Called by bench/memory.py with its own train_row (this module imports no bench script: no import circle).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from bench._plan_estimate import plan_table, target_line

ROOT = Path(__file__).resolve().parent.parent
TINY_MOE = ROOT / "dpo_ds" / "demo" / "tiny_moe"
GIB = 2**30
VOCAB = 32000

# hidden, layers, heads (head_dim = hidden / heads), one expert's width; 8 experts, top-2, vocab 32000
MOE_SHAPES = {
    "full": (512, 8, 8, 512),  # 91.5M, 53.8M active a token
    "quick": (256, 4, 4, 256),  # 23.7M
    "smoke": (128, 2, 2, 128),  # 9.1M
}
EXPERTS, TOP_K = 8, 2


def make_moe_model(out: Path, shape: tuple[int, int, int, int]) -> tuple[int, int]:
    """A Qwen3-MoE directory: tiny_moe's config.json at `shape` and vocab 32000, its tokenizer, no weights
    (dpo_ds initialises them from the seed). Returns (parameters, active parameters a token)."""
    hidden, layers, heads, width = shape
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MOE / name, out / name)
    cfg = json.loads((TINY_MOE / "config.json").read_text())
    cfg.update(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,  # a dense layer's MLP: there is none (mlp_only_layers [], step 1)
        moe_intermediate_size=width,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=4096,
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    head_dim = hidden // heads
    attention = 4 * hidden * hidden + 2 * head_dim + 2 * hidden  # q, k, v, o; q/k norms; two layer norms
    router = EXPERTS * hidden  # (E, H)
    expert = 3 * width * hidden  # gate, up (fused as (E, 2I, H)) and down (E, H, I): one expert's share
    rest = 2 * VOCAB * hidden + hidden  # embeddings, lm_head, final norm
    n = layers * (attention + router + EXPERTS * expert) + rest
    active = layers * (attention + router + TOP_K * expert) + rest
    return n, active


def specs(args, model: Path) -> list[dict]:
    """memory.py's short rows (2 ranks, ZeRO-3), on the MoE model."""
    short = dict(long=False, steps=args.steps, ranks=2, ds="zero3", model=str(model))
    lora = ["model.lora.r=16", "model.lora.target_parameters=[experts]"]
    return [
        dict(short, key="m1", name="MoE, ZeRO-3, reference engine fp32", overrides=[]),
        dict(short, key="m2", name="MoE, ZeRO-3, LoRA r=16 attention + experts, reference = adapters off",
             overrides=lora),
    ]  # fmt: skip


def run_moe(args, work: Path, t_start: float, *, train_row, make_data) -> int:
    """Build the model and memory.py's short data (its make_data), run the rows (args.rows: a subset) with
    its train_row, print both tables; 1 if a row failed or was not planned."""
    if args.gpu_short:
        print("memory --moe: CPU, 2 ranks only (not with --gpu-short)")
        return 2
    shape = MOE_SHAPES["smoke" if args.smoke else "quick" if args.quick else "full"]
    n, active = make_moe_model(work / "moe_model", shape)
    say = (
        f"MoE model: {n / 1e6:.1f}M parameters, {active / 1e6:.1f}M active a token (no weights: seeded init)"
    )
    print(f"[memory {time.strftime('%H:%M:%S')}] {say}", file=sys.stderr, flush=True)
    make_data(work / "data_short", args.batch * args.steps, args.max_length, fill=False)
    wanted = set(args.rows.split(",")) if args.rows else None
    rows = [
        train_row(s, args, work) for s in specs(args, work / "moe_model") if not wanted or s["key"] in wanted
    ]
    text, ok = report(args, rows, shape, n, active)
    seconds = time.time() - t_start
    print(text)
    print(target_line(ok and bool(rows), seconds, judged=not (args.smoke or args.quick)))
    print(f"\n(whole bench: {seconds:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"n_params": n, "active": active, "shape": shape, "rows": rows,
                                              "table": text}, indent=2, default=str))  # fmt: skip
    return 1 if any("error" in r or "planned_error" in r for r in rows) else 0


def report(args, rows: list[dict], shape, n: int, active: int) -> tuple[str, bool]:
    """memory.py's training table for these rows, then plan_check's planner table; (text, all in tolerance)."""
    hidden, layers, heads, width = shape
    model = (
        f"Qwen3-MoE {n / 1e6:.1f}M params ({active / 1e6:.1f}M active a token; hidden {hidden}, {layers} layers, "
        f"{EXPERTS} experts top-{TOP_K} of width {width}, vocab {VOCAB}, untied)"
    )
    out = [
        f"\nDPO training memory, rank 0; CPU, peak RSS (VmHWM), 1 torch thread per rank. {model}, fp32 policy, "
        f"AdamW, router loss at the config's 0.001; batch {args.batch} pairs, max_length {args.max_length}, prompts "
        f"16-48 / responses 60-200 tokens; {args.steps} steps each.\n",
        "| # | config | ranks | peak GiB / rank (training) | models+opt GiB / rank | B/param | step s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['key']} | {r['name']} | {r['ranks']} | FAILED: {r['error']} | | | |")
            continue
        per_param = r["model_opt_gib"] * GIB / (n / r["ranks"])
        out.append(
            f"| {r['key']} | {r['name']} | {r['ranks']} | {r['peak_gib']:.3f} | {r['model_opt_gib']:.3f} | "
            f"{per_param:.1f} | {r['step_s']:.1f} |"
        )
    ok, table = plan_table("moe", f"bench/memory.py --moe's rows ({n / 1e6:.1f}M Qwen3-MoE, fp32)", rows)
    out += ["", table, ""]
    return "\n".join(out), ok
