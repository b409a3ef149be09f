"""LoRA DPO, dpo_ds against TRL 1.16's DPOTrainer with peft: the same base, the same initial adapter,
5 steps, per-step losses side by side.

    pip install -r bench/requirements-trl.txt    # trl==1.16.0 (peft comes with dpo_ds's test extras)
    python bench/lora_parity.py                  # ~1 min on a 2-core CPU

Both frameworks train a random Llama (hidden 128, 2 layers, the shipped char tokenizer; safetensors
written once) with LoRA r=16, alpha 32, on every linear layer but the lm_head, in fp32, on the same 8
preference pairs: batch 8 (every step is the whole set, so the order batches are drawn in does not
matter), sigmoid DPO with beta 0.1, torch AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), constant
lr 1e-3, no warmup, no clipping (max_grad_norm 1e6), no dropout, the tokenizer's own BOS rule in both
(this tokenizer puts <s> in front of a prompt: TRL's tokenizer(text) and dpo_ds's data.add_bos=auto
alike), the reference the base with the adapters off.

The same initial adapter: dpo_ds initialises its adapter with adapters.wrap (A from the run's seed, B
zero) on the model it builds; this script builds the same model the same way, calls the same wrap,
and loads the resulting adapter into TRL's peft model before training starts (TRL's own init is
discarded). dpo_ds runs as `dpo_ds/train.py --ds <ZeRO-2 JSON>` in one process.

Target: every per-step loss within 1e-4 (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpo_ds.dist.launcher import free_port  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]


def make_model(model_dir: Path, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from dpo_ds.demo.make_assets import char_model_dir

    config = char_model_dir(model_dir, hidden=128, layers=2, heads=4, intermediate=256, max_positions=256)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append(
            {"prompt": f"q{i}: say {w} twice.", "chosen": f" {w} {w}", "rejected": f" {WORDS[(i + 3) % 10]}"}
        )
    return rows


def initial_adapter(model_dir: Path, settings, seed: int) -> dict:
    """dpo_ds's initial adapter, made as build_policy makes it: the model from_pretrained (fp32, dropout
    0), then adapters.wrap with the run's seed."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from dpo_ds.model import adapters
    from dpo_ds.model.files import load_config

    lm = AutoModelForCausalLM.from_pretrained(
        str(model_dir), config=load_config(model_dir), dtype=torch.float32
    )
    model = adapters.wrap(lm, settings, seed, gradient_checkpointing=False, base=model_dir)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def run_dpo_ds(work: Path, model_dir: Path, data_dir: Path, args) -> list[float]:
    ds = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
    }
    (work / "ds.json").write_text(json.dumps(ds))
    run_dir = work / "dpo_ds"
    cmd = [
        sys.executable, str(ROOT / "dpo_ds" / "train.py"), "--ds", str(work / "ds.json"),
        "loss=dpo", "loss.beta=0.1", f"model.name_or_path={model_dir}", f"datasets=[{data_dir}]",
        f"run_dir={run_dir}", f"batch_size={args.pairs}", f"n_epochs={args.steps}", f"lr={args.lr}",
        "warmup_steps=0", "max_grad_norm=1000000.0", "max_length=64", "max_prompt_length=32",
        "do_first_eval=false", "n_eval_examples=0", "eval_every=1000000000",
        "checkpoint.save_optimizer=false", f"seed={args.seed}", "torch_threads=2",
        f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}",
    ]  # fmt: skip
    env = {
        **os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
    }  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"dpo_ds failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/train"] for r in rows if "loss/train" in r]


def run_trl(work: Path, model_dir: Path, rows: list[dict], adapter: dict, args) -> list[float]:
    import datasets
    import torch
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_ds.model.files import load_config

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), config=load_config(model_dir), dtype=torch.float32
    )
    config = DPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1e6,
        beta=0.1, loss_type=["sigmoid"], max_length=64, precompute_ref_log_probs=False, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=args.seed, train_sampling_strategy="sequential",
    )  # fmt: skip
    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    callback = Losses()
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
        peft_config=peft_config, callbacks=[callback],
    )  # fmt: skip
    result = set_peft_model_state_dict(trainer.model, adapter)  # dpo_ds's initial adapter, before any step
    missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    assert not result.unexpected_keys and not missing, (result.unexpected_keys, missing[:4])
    trainer.train()
    return callback.losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from dpo_ds.config import load_config

    work = Path(tempfile.mkdtemp(prefix="dpo_ds_lora_parity_"))
    model_dir, data_dir = work / "model", work / "data"
    make_model(model_dir, args.seed)
    rows = make_rows(args.pairs)
    data_dir.mkdir()
    for split in ("train", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = load_config(None, [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}"]).model.lora
    adapter = initial_adapter(model_dir, settings, args.seed)
    ours = run_dpo_ds(work, model_dir, data_dir, args)
    theirs = run_trl(work, model_dir, rows, adapter, args)
    print(
        f"\nLoRA DPO parity: random Llama hidden 128, 2 layers, char tokenizer; LoRA r={args.r}, alpha {2 * args.r}, "
        f"all-linear; {args.pairs} pairs per step, {args.steps} steps, AdamW lr {args.lr}, fp32\n"
    )
    print("| step | dpo_ds loss | TRL loss | abs diff |")
    print("|---:|---:|---:|---:|")
    diffs = []
    for k, (a, b) in enumerate(zip(ours, theirs), start=1):
        diffs.append(abs(a - b))
        print(f"| {k} | {a:.7f} | {b:.7f} | {abs(a - b):.2e} |")
    ok = len(ours) == len(theirs) == args.steps and max(diffs) <= 1e-4 and ours[-1] < ours[0]
    print(
        f"\ntarget every per-step loss within 1e-4 of TRL's: {'PASS' if ok else 'MISS'} (max {max(diffs):.2e})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
