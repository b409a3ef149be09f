"""Sampling at eval under ZeRO-3: seconds per eval at the first and the last eval of a run, through the
real launcher (2 ranks, ZeRO-3 policy and ZeRO-3 reference engine, sample_during_eval=true).

    python bench/generation.py            # ~6 min on a 2-core CPU
    python bench/generation.py --hidden 1024 --layers 16 --new-tokens 256 --evals 8   # on a GPU node

Three runs, identical but for how generation meets ZeRO-3 (dpo_ds/engine/gather.py: gathered_for_generation):

  before       DeepSpeed's per-module gathers with its parameter trace left alone, as dpo_ds generated
               until this change (DPO_DS_GENERATION_KEEP_TRACE=1, eval.gather_for_generation=false)
  per-module   the same gathers, the trace invalidated before each generation (the fallback when a
               full copy of the model does not fit: eval.gather_for_generation=false, or auto)
  gathered     the whole model gathered once per generation, hooks off (eval.gather_for_generation=true,
               and auto whenever a full copy fits)

Prints eval/sample_seconds (the policy's and the reference's samples) at every eval and says whether
the samples of the three runs are identical (greedy decoding of the same weights: they must be).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dpo_ds.demo.make_assets import char_model_dir  # noqa: E402
from dpo_ds.dist.launcher import deepspeed_cmd, env  # noqa: E402

MODES = {
    "before": (["eval.gather_for_generation=false"], {"DPO_DS_GENERATION_KEEP_TRACE": "1"}),
    "per-module": (["eval.gather_for_generation=false"], {}),
    "gathered": (["eval.gather_for_generation=true"], {}),
}


def make_data(out: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    out.mkdir(parents=True)
    for split, count in (("train", n), ("test", 16)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(count):
                text = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
                f.write(
                    json.dumps({"prompt": f"{i}:" + text(40), "chosen": text(30), "rejected": text(30)})
                    + "\n"
                )


def run(name: str, args, model: Path, data: Path, run_dir: Path) -> dict:
    overrides, extra_env = MODES[name]
    steps = args.evals - 1
    cmd = deepspeed_cmd(
        "--ds",
        str(ROOT / "ds_configs/zero3.json"),
        "loss=dpo",
        f"model.name_or_path={model}",
        "model.init=random",
        f"datasets=[{data}]",
        f"run_dir={run_dir}",
        f"batch_size={args.batch}",
        "eval_batch_size=8",
        "n_eval_examples=8",
        "n_epochs=null",
        f"n_examples={args.batch * steps * args.steps_per_eval}",
        f"eval_every={args.batch * args.steps_per_eval}",
        "max_length=128",
        "max_prompt_length=64",
        "lr=1e-4",
        "warmup_steps=0",
        "sample_during_eval=true",
        f"n_eval_model_samples={args.samples}",
        f"max_new_tokens={args.new_tokens}",
        "checkpoint.save_optimizer=false",
        *overrides,
        ranks=args.ranks,
    )
    t0 = time.time()
    proc = subprocess.run(cmd, env=env(**extra_env), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/sample_seconds" in r]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {
        "name": name,
        "seconds": [r["eval/sample_seconds"] for r in evals],
        "steps": [r["step"] for r in evals],
        "samples": samples,
        "wall_s": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="global pairs per step")
    ap.add_argument("--evals", type=int, default=5, help="evals in a run (the first at step 0)")
    ap.add_argument("--steps-per-eval", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8, help="n_eval_model_samples")
    ap.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dpo_ds_bench_gen_"))
    try:
        heads = max(1, args.hidden // 64)
        cfg = char_model_dir(
            tmp / "model", hidden=args.hidden, layers=args.layers, heads=heads, intermediate=2 * args.hidden
        )
        n_params = args.layers * (4 * args.hidden**2 + 6 * args.hidden**2) + 2 * cfg.vocab_size * args.hidden
        make_data(tmp / "data", args.batch * args.steps_per_eval * args.evals)
        results = [run(name, args, tmp / "model", tmp / "data", tmp / name) for name in MODES]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nSampling at eval, {args.ranks} ranks, ZeRO-3 policy + ZeRO-3 reference engine, Llama "
        f"{n_params / 1e6:.1f}M (hidden {args.hidden}, {args.layers} layers), {args.samples} prompts x "
        f"{args.new_tokens} new tokens per model, greedy; eval/sample_seconds (policy + reference samples)\n"
    )
    steps = results[0]["steps"]
    print("| mode | " + " | ".join(f"eval at step {s}" for s in steps) + " | last / first | run wall s |")
    print("|---|" + "---:|" * (len(steps) + 2))
    for r in results:
        cells = " | ".join(f"{x:.2f}" for x in r["seconds"])
        print(f"| {r['name']} | {cells} | {r['seconds'][-1] / r['seconds'][0]:.2f}x | {r['wall_s']:.0f} |")
    before, gathered = results[0], results[-1]
    same = all(r["samples"] == before["samples"] for r in results)
    print(f"\nsamples identical in the three runs (policy and reference, every eval): {same}")
    print(
        f"last eval: gathered {gathered['seconds'][-1]:.2f} s vs before {before['seconds'][-1]:.2f} s "
        f"= {before['seconds'][-1] / gathered['seconds'][-1]:.1f}x faster"
    )


if __name__ == "__main__":
    main()
