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
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._trl_parity import make_rows, run_dpo_ds, trl_logs, trl_trainer, write_pairs  # noqa: E402


def make_model(model_dir: Path, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from dpo_ds.demo.make_assets import char_model_dir

    config = char_model_dir(model_dir, hidden=128, layers=2, heads=4, intermediate=256, max_positions=256)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(model_dir), safe_serialization=True)


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


def run_trl(work: Path, model_dir: Path, rows: list[dict], adapter: dict, args) -> list[float]:
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from dpo_ds.model.files import load_config

    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    logs = trl_logs()
    trainer = trl_trainer(
        work, model_dir, rows, args, logs, model_config=load_config(model_dir), peft_config=peft_config
    )
    result = set_peft_model_state_dict(trainer.model, adapter)  # dpo_ds's initial adapter, before any step
    missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    assert not result.unexpected_keys and not missing, (result.unexpected_keys, missing[:4])
    trainer.train()
    return logs.loss


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
    write_pairs(data_dir, rows)
    settings = load_config(None, [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}"]).model.lora
    adapter = initial_adapter(model_dir, settings, args.seed)
    ours = run_dpo_ds(
        work,
        "dpo_ds",
        model_dir,
        data_dir,
        args,
        [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}"],
    )["loss"]
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
