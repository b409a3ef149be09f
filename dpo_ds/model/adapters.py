"""LoRA adapters through peft: the config, the modules they wrap, and adapter checkpoints on disk.

With model.lora.r > 0 the policy is the base model (frozen, never in the optimizer) with peft LoRA
adapters on every linear layer of the decoder but the lm_head (or model.lora.target_modules); only the
adapters train. The reference is that same model with its adapters switched off (reference.py,
model.reference_mode=adapters_off): no second copy of the weights. B starts at zero, so at step 0 the
adapters add nothing and the DPO loss is exactly ln 2.

Adapter dtype (model.lora.adapter_dtype). The default, `policy`, keeps the adapters in the policy's
dtype: under DeepSpeed mixed precision (model.policy_dtype=bfloat16) the optimizer holds an fp32 master
copy of every trainable parameter, so a bf16 adapter is still updated in fp32, and every module has one
dtype, so ZeRO-3 all-gathers never mix dtypes: DeepSpeed 0.19.2 broke exactly that case (fp32 adapters
on a bf16 base, DeepSpeed issue 8072), and the default cannot meet it on any version. `float32` makes
the adapters fp32 on a bf16 base, as peft does by default: the adapter's own matmuls then run in fp32
(peft casts its input), which matters for small ranks and long runs more than for the update itself.
Both train under ZeRO-3 on 2 ranks with DeepSpeed 0.19.8 (tests/test_lora_launcher.py).

A LoRA run's step dir holds the adapter in peft's own format (adapter_config.json and
adapter_model.safetensors: `PeftModel.from_pretrained(base, step_dir)` loads it) beside what resume
needs. Its base is the run's own starting point (start.py), recorded in its run_state.json, and
adapter_config.json names the model directory (base_model_name_or_path).

peft is imported inside functions: this module imports in milliseconds without it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"


class AdapterError(ValueError):
    """A LoRA setting or adapter archive that cannot be used; the message names the key or file."""


def full_numel(p) -> int:
    """A parameter's full size, also under ZeRO-3, where a partitioned parameter's numel() is 0."""
    return int(getattr(p, "ds_numel", p.numel()))


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


EXPERTS = "experts"  # model.lora.target_parameters=[experts]: every fused expert weight of the model


def _targets(settings, model=None) -> str | list[str]:
    """peft's target_modules. all-linear on a Mixture-of-Experts model is spelled out as the names of its
    linear layers: peft 0.21 turns the string into fused-expert and router parameters for some MoE
    architectures on its own, and dpo_ds lets model.lora.target_parameters alone decide those."""
    if list(settings.target_modules) != [ALL_LINEAR]:
        return list(settings.target_modules)
    if model is None or not _is_moe(model):
        return ALL_LINEAR
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_names(model)})


def _is_moe(model) -> bool:
    from dpo_ds.model.router import expert_count

    return bool(expert_count(model.config))


def _linear_names(model) -> list[str]:
    import torch

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def expert_parameters(model) -> list[str]:
    """The fused expert weights of a model, named as target_parameters takes them (`mlp.experts.gate_up_proj`):
    its 3-D parameters inside a module named experts, without the layer prefix."""
    names = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(getattr(p, "ds_shape", p.shape)) == 3 and EXPERTS in parts:  # ZeRO-3 partitions keep ds_shape
            tail = parts[parts.index("layers") + 2 :] if "layers" in parts else parts
            names.add(".".join(tail))
    return sorted(names)


def _parameter_targets(settings, model=None) -> list[str]:
    targets = list(getattr(settings, "target_parameters", []) or [])
    if EXPERTS in targets:
        if model is None:
            raise AdapterError("model.lora.target_parameters=[experts] is resolved against a model")
        targets = sorted({*(t for t in targets if t != EXPERTS), *expert_parameters(model)})
    return targets


def lora_config(settings, model=None):
    """peft's LoraConfig for model.lora.*: alpha defaults to 2 x r, no bias, no dropout by default; `model`
    (the one it will wrap, or its meta-device twin) resolves all-linear on an MoE and target_parameters."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise AdapterError(
            "model.lora.r > 0 needs peft: pip install 'dpo_ds[lora]' (or pip install peft)"
        ) from None
    parameters = _parameter_targets(settings, model)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha if settings.alpha is not None else 2 * settings.r,
        lora_dropout=settings.dropout,
        target_modules=_targets(settings, model),
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_targets(settings, model_dir: Path) -> list[str]:
    """The module names model.lora.target_modules wraps, from the model built on the meta device (no
    weights, no memory), or an AdapterError naming the key when a target matches nothing."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.files import load_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(model_dir))
    head = model.get_output_embeddings()
    linear = set(_linear_names(model))
    params = _check_parameter_targets(settings, model, model_dir)
    config = lora_config(settings, model)
    if list(settings.target_modules) == [ALL_LINEAR]:
        return sorted(linear) + params
    matched = {name for name, _ in model.named_modules() if check_target_module_exists(config, name)}
    for target in settings.target_modules:
        if not any(name == target or name.endswith(f".{target}") for name in matched):
            kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise AdapterError(
                f"config key 'model.lora.target_modules': {target!r} matches no module of {model_dir} "
                f"(its linear layers: {', '.join(kinds)}; or all-linear)"
            )
    if any(m is head for name, m in model.named_modules() if name in matched):
        raise AdapterError(
            "config key 'model.lora.target_modules': the lm_head cannot take an adapter (the log-prob "
            "paths compute from its weight directly); leave it out"
        )
    return sorted(matched) + params


def _check_parameter_targets(settings, model, model_dir) -> list[str]:
    """The parameters model.lora.target_parameters wraps, or an AdapterError naming the key when one matches
    nothing (or `experts` finds no fused expert weight: a dense model)."""
    asked = list(getattr(settings, "target_parameters", []) or [])
    if not asked:
        return []
    names = [n for n, _ in model.named_parameters()]
    experts = expert_parameters(model)
    if EXPERTS in asked and not experts:
        raise AdapterError(
            f"config key 'model.lora.target_parameters': {model_dir} has no fused expert weights for [experts] "
            "(not a Mixture-of-Experts model in transformers' fused form)"
        )
    found = []
    for target in _parameter_targets(settings, model):
        hits = [n for n in names if n == target or n.endswith(f".{target}")]
        if not hits:
            raise AdapterError(
                f"config key 'model.lora.target_parameters': {target!r} matches no parameter of {model_dir} "
                f"(its fused expert weights: {', '.join(experts) or 'none'})"
            )
        found += hits
    return sorted(found)


def wrap(lm, settings, seed: int, gradient_checkpointing: bool, base: Path):
    """The peft model around `lm`, adapters initialised from `seed` (the same on every rank: A random,
    B zero), in lm's dtype or fp32 (model.lora.adapter_dtype). The base's parameters are frozen by peft;
    adapter_config.json will name `base` (the model directory) as base_model_name_or_path."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    fp32 = settings.adapter_dtype == "float32"
    model = get_peft_model(lm, lora_config(settings, lm), autocast_adapter_dtype=fp32)
    model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    if gradient_checkpointing:
        # peft's trick for checkpointing with a frozen embedding: its output must require grad, or a
        # reentrant checkpoint would give the adapters inside no gradient (harmless when non-reentrant)
        model.enable_input_require_grads()
    return model


def is_lora(lm) -> bool:
    """Whether the HF model is a peft model (LoRA adapters)."""
    return hasattr(lm, "peft_config") and hasattr(lm, "disable_adapter")


def adapter_base(step_dir: Path) -> str | None:
    """The model directory an adapter archive's adapter_config.json names as its base."""
    import json

    try:
        return json.loads((Path(step_dir) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"{Path(step_dir) / ADAPTER_CONFIG} cannot be read ({type(e).__name__}: {e})"
        ) from None


REFERENCE_ADAPTER = "ref"  # TR-DPO under LoRA: the moved reference's own delta, frozen


def add_reference_adapter(model, rank: int, fp32: bool) -> None:
    """TR-DPO under LoRA (engine/reference_sync.mix_reference_adapter): a second, frozen adapter on the modules
    the policy's adapter wraps, of `rank` columns (scaling 1), all zero, so that the reference is the base plus
    it: the base itself until the first sync. The policy's adapter stays the active, trainable one."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    default = model.peft_config["default"]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=default.target_modules,
                        bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model.add_adapter(REFERENCE_ADAPTER, config, autocast_adapter_dtype=fp32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and REFERENCE_ADAPTER in module.lora_A:
                for layer in (module.lora_A[REFERENCE_ADAPTER], module.lora_B[REFERENCE_ADAPTER]):
                    layer.weight.zero_()
                    layer.requires_grad_(False)
    model.peft_config[REFERENCE_ADAPTER].inference_mode = True


@contextmanager
def reference_adapter_active(model):
    """The reference adapter in place of the policy's for the duration (each LoRA layer's active adapter
    swapped; no parameter's requires_grad is touched, as peft's set_adapter would)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [REFERENCE_ADAPTER]
    try:
        yield
    finally:
        for m, active in zip(layers, saved, strict=True):
            m._active_adapter = active
