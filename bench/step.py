"""DPO step throughput, padded vs packed, through the real launcher (2 ranks, ZeRO-3).

    python bench/step.py                   # ~3 min on a 2-core CPU
    python bench/step.py --hidden 512 --layers 8 --steps 12 --ranks 8   # on a GPU node

Both runs use the same seeded model (a random Llama of ~10M+ parameters with the shipped
char-level tokenizer, so characters = tokens), the same length-varied preference data (log-normal
prompt and response lengths, like chat data), the same global batch and optimizer; only the
collator differs. Prints real (non-pad) tokens per second over all ranks, the padding fraction, and
peak memory per rank (peak RSS on CPU, max allocated on GPU), medians over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
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
from dpo_ds.launcher import deepspeed_cmd, env  # noqa: E402


def make_model(out: Path, hidden: int, layers: int) -> int:
    from transformers import LlamaConfig

    tok_dir = ROOT / "dpo_ds" / "demo" / "model"
    out.mkdir(parents=True)
    for f in tok_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    base = json.loads((tok_dir / "config.json").read_text())
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
        tie_word_embeddings=False,
    )
    cfg.save_pretrained(str(out))
    per_layer = 4 * hidden * hidden + 3 * hidden * cfg.intermediate_size
    return layers * per_layer + 2 * base["vocab_size"] * hidden


def lognormal_len(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))


def make_data(out: Path, n_train: int, max_length: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz      "
    out.mkdir(parents=True)
    lengths = []
    for split, n in (("train", n_train), ("test", 32)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                p = lognormal_len(rng, 40, 0.8, max_length // 2)
                c = lognormal_len(rng, 60, 0.9, max_length)
                r = lognormal_len(rng, 60, 0.9, max_length)
                text = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
                f.write(json.dumps({"prompt": text(p), "chosen": text(c), "rejected": text(r)}) + "\n")
                lengths.append(min(p + max(c, r), max_length))
    return {"median_pair_len": statistics.median(lengths), "max": max(lengths)}


def run(name: str, args, model: Path, data: Path, run_dir: Path, extra: list[str]) -> dict:
    cmd = deepspeed_cmd(
        "--ds",
        str(ROOT / args.ds),
        "loss=dpo",
        "loss.beta=0.1",
        f"model.name_or_path={model}",
        f"datasets=[{data}]",
        f"run_dir={run_dir}",
        f"batch_size={args.batch}",
        "n_epochs=null",
        f"n_examples={args.batch * args.steps}",
        "do_first_eval=false",
        "n_eval_examples=0",
        "eval_every=100000000",
        f"max_length={args.max_length}",
        f"max_prompt_length={args.max_length // 2}",
        "lr=1e-5",
        "warmup_steps=0",
        "log_every=1",
        *extra,
        ranks=args.ranks,
    )
    t0 = time.time()
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/train" in r][args.warmup :]
    return {
        "name": name,
        "tokens_per_s": statistics.median(r["throughput/real_tokens_per_second"] for r in steps),
        "step_s": statistics.median(r["throughput/step_seconds"] for r in steps),
        "padding": statistics.median(r["throughput/padding_fraction"] for r in steps),
        "peak_gib": max(r["memory/peak_gib"] for r in steps),
        "first_losses": [round(r["loss/train"], 4) for r in rows if "loss/train" in r][:3],
        "wall_s": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="global pairs per step")
    ap.add_argument("--micro", type=int, default=4, help="padded: pairs per micro-batch per rank")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ds", default="ds_configs/zero3.json", help="DeepSpeed JSON, relative to the repo")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = ap.parse_args()
    gas = args.batch // (args.ranks * args.micro)
    tmp = Path(tempfile.mkdtemp(prefix="dpo_ds_bench_step_"))
    try:
        n_params = make_model(tmp / "model", args.hidden, args.layers)
        stats = make_data(tmp / "data", n_train=args.batch * args.steps, max_length=args.max_length)
        budget = args.micro * 2 * args.max_length  # the padded micro-batch's worst case, in tokens
        results = [
            run(
                "padded",
                args,
                tmp / "model",
                tmp / "data",
                tmp / "padded",
                [f"gradient_accumulation_steps={gas}"],
            ),
            run(
                "packed",
                args,
                tmp / "model",
                tmp / "data",
                tmp / "packed",
                ["data.packing=true", f"data.max_tokens_per_micro_batch={budget}"],
            ),
        ]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nDPO step, {args.ranks} ranks, ZeRO-3, Llama {n_params / 1e6:.1f}M params (hidden {args.hidden}, "
        f"{args.layers} layers), batch {args.batch} pairs, max_length {args.max_length}, "
        f"median prompt+response {stats['median_pair_len']} tokens; padded micro-batch {args.micro} pairs, "
        f"packed budget {budget} tokens\n"
    )
    print("| collator | real tokens/s | step s | padding | peak mem / rank GiB | first losses |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['padding']:.1%} | {r['peak_gib']:.2f} | "
            f"{r['first_losses']} |"
        )
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(
        f"\ntarget: packed >= 1.5x padded real tokens/s: {'PASS' if ratio >= 1.5 else 'MISS'} ({ratio:.2f}x)"
    )


if __name__ == "__main__":
    main()
