"""The router's load-balancing loss of a Mixture-of-Experts model, computed by dpo_ds from the router logits.

transformers' MoE causal LMs (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss) return, when asked for router
logits, the Switch Transformer loss (Fedus et al. 2021, Eqs. 4-6) over every layer's routed tokens:

    aux = E * sum_e f_e * P_e
    f_e = (sum_t w_t * [e in top-k(t)]) / sum_t w_t      (summed over layers too: sum_e f_e = k)
    P_e = (sum_t w_t * softmax(logits_t)_e) / sum_t w_t

with the means taken over layers x tokens together and w_t the model's attention mask. The product of two
means is not additive over tokens, so dpo_ds keeps the three sums (F, P, W) of a micro-batch and forms the
product once: under sequence parallelism after summing them over the group. w_t is the number of sequences
token t belongs to (MicroBatch.token_weights): 1 on a padded or packed token, 0 on padding, and the number
of responses on a shared-prompt block's prompt, so that every layout weighs a pair's tokens as a padded
batch of whole sequences does (TRL's). The reference never needs it; dpo_ds's logits-free forward asks the
decoder for the router logits alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_ds.config import ConfigError
from dpo_ds.model.files import ModelError

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


# The architectures whose router dpo_ds reproduces: their router module returns the raw logits first (what
# transformers records as router_logits), routes each token to the top-k of their softmax, and their
# ForCausalLM's aux_loss is load_balancing_loss_func over them (tests/model/test_router_loss.py checks each
# against the model's own aux_loss). Another MoE (DeepSeek-V3's sigmoid routing without an auxiliary loss,
# Llama 4's, Jamba's, ...) trains without a router loss and without expert-load metrics, and says so.
ROUTERS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")


@dataclass(frozen=True)
class Routing:
    """What the load-balancing loss reads from a model config: its expert count and top-k."""

    experts: int
    top_k: int

    @classmethod
    def of(cls, config) -> Routing | None:
        """The routing of a transformers MoE config of ROUTERS, or None (a dense model, or a router dpo_ds
        does not reproduce)."""
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        top_k = getattr(config, "num_experts_per_tok", None)
        if getattr(config, "model_type", None) not in ROUTERS or not isinstance(experts, int) or experts < 2:
            return None
        if not isinstance(top_k, int) or top_k < 1:
            raise ModelError(
                f"{type(config).__name__}: {experts} experts but no num_experts_per_tok in its config"
            )
        return cls(experts, top_k)


def balance_sums(router_logits, weights: torch.Tensor, routing: Routing):
    """The three sums of the loss over one micro-batch (or one rank's piece of it):
    F (layers, experts) the weighted count of top-k assignments per layer (no gradient; also the expert load),
    P (experts,) the weighted sum over layers and tokens of the router's probabilities (with gradient),
    W () the sum of the weights over layers and tokens.
    router_logits: one (tokens, experts) tensor per MoE layer, tokens in the order of weights.reshape(-1)."""
    w = weights.reshape(-1).float()
    if not router_logits:
        raise ModelError("the model returned no router logits: it routes no token through experts")
    loads, probs = [], 0.0
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)  # (tokens, E)
        chosen = torch.topk(p, routing.top_k, dim=-1).indices  # (tokens, k)
        loads.append(
            w.new_zeros(routing.experts).scatter_add_(
                0, chosen.reshape(-1), w.repeat_interleave(routing.top_k)
            )
        )
        probs = probs + (p * w[:, None]).sum(dim=0)
    return torch.stack(loads), probs, w.sum() * len(router_logits)


def balance_loss(load: torch.Tensor, probs: torch.Tensor, total: torch.Tensor, routing: Routing):
    """E * sum_e f_e P_e from the sums of balance_sums (over a micro-batch, or summed over a group)."""
    total = total.clamp(min=1e-12)
    return routing.experts * torch.sum(load.sum(dim=0) / total * (probs / total))


def expert_shares(load: torch.Tensor) -> torch.Tensor:
    """(layers, experts) fraction of each layer's routed assignments that each expert receives."""
    return load / load.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def router_aux_coef(config, setting: float | None) -> float | None:
    """The coefficient of the router loss a run adds (loss.router_aux_coef, null: the model config's own
    router_aux_loss_coef), or None where the model has no router dpo_ds reproduces: a dense model, or an MoE
    outside ROUTERS. A coefficient such a model cannot honour is a ConfigError naming the key."""
    name = f"{type(config).__name__} ({getattr(config, 'model_type', '?')})"
    experts = expert_count(config)
    if not experts:
        if setting:
            raise ConfigError(
                f"config key 'loss.router_aux_coef': {name} is a dense model, with no router and no router loss, "
                f"got {setting!r}"
            )
        return None
    if Routing.of(config) is None:
        if setting:
            raise ConfigError(
                f"config key 'loss.router_aux_coef': {name} ({experts} experts) returns no load-balancing aux_loss "
                f"dpo_ds reproduces (it does for {', '.join(ROUTERS)}); set it to 0 or leave it unset, got {setting!r}"
            )
        return None
    return float(config.router_aux_loss_coef) if setting is None else float(setting)


def router_modules(lm) -> list[tuple[str, object]]:
    """(name, module) of each router of a transformers MoE model: the modules whose first output transformers
    records as router_logits (the model's own _can_record_outputs), so no name is guessed."""
    recorder = getattr(lm, "_can_record_outputs", None) or {}
    target = getattr(recorder.get("router_logits"), "target_class", None)
    if target is None:
        return []
    return [(name, m) for name, m in lm.named_modules() if isinstance(m, target)]


def freeze_routers(lm) -> int:
    """model.freeze_router: the routers' parameters get no gradient (before any engine or adapter). Returns
    how many parameters were frozen; 0 for a model without routers dpo_ds can name (checked at launch)."""
    frozen = 0
    for _, module in router_modules(lm):
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += 1
    return frozen


def check_router_keys(cfg, config, lm_meta=None) -> None:
    """model.freeze_router against the model: refused for a model without routers dpo_ds can name, and with
    LoRA adapters asked on a router's weight (they would train what the key says is fixed)."""
    if not cfg.model.freeze_router:
        return
    name = f"{type(config).__name__} ({getattr(config, 'model_type', '?')})"
    if not expert_count(config):
        raise ConfigError(
            f"config key 'model.freeze_router': {name} is a dense model, with no router, got True"
        )
    routers = router_modules(lm_meta) if lm_meta is not None else None
    if routers == []:
        raise ConfigError(
            f"config key 'model.freeze_router': transformers names no router module in {name}; dpo_ds cannot "
            "tell which weights to fix"
        )
    targets = list(cfg.model.lora.target_parameters) if cfg.model.lora.r else []
    router_params = {f"{n.split('.')[-1]}.{p}" for n, m in routers or [] for p, _ in m.named_parameters()}
    clash = [t for t in targets if any(t.endswith(r) or r.endswith(t) for r in router_params)]
    if clash:
        raise ConfigError(
            f"config key 'model.lora.target_parameters': {clash} are router weights, which model.freeze_router "
            "keeps fixed; drop one of the two"
        )
