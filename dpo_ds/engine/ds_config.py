"""The DeepSpeed JSON: the user's file made to agree with the dpo_ds config, and the reference engine's
own config derived from it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from dpo_ds.config import Config, ConfigError


def offloads_to_device(zero: dict, what: str) -> bool:
    """Whether a DeepSpeed JSON's zero_optimization names a device for offload_param / offload_optimizer."""
    return zero.get(what, {}).get("device", "none") != "none"


def _fill(
    ds: dict, key: str, want, source: str, path: str, where: dict | None = None, label: str | None = None
):
    """Set ds[key] to `want` when missing or "auto"; an explicit different value is an error."""
    where = ds if where is None else where
    have = where.get(key, "auto")
    if have == "auto":
        where[key] = want
    elif have != want:
        raise ConfigError(
            f"{path}: '{label or key}' is {have!r} but the dpo_ds config gives {want!r} ({source}); "
            f'set it to "auto" or make the two agree'
        )


def resolve_ds_config(path: str, cfg: Config, world: int, on_cpu: bool) -> dict:
    """Read the user's DeepSpeed JSON and make it agree with the dpo_ds config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds {path}: DeepSpeed config file not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds {path}: must hold a JSON object")

    gas = cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * gas):
        raise ConfigError(
            f"config key 'batch_size': {cfg.batch_size} must be divisible by world_size x "
            f"gradient_accumulation_steps = {world} x {gas}"
        )
    if cfg.eval_batch_size % world:
        raise ConfigError(
            f"config key 'eval_batch_size': {cfg.eval_batch_size} must be divisible by world_size {world}"
        )
    _fill(ds, "train_batch_size", cfg.batch_size, "batch_size", path)
    _fill(ds, "gradient_accumulation_steps", gas, "gradient_accumulation_steps", path)
    micro = cfg.batch_size // (world * gas)
    _fill(
        ds,
        "train_micro_batch_size_per_gpu",
        micro,
        "batch_size / (world_size x gradient_accumulation_steps)",
        path,
    )
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "max_grad_norm", path)

    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        block = ds.setdefault(section, {"enabled": "auto"})
        if not isinstance(block, dict):
            raise ConfigError(f'{path}: \'{section}\' must be an object like {{"enabled": "auto"}}')
        want = cfg.model.policy_dtype == dtype
        _fill(
            ds,
            "enabled",
            want,
            f"model.policy_dtype={cfg.model.policy_dtype}",
            path,
            block,
            f"{section}.enabled",
        )

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")

    if "scheduler" in ds:
        raise ConfigError(
            f"{path}: remove the 'scheduler' block; dpo_ds builds the linear warmup from warmup_steps={cfg.warmup_steps}"
        )
    opt = ds.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or "type" not in opt:
            raise ConfigError(f"{path}: 'optimizer' must be an object with a 'type'")
        if cfg.optimizer not in ("auto", opt["type"]):
            raise ConfigError(
                f"{path}: 'optimizer.type' is {opt['type']!r} but the config key 'optimizer' is {cfg.optimizer!r}; "
                f"remove the JSON's optimizer block to use {cfg.optimizer}, or make them agree"
            )
        params = opt.setdefault("params", {})
        _fill(ds, "lr", cfg.lr, "lr", path, params, "optimizer.params.lr")
        if on_cpu and opt["type"].lower() in ("adam", "adamw"):
            # DeepSpeed's fused/CPU Adam would be JIT-compiled here (minutes); torch's Adam is fine on CPU.
            params.setdefault("torch_adam", True)
    elif cfg.optimizer in ("auto", "AdamW", "Adam"):
        ds["optimizer"] = {
            "type": "AdamW" if cfg.optimizer == "auto" else cfg.optimizer,
            "params": {"lr": cfg.lr, **({"torch_adam": True} if on_cpu else {})},
        }
    elif offloads_to_device(zero, "offload_optimizer"):
        # A torch RMSprop on offloaded states is slow but correct; DeepSpeed refuses it unless told.
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)  # dpo_ds logs itself
    if (
        cfg.model.reference_sync_steps
    ):  # TR-DPO updates the reference's shards from the policy's matching ones
        for key, off in (("zero_hpz_partition_size", 1), ("mics_shard_size", -1)):
            if (zero.get(key) or off) > max(off, 0):  # hpZ's secondary groups, MiCS's shard groups
                raise ConfigError(
                    f"{path}: zero_optimization.{key}={zero[key]} partitions the policy's parameters otherwise than "
                    "the reference's, which model.reference_sync_steps (TR-DPO) updates shard by shard; remove it"
                )
    return ds


def reference_zero_stage(policy_stage: int, configured: int | None) -> int:
    """The reference engine's ZeRO stage: model.reference_zero_stage, or by default the policy's placement
    (3 when the policy is ZeRO-3, else 0: a frozen model has nothing else for ZeRO to partition). The one
    owner of that default: the planner asks it too."""
    if configured is not None:
        return configured
    return 3 if policy_stage == 3 else 0


def reference_ds_config(policy_ds: dict, cfg: Config) -> dict:
    """Inference-only config for the frozen reference: same batch fields (DeepSpeed checks them),
    its own precision, no optimizer. Its placement is its own: ZeRO-3 (parameters sharded over the
    ranks, optionally on CPU) or stage 0 (a whole copy per rank, no gathers), by
    model.reference_zero_stage; by default it follows the policy (3 when the policy is ZeRO-3)."""
    ref = {
        k: copy.deepcopy(policy_ds[k])
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    }
    ref["bf16"] = {"enabled": cfg.model.reference_dtype == "bfloat16"}
    ref["fp16"] = {"enabled": cfg.model.reference_dtype == "float16"}
    ref["steps_per_print"] = 10**9
    policy_stage = policy_ds.get("zero_optimization", {}).get("stage", 0)
    stage = reference_zero_stage(policy_stage, cfg.model.reference_zero_stage)
    if stage == 3:
        src = policy_ds.get("zero_optimization", {})
        zero = {"stage": 3}
        for k in (
            "stage3_param_persistence_threshold",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
        ):
            if k in src:
                zero[k] = src[k]
        if cfg.model.reference_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        ref["zero_optimization"] = zero
    else:
        if cfg.model.reference_offload:
            raise ConfigError(
                "config key 'model.reference_offload': needs a ZeRO-3 reference (a ZeRO-3 policy config, or "
                "model.reference_zero_stage=3)"
            )
        ref["zero_optimization"] = {"stage": 0}
    return ref
