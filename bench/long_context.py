"""The longest preference pair a DPO step trains within a fixed per-rank memory budget: sequence
parallelism 1 vs 2, on 2 ranks.

    python bench/long_context.py                    # CPU, 2 ranks, ~58M Llama, 2.5 GiB: ~75 min on 2 cores
    python bench/long_context.py --quick            # ~20M Llama (~20 min): the table in bench/RESULTS.md
    python bench/long_context.py --smoke            # 8.6M Llama, 256/512 tokens, SP 1 and 2 (~1.5 min): the code
    python bench/long_context.py --gpu --out R/f_long.json     # bench/gpu_check.sh's stage (f): one GPU
    python bench/long_context.py --gpu --cpu-smoke              # the same stage on CPU, tiny (its plumbing)
    python bench/long_context.py --quick --tiled-mlp 16384      # ALST's tiled MLP on and off, SP 1 and 2

Every run is a real `dpo_ds/train.py` run through the deepspeed launcher (2 ranks, 1 torch thread each)
of 2 DPO steps under ZeRO-3 with a reference engine, gradient checkpointing and fused_linear log-probs, on
pairs of one length L = prompt + chosen + rejected (prompt L/4, each response 3L/8) in the packed layout:
each pair is one row of 1.25 L tokens, chosen and rejected each after its own copy of the prompt, every
segment plain causal attention (SDPA's memory-efficient kernel; a shared-prompt row's second response needs
a mask, which CPU attention materialises, quadratic in L). SP 1: each rank trains its own pair
(batch 2); SP 2: the two ranks share one pair (batch 1), each holding L/2 of its tokens. A seeded random
Llama with a 32000-row vocabulary (bench/memory.py's model). peak = memory/peak_gib_max: the largest
resident-set high-water mark of any rank over the steps (torch.cuda.max_memory_allocated on a GPU).

How the longest L is found: peak is linear in L here (checkpointed layers keep one hidden state per
token per layer, fused_linear keeps no logits, attention is computed in blocks), so each setting is run
at two lengths, the line through them gives the longest L within the budget, and one more run at that L
checks it (2 steps each: the second step's peak is the whole one, the first runs before the optimizer
states exist); a check over the budget (peak grows a little faster than linearly at long L) moves the line to
it and runs again, at most twice. The table gives the longest checked L within the budget, its peak, and
the checks that were over. Throughput: tokens per second of both settings at the
shorter length both run (all ranks; SP 2 trains half as many pairs a step, each on both ranks).
Target: SP 2 trains >= 1.8x the length of SP 1 within the same per-rank budget.

--gpu (one lent GPU, bench/gpu_check.sh): SP 2 needs two devices, so the stage runs SP 1 on one rank, a ~1B
model in bf16 on packed rows over FlexAttention, at each of --lengths (default 8192, 32768) while its
--budget-s lasts: peak memory (max allocated) and tokens/s of a long pair on the device, no fit. The first
length always starts (stopped at the budget's end); a later one only with 60 s left.
--gpu --cpu-smoke: the same on CPU, the 8.6M smoke model of bench/memory.py with bf16 weights written once,
pairs of 256 then 512 tokens (--lengths), then 256 with MLP tiles of 128 tokens: figures of no meaning.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.memory import LETTERS, SHAPES, make_model, stop, train_cmd  # noqa: E402
from dpo_ds.dist.launcher import wait_for_train_steps  # noqa: E402

CONFIGS = {
    # name: (model shape, the two fitted lengths, budget GiB per rank)
    "full": (SHAPES["full"], (4096, 8192), 2.5),
    "quick": (SHAPES["quick"], (8192, 16384), 1.6),
    "gpu": (SHAPES["gpu"], (8192, 16384), 40.0),
    # --smoke: the fit's four runs only (a budget below every peak: no check run); figures of no meaning
    "smoke": (SHAPES["smoke"], (256, 512), 0.5),
}


def say(msg: str) -> None:
    print(f"[long_context {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_pairs(out: Path, length: int, n: int = 4) -> tuple[int, int]:
    """n pairs of exactly `length` tokens (the char tokenizer: one token a character, plus BOS/EOS);
    returns (max_length, max_prompt_length) that keep them whole."""
    rng = random.Random(length)
    out.mkdir(parents=True, exist_ok=True)
    prompt = length // 4 - 2  # BOS + prompt
    response = (length - length // 4) // 2 - 1  # + EOS
    for split in ("train", "test"):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                text = "".join(rng.choice(LETTERS) for _ in range(prompt - 6))
                row = {
                    "prompt": f"q{i:04d} " + text,
                    "chosen": "".join(rng.choice(LETTERS) for _ in range(response)),
                    "rejected": "".join(rng.choice(LETTERS) for _ in range(response)),
                }
                f.write(json.dumps(row) + "\n")
    return prompt + response + 1 + 8, prompt + 8


def run(work: Path, sp: int, length: int, args, ranks: int = 2, tiled: int = 0) -> dict:
    data = work / f"data_{length}"
    max_length, max_prompt = make_pairs(data, length)
    run_dir = work / f"run_sp{sp}_{length}{f'_tiled{tiled}' if tiled else ''}"
    batch = ranks // sp
    overrides = [
        "--ds", str(ROOT / "ds_configs" / "zero3.json"), f"model.name_or_path={work / 'model'}",
        f"datasets=[{data}]", f"run_dir={run_dir}", f"data.cache_dir={work / 'cache'}", "data.layout=packed",
        f"batch_size={batch}", f"eval_batch_size={batch}", "n_epochs=null", f"n_examples={batch * 2}",
        "do_first_eval=false", "n_eval_examples=2", "eval_every=1000000000", f"max_length={max_length}",
        f"max_prompt_length={max_prompt}", "lr=1e-5", "warmup_steps=0", "log_every=1",
        "checkpoint.save_optimizer=false", "model.logprob_impl=fused_linear", "model.gradient_checkpointing=true",
        f"parallel.sequence_parallel_size={sp}", f"parallel.tiled_mlp_tokens={tiled}", f"dist_timeout_s={args.run_timeout}",
        # on a GPU the model directory holds bf16 weights written on the device; on CPU a seeded init
        *(["model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"] if args.gpu else ["model.init=random"]),
    ]  # fmt: skip
    cmd, e = train_cmd(overrides, ranks, args)
    t0 = time.time()
    say(
        f"SP {sp}, pairs of {length} tokens, {ranks} rank(s){f', MLP tiles of {tiled} tokens' if tiled else ''}"
    )
    log_path = run_dir.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = min(t0 + args.run_timeout, args.deadline)
        rows, status = wait_for_train_steps(proc, run_dir / "metrics.jsonl", 2, deadline)
    finally:
        stop(proc)
    out = {"sp": sp, "length": length, "wall_s": round(time.time() - t0, 1)}
    if status != "ok":
        say(f"  FAILED ({status}):\n{log_path.read_text()[-2000:]}")
        return {**out, "error": status}
    out.update(
        peak_gib=max(r.get("memory/peak_gib_max", r["memory/peak_gib"]) for r in rows),
        step_s=statistics.median(r["throughput/step_seconds"] for r in rows[1:] or rows),
        tokens_per_s=statistics.median(r["throughput/real_tokens_per_second"] for r in rows[1:] or rows),
    )
    say(f"  peak {out['peak_gib']:.3f} GiB per rank, {out['step_s']:.1f} s/step")
    return out


def longest(a: dict, b: dict, budget: float) -> int:
    """The L where the line through (L, peak) of a and b meets the budget, down to a multiple of 64."""
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["length"] - a["length"])
    if slope <= 0:
        return b["length"]
    return int((a["length"] + (budget - a["peak_gib"]) / slope) // 64 * 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--smoke", action="store_true", help="2 ranks, tiniest sizes: the code paths (exit 1 if a run failed)"
    )
    ap.add_argument("--gpu", action="store_true", help="CUDA, ~1B model in bf16 (bench/gpu_check.sh)")
    ap.add_argument("--budget-gib", type=float, default=None, help="per-rank budget (default: the config's)")
    ap.add_argument("--run-timeout", type=float, default=1500)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument(
        "--lengths", default=None, help="--gpu: the pair lengths to run (8192,32768; smoke 256,512)"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="with --gpu: tiny sizes on CPU (the stage's plumbing)"
    )
    ap.add_argument("--tiled-mlp", type=int, default=0, metavar="L",
                    help="instead: SP 1 and SP 2 at pairs of L tokens with and without ALST's tiled MLP")  # fmt: skip
    args = ap.parse_args()
    args.deadline = time.time() + args.budget_s
    args.gpu_short = args.gpu  # what memory.train_cmd reads: one GPU runs a bare python, world 1
    args.cuda = args.gpu and not args.cpu_smoke  # memory.run_env: DS_ACCELERATOR=cuda, no TRITON_INTERPRET
    if args.gpu:
        return gpu_stage(args)
    name = "gpu" if args.gpu else "smoke" if args.smoke else "quick" if args.quick else "full"
    shape, (l1, l2), budget = CONFIGS[name]
    budget = args.budget_gib or budget
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_long_"))
    n_params = make_model(work / "model", shape, weights_on="cuda" if args.gpu else None)
    if args.tiled_mlp:
        return tiled_mlp_stage(work, args, n_params, shape)
    results = {}
    for sp in (1, 2):
        fit = [run(work, sp, length, args) for length in (l1, l2)]
        if any("error" in r for r in fit):
            results[sp] = {"fit": fit, "error": "a fitting run failed"}
            continue
        target = longest(*fit, budget)
        checks = [run(work, sp, target, args)] if target > l2 else [fit[-1]]
        # peak grows a little faster than linearly at long lengths (attention's blocks, the all-to-all's
        # buffers): a check over the budget moves the line to (the longest within it, the check) and runs
        # again, at most twice
        for _ in range(2):
            c = checks[-1]
            if "peak_gib" not in c or c["peak_gib"] <= budget or c["length"] <= l2:
                break
            inside = max(
                (r for r in [*fit, *checks] if r.get("peak_gib", 1e9) <= budget), key=lambda r: r["length"]
            )
            target = longest(inside, c, budget)
            checks.append(run(work, sp, target, args))
        good = [c for c in checks if c.get("peak_gib", 1e9) <= budget]
        best = max(good, key=lambda c: c["length"]) if good else checks[-1]
        results[sp] = {"fit": fit, "longest": best["length"], "check": best, "checks": checks}
    print(report(name, n_params, shape, budget, results))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"budget_gib": budget, "n_params": n_params, "results": results}, indent=1)
        )
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)
        runs = [x for r in results.values() for x in [*r.get("fit", []), *r.get("checks", [])]]
        if any("error" in r for r in [*results.values(), *runs]):
            print("long_context --smoke: FAILED (a run failed)")
            return 1
    return 0


def tiled_mlp_stage(work: Path, args, n_params: int, shape) -> int:
    """--tiled-mlp L: ALST's tiled MLP (parallel.tiled_mlp_tokens = hidden_size, its rule) against the whole
    MLP, SP 1 and SP 2, at pairs of L tokens: peak per rank and seconds per step, side by side."""
    hidden = shape[0]
    rows = [
        (sp, tiled, run(work, sp, args.tiled_mlp, args, tiled=tiled))
        for sp in (1, 2)
        for tiled in (0, hidden)
    ]
    lines = [f"ALST's tiled MLP, pairs of {args.tiled_mlp} tokens, 2 ranks ({os.cpu_count()} cores), ~{n_params / 1e6:.0f}M "
             f"Llama (hidden {hidden}, intermediate {shape[3]}), ZeRO-3, reference engine, packed rows, "
             "gradient checkpointing, fused_linear", "",
             "| setting | MLP | peak GiB per rank | s/step |", "|---|---|---:|---:|"]  # fmt: skip
    for sp, tiled, r in rows:
        what = f"tiles of {tiled} tokens" if tiled else "whole"
        if "error" in r:
            lines.append(f"| SP {sp} | {what} | {r['error']} | |")
        else:
            lines.append(f"| SP {sp} | {what} | {r['peak_gib']:.3f} | {r['step_s']:.1f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps([{"sp": sp, "tiled": t, **r} for sp, t, r in rows], indent=1))
    return 0


def gpu_stage(args) -> int:
    """One GPU: SP 1 on one rank at each length while the budget lasts (see the module docstring)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("long_context: SKIPPED: no CUDA device (use --cpu-smoke to check the plumbing on CPU)")
        if args.out:
            Path(args.out).write_text(json.dumps({"skipped": "no CUDA device"}))
        return 0
    if args.cpu_smoke and cuda:
        args.cpu_smoke = False  # a GPU is here: the real stage
        args.cuda = True
    shape = SHAPES["smoke"] if args.cpu_smoke else SHAPES["gpu"]
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_long_"))
    n_params = make_model(work / "model", shape, weights_on="cpu" if args.cpu_smoke else "cuda")
    rows = []
    lengths = [int(x) for x in (args.lengths or ("256,512" if args.cpu_smoke else "8192,32768")).split(",")]
    hidden = shape[0]
    min_left = 15 if args.cpu_smoke else 60  # seconds a later row needs to be worth starting
    # each length, then the first again with ALST's tiled MLP (tiles of hidden_size tokens), while it lasts;
    # the first always starts (run() stops it at the deadline): the stage exists to run at least that one
    for length, tiled in [(n, 0) for n in lengths] + [(lengths[0], hidden)]:
        if rows and time.time() > args.deadline - min_left:
            rows.append(
                {"length": length, "tiled": tiled, "error": "not started: the stage's budget is spent"}
            )
            continue
        rows.append({**run(work, 1, length, args, ranks=1, tiled=tiled), "tiled": tiled})
    where = f"one GPU ({torch.cuda.get_device_name()})" if cuda else "CPU (SMOKE: not GPU figures)"
    attn = "FlexAttention" if cuda else "dpo_ds_blocks (CPU's auto)"
    lines = [f"Long pairs on {where}, ~{n_params / 1e9:.3f}B Llama bf16, ZeRO-3, "
             f"packed rows on {attn}, checkpointing, fused_linear", "",
             f"| pair tokens | MLP | peak GiB ({'max allocated' if cuda else 'VmHWM'}) | s/step | tokens/s |", "|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        mlp = f"tiles of {r['tiled']}" if r["tiled"] else "whole"
        if "error" in r:
            lines.append(f"| {r['length']} | {mlp} | {r['error']} | | |")
        else:
            lines.append(
                f"| {r['length']} | {mlp} | {r['peak_gib']:.2f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} |"
            )
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"n_params": n_params, "device": "cuda" if cuda else "cpu", "rows": rows}, indent=1)
        )
    if not cuda:
        shutil.rmtree(work, ignore_errors=True)  # the smoke's model and runs (a GPU run's logs stay)
    return 0


def report(name, n_params, shape, budget, results) -> str:
    lines = [
        f"Longest DPO pair within {budget:.1f} GiB per rank, 2 ranks ({os.cpu_count()} cores), ~{n_params / 1e6:.0f}M "
        f"Llama ({shape[1]} layers, hidden {shape[0]}, {shape[2]} heads, vocab 32000), ZeRO-3, reference engine, "
        "packed rows, gradient checkpointing, fused_linear",
        "",
        "| setting | peak at fit lengths (GiB per rank) | longest pair within budget | its measured peak | "
        "tokens/s at the shorter length |",
        "|---|---|---:|---:|---:|",
    ]
    for sp, r in results.items():
        if "error" in r:
            lines.append(f"| SP {sp} | {r['error']} | | | |")
            continue
        fits = ", ".join(f"{f['length']}: {f['peak_gib']:.3f}" for f in r["fit"])
        tried = [c for c in r.get("checks", []) if c is not r["check"] and "peak_gib" in c]
        if tried:
            fits += "; checked over the budget: " + ", ".join(
                f"{c['length']}: {c['peak_gib']:.3f}" for c in tried
            )
        c = r["check"]
        peak = f"{c['peak_gib']:.3f}" if "peak_gib" in c else c.get("error", "")
        lines.append(f"| SP {sp} ({'each rank its own pair' if sp == 1 else 'both ranks share each pair'}) | {fits} | "
                     f"{r['longest']} | {peak} | {r['fit'][0]['tokens_per_s']:.0f} |")  # fmt: skip
    if all("longest" in r for r in results.values()):
        one, two = results[1], results[2]
        ratio = two["longest"] / one["longest"]
        within = all(r["check"].get("peak_gib", 1e9) <= budget * 1.02 for r in (one, two))
        ok = ratio >= 1.8 and within
        lines += ["", f"target SP 2 >= 1.8x the length of SP 1 within the budget: {two['longest']} vs "
                      f"{one['longest']} tokens = {ratio:.2f}x{'' if within else ' (a checked peak is over the budget)'}: "
                      f"{'PASS' if ok else 'MISS'}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
