"""Mixture-of-Experts models: how dpo_ds recognises one, and what it says at launch about what it does not
do for it, so that nothing about an MoE run is silent.

transformers builds MoE causal LMs (Qwen3-MoE, Mixtral, OLMoE, gpt-oss, ...) with a router and one
fused experts module per layer, whose weights are 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); the config names the expert count and the router's load-balancing coefficient
(`router_aux_loss_coef`). dpo_ds adds that loss for the routers it reproduces (router.py) and watches the
expert load at eval (training/experts.py); LoRA adapters reach the experts only when peft wraps them, and
the launch says when none do.
"""

from __future__ import annotations

from .adapters import full_numel
from .router import EXPERT_COUNT_KEYS, ROUTERS, expert_count  # noqa: F401 (expert_count: the planner's)

# MoE blocks that run each expert as its own module (an nn.ModuleList of experts) and skip the experts no
# token picked: transformers 4.x's blocks of these architectures, and remote-code DeepSeek models. Under
# ZeRO-3 each expert's weights are gathered when it runs, so ranks whose tokens pick different experts wait
# on different gathers and hang; DeepSpeed's leaf-module setting (deepspeed.utils.set_z3_leaf_modules: the
# engine layer applies it) gathers a whole block at its entry instead, on every rank alike. transformers
# 5.x's fused experts (3-D parameters in one module) are gathered whole and need nothing.
PER_EXPERT_BLOCKS = [
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV2MoE",
    "DeepseekV3MoE",
]


def per_expert_blocks(lm) -> tuple[list[type], list[str]]:
    """(classes of PER_EXPERT_BLOCKS this model has, names of other per-expert MoE block classes): a block
    is per-expert when its `experts` is an nn.ModuleList."""
    import torch

    known, unknown = {}, set()
    for module in lm.modules():
        if isinstance(getattr(module, "experts", None), torch.nn.ModuleList):
            name = type(module).__name__
            if name in PER_EXPERT_BLOCKS:
                known[name] = type(module)
            else:
                unknown.add(name)
    return list(known.values()), sorted(unknown)


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
    notes = []
    if getattr(config, "model_type", None) not in ROUTERS:
        notes.append(
            f"{type(config).__name__}: a Mixture-of-Experts model ({n} experts) whose router dpo_ds does not "
            f"reproduce (it does for {', '.join(ROUTERS)}): no router load-balancing loss is added and no expert "
            f"load is reported; routing trains on the DPO loss alone"
        )
    _, unknown = per_expert_blocks(lm)
    if unknown:
        notes.append(
            f"{', '.join(unknown)}: an MoE block that runs each expert as its own module and is not in dpo_ds's "
            f"table of them (model/moe.py PER_EXPERT_BLOCKS): under ZeRO-3, ranks whose tokens pick different "
            f"experts wait on different gathers: NCCL hangs (the watchdog names the step), gloo aborts on the "
            f"mismatched collective; use ZeRO-2, or add "
            f"the class to the table"
        )
    experts, total, adapted = expert_share(lm)
    if lora and experts and not adapted:
        notes.append(
            f"LoRA: no adapter reaches the experts, {experts / 1e6:.2f}M of the {total / 1e6:.2f}M base "
            f"parameters: model.lora.target_modules names none of them; only the layers it names train"
        )
    return notes
