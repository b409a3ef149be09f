"""The original DPO code's config keys that dpo_ds does not take, and what to write instead.

eric-mitchell/direct-preference-optimization configures a run with Hydra (config/config.yaml, model/*.yaml,
loss/*.yaml). dpo_ds keeps its key names wherever the meaning is the same (loss.beta, model.archive,
batch_size, eval_every, ...); the keys below are the ones it has no place for. Typed as a config key,
each gets its answer as the error (parse.py asks `original_hint`), and docs/coming-from-original.md
describes the same mapping in prose.
"""

from __future__ import annotations

ORIGINAL_NAMES: dict[str, str] = {
    "trainer": (
        "dpo_ds has one trainer, on DeepSpeed: FSDPTrainer's full sharding is --ds zero3; a model larger than "
        "one GPU (BasicTrainer's layers split across GPUs) runs under ZeRO-3, offload (--ds zero3_offload) or "
        "LoRA; tensor parallelism is not supported"
    ),
    "fsdp_port": "the rendezvous port is the launcher's: dpo-ds train --master-port N",
    "local_dirs": (
        "a run writes to run_dir (default runs/{exp_name}); the token cache and the datasets cache go to "
        "data.cache_dir"
    ),
    "debug": (
        "there is no debug switch: wandb is off unless wandb.enabled=true, and a short run is n_examples=N "
        "(checkpoint.save_optimizer=false saves weights only)"
    ),
    "activation_checkpointing": "write model.gradient_checkpointing=true",
    "minimum_log_interval_secs": "log lines come every log_every optimizer steps (log_every=N)",
    "model.tokenizer_name_or_path": "the tokenizer is read from model.name_or_path's directory",
    "model.block_name": "FSDP's wrapping unit: DeepSpeed ZeRO-3 shards every parameter and needs none",
    "model.fsdp_policy_mp": "the policy's mixed precision is model.policy_dtype (DeepSpeed's bf16 / fp16)",
}


def original_hint(key: str) -> str | None:
    """What the original DPO code's key means in dpo_ds, or None for a key it does not have."""
    hint = ORIGINAL_NAMES.get(key)
    return None if hint is None else f"'{key}' is the original DPO code's key; {hint}"
