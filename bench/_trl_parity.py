"""What the TRL parity benches share (bench/lora_parity.py, moe_parity.py, tr_dpo_parity.py): the same 8 rows,
one dpo_ds run through train.py in one process (ZeRO-2, torch AdamW, constant lr, no clipping), TRL's
DPOTrainer on the same settings, and the PASS / MISS report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpo_ds.dist.launcher import free_port  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append(
            {"prompt": f"q{i}: say {w} twice.", "chosen": f" {w} {w}", "rejected": f" {WORDS[(i + 3) % 10]}"}
        )
    return rows


def write_pairs(data_dir: Path, rows: list[dict]) -> None:
    """The rows as a local data set, the same in its train and test splits."""
    data_dir.mkdir()
    for split in ("train", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_dpo_ds(work: Path, name: str, model_dir: Path, data_dir: Path, args, extra=()) -> dict:
    """One dpo_ds run; returns its per-step loss/train and aux_loss/train, and its log."""
    ds = {
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
    }
    (work / "ds.json").write_text(json.dumps(ds))
    run_dir = work / name
    cmd = [
        sys.executable, str(ROOT / "dpo_ds" / "train.py"), "--ds", str(work / "ds.json"),
        "loss=dpo", "loss.beta=0.1", f"model.name_or_path={model_dir}", f"datasets=[{data_dir}]",
        f"run_dir={run_dir}", f"batch_size={args.pairs}", f"n_epochs={args.steps}", f"lr={args.lr}",
        "warmup_steps=0", "max_grad_norm=1000000.0", "max_length=64", "max_prompt_length=32",
        "do_first_eval=false", "n_eval_examples=0", "eval_every=1000000000", "data.layout=padded",
        "checkpoint.save_optimizer=false", f"seed={args.seed}", "torch_threads=2", *extra,
    ]  # fmt: skip
    env = {
        **os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
    }  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    if proc.returncode != 0:
        sys.exit(f"dpo_ds ({name}) failed:\n{log[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/train" in r]
    return {
        "loss": [r["loss/train"] for r in steps],
        "aux": [r.get("aux_loss/train", math.nan) for r in steps],
        # real (non-pad) tokens through the policy: BOS + prompt + response + EOS, both sequences of a pair
        "tokens": [
            round(r["throughput/real_tokens_per_second"] * r["throughput/step_seconds"]) for r in steps
        ],
        "logps": [(r["logps_train/chosen"], r["logps_train/rejected"]) for r in steps],
        "log": log,
    }


def trl_logs():
    """A TrainerCallback that keeps TRL's per-step loss, aux_loss, non-pad tokens (cumulative) and log-probs."""
    from transformers import TrainerCallback

    class Logs(TrainerCallback):
        def __init__(self):
            self.loss, self.aux, self.num_tokens, self.logps = [], [], [], []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))
                self.aux.append(float(logs.get("aux_loss", math.nan)))
                self.num_tokens.append(int(logs["num_tokens"]))  # cumulative non-pad tokens
                self.logps.append((float(logs["logps/chosen"]), float(logs["logps/rejected"])))

    return Logs()


def trl_trainer(
    work: Path, model_dir: Path, rows: list[dict], args, logs, model_config=None, peft_config=None, **settings
):
    """TRL's DPOTrainer on the benches' common settings (the module docstring's), `settings` added to its
    DPOConfig; the policy loaded from model_dir in fp32 (with `model_config` when given), the reference made by
    TRL from the same weights, or the base with `peft_config`'s adapters off."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    extra = {"config": model_config} if model_config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **extra)
    config = DPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1e6,
        beta=0.1, loss_type=["sigmoid"], max_length=64, precompute_ref_log_probs=False, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=args.seed, train_sampling_strategy="sequential", **settings,
    )  # fmt: skip
    return DPOTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
        callbacks=[logs], peft_config=peft_config,
    )  # fmt: skip


def report(results: dict[str, bool], target: str) -> bool:
    """Each check's PASS / MISS line, then the target's; whether every check passed."""
    print()
    for what, ok in results.items():
        print(f"{'PASS' if ok else 'MISS'}  {what}")
    ok = all(results.values())
    print(f"\ntarget {target}: {'PASS' if ok else 'MISS'}")
    return ok
