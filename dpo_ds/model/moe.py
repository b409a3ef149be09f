"""Mixture-of-Experts models: how dpo_ds recognises one, and what it says at launch about what it does not
do for them yet, so that nothing about an MoE run is silent.

transformers builds MoE causal LMs (Qwen3-MoE, Mixtral, OLMoE, gpt-oss, ...) with a router and one
fused experts module per layer, whose weights are 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); the config names the expert count and the router's load-balancing coefficient
(`router_aux_loss_coef`). dpo_ds trains such a model like a dense one: the router's auxiliary loss is not
added; LoRA adapters reach the experts only when peft wraps them (its `all-linear` does for Qwen3-MoE's
fused experts in peft 0.21; a list of module names may leave them out), and the launch says when none do.
"""

from __future__ import annotations

from .adapters import full_numel

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def expert_count(config) -> int:
    """The number of experts a model config declares (0 for a dense model): a transformers config, or
    config.json read as a dict (its text_config for a multimodal one)."""
    if isinstance(config, dict):
        config = config.get("text_config", config)
    for key in EXPERT_COUNT_KEYS:
        n = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return 0


def _is_expert(name: str) -> bool:
    return "experts" in name.split(".")


def expert_share(lm) -> tuple[int, int, int]:
    """(expert base parameters, all base parameters, adapter parameters on experts) of a model, peft's or not."""
    experts = total = adapted = 0
    for name, p in lm.named_parameters():
        if "lora_" in name:
            adapted += full_numel(p) if _is_expert(name) else 0
            continue
        total += full_numel(p)
        experts += full_numel(p) if _is_expert(name) else 0
    return experts, total, adapted


def launch_notes(lm, lora: bool) -> list[str]:
    """What dpo_ds does not do for this MoE model (a transformers model, peft's or not), one warning each;
    [] for a dense model."""
    config = lm.config
    n = expert_count(config)
    if not n:
        return []
    coef = getattr(config, "router_aux_loss_coef", None)
    notes = [
        f"{type(config).__name__}: a Mixture-of-Experts model ({n} experts); its router's load-balancing loss"
        f"{f' (router_aux_loss_coef={coef} in its config)' if coef is not None else ''} is not added to the "
        f"objective: dpo_ds does not compute it yet, so routing trains on the DPO loss alone"
    ]
    experts, total, adapted = expert_share(lm)
    if lora and experts and not adapted:
        notes.append(
            f"LoRA: no adapter reaches the experts, {experts / 1e6:.2f}M of the {total / 1e6:.2f}M base "
            f"parameters: model.lora.target_modules names none of them; only the layers it names train"
        )
    return notes
