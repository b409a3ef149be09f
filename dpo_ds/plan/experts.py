"""Mixture-of-Experts decoders for the memory planner: what transformers 5.24 builds from a config.json
(models/{qwen3_moe,qwen2_moe,mixtral,olmoe,gpt_oss}/modeling_*.py), and what peft 0.21 wraps in it.

A sparse layer's MLP is a router and one experts module holding every expert in fused 3-D parameters
(E experts, hidden H, one expert's width I):

    router        weight (E, H); gpt-oss also a bias (E)
    gate_up_proj  (E, 2I, H); gpt-oss (E, H, 2I) and a bias (E, 2I)      -- E 2I H values either way
    down_proj     (E, H, I);  gpt-oss (E, I, H) and a bias (E, H)        -- E I H values
    shared expert Qwen2-MoE: an MLP of width S beside the experts (3 H S) and its sigmoid gate (H)

A token goes through k = num_experts_per_tok experts: 3 I H of their weights (plus 2I + H of biases) a
token, the router and any shared expert (active parameters). Which layers are sparse: every one (Mixtral,
OLMoE, gpt-oss), or Qwen's rule (layer l is dense when l is in mlp_only_layers or (l + 1) %
decoder_sparse_step != 0; a dense layer has an MLP of intermediate_size). Attention besides q, k, v, o and
their biases: Qwen3-MoE's q/k norms (2 head_dim), OLMoE's (H + H/heads x KV heads), gpt-oss's sinks (a
logit per head) and, with attention_bias, every model's o_proj bias (Qwen2-MoE: q, k, v biases only).

LoRA, as dpo_ds asks peft 0.21.2 for it (model/adapters.py lora_config) with transformers 5.24: a Linear takes
A (r, in) and B (out, r); a parameter in model.lora.target_parameters (`experts`: every fused expert weight)
takes peft's ParamWrapper, whose A is (rho E, in) and B (out, rho E) for a 3-D one of E experts (in, out as
the layer computes: gate_up H -> 2I, down I -> H) and (r, H), (E, r) for the 2-D router. `all-linear` on an
MoE model dpo_ds spells out as its Linear names (attention; dense layers' and Qwen2-MoE's shared expert's
MLP), so the experts take adapters through target_parameters; but peft converts transformers-v4 names in a
list for some model types (PEFT_V4_NAMES): gate/up/down_proj (Mixtral: w1/w3/w2) and gate become the fused
parameters and the router, gate_up_proj at rank 2r when both its halves are named, and those names then
wrap no Linear (a Qwen3-MoE with dense layers: their MLPs get no adapter, its experts do). Qwen2-MoE and
gpt-oss are not converted. A wrapped parameter is materialised whole on every forward (W + B A, peft's
_LoraFactorsProxy: one baddbmm) and autograd keeps it for the backward: the LoRA-weights term.

Refused by name: any other MoE model type, and DeepSeek's multi-head latent attention (kv_lora_rank), whose
projections the planner does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")
# peft 0.21 utils/transformers_weight_conversion.py: _MOE_TARGET_MODULE_MAPPING, by the pattern its
# _MODEL_TO_CONVERSION_PATTERN gives these model types (qwen2_moe and gpt_oss have none)
PEFT_V4_NAMES = {
    "qwen": {
        "gate": "router",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
    "mixtral": {"gate": "router", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
}
PEFT_PATTERN = {"qwen3_moe": "qwen", "olmoe": "qwen", "mixtral": "mixtral"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Experts:
    """The sparse layers of a decoder (module docstring)."""

    count: int  # E
    top_k: int  # k experts a token
    width: int  # I: one expert's MLP width
    layers: int  # sparse layers; the others have a dense MLP of Shape.intermediate
    shared: int = 0  # Qwen2-MoE's shared expert width S
    bias: bool = False  # gpt-oss: router and experts' biases
    model_type: str = ""
    # whether autograd saves views of the fused weights (estimate.py pinned_experts_bytes): transformers 5.24's
    # grouped_mm (its default) transposes an (E, out, in) weight, eager slices one expert; gpt-oss's (E, in,
    # out) weights go to grouped_mm as they are, and batched_mm gathers copies (saved as activations)
    pins_views: bool = True

    def fused(self, hidden: int) -> dict[str, int]:
        """Values of one layer's fused expert weights, by parameter name."""
        e, i, h = self.count, self.width, hidden
        return {"gate_up_proj": e * 2 * i * h, "down_proj": e * i * h}

    def gathered(self, hidden: int) -> int:
        """One layer's experts module, weights and biases: what ZeRO-3 gathers whole when it computes."""
        return sum(self.fused(hidden).values()) + (self.count * (2 * self.width + hidden) if self.bias else 0)

    def router(self, hidden: int) -> int:
        return self.count * hidden + (self.count if self.bias else 0)

    def shared_params(self, hidden: int) -> int:
        return 3 * hidden * self.shared + hidden if self.shared else 0  # the MLP and its (1, H) gate

    def layer_params(self, hidden: int) -> int:
        """A sparse layer's MLP: router + every expert + shared expert."""
        return self.router(hidden) + self.gathered(hidden) + self.shared_params(hidden)

    def active_layer_params(self, hidden: int) -> int:
        """What one token uses of a sparse layer's MLP: router + k experts + shared expert."""
        one = 3 * self.width * hidden + (2 * self.width + hidden if self.bias else 0)
        return self.router(hidden) + self.top_k * one + self.shared_params(hidden)

    def per_token(self, hidden: int) -> int:
        """Values autograd keeps a token in a sparse layer's MLP, in the policy's dtype: per expert slot (k a
        token) its gathered input and its output (2H), gate and up (2I), silu(gate) and the product (2I); a
        shared expert as a dense MLP (4S) with its output and gated output (2H). The router's fp32
        probabilities are a term of their own (router_bytes)."""
        shared = 4 * self.shared + 2 * hidden if self.shared else 0
        return self.top_k * (2 * hidden + 4 * self.width) + shared


def sparse_layers(c: dict, layers: int) -> int:
    """Qwen's rule (Qwen2/3MoeDecoderLayer): layer l is sparse unless l is in mlp_only_layers or
    (l + 1) % decoder_sparse_step != 0."""
    dense, step = set(c.get("mlp_only_layers") or []), c.get("decoder_sparse_step") or 1
    return sum(1 for layer in range(layers) if layer not in dense and (layer + 1) % step == 0)


def shape_fields(c: dict, experts: int) -> dict:
    """The Shape fields an MoE config.json sets (c: its text config): experts, the dense MLP's width,
    q/k/v biases and the attention's other parameters a layer; a ValueError naming what it cannot count."""
    kind = c.get("model_type", "")
    if c.get("kv_lora_rank") or kind.startswith("deepseek"):
        raise ValueError(
            f"a Mixture-of-Experts model ({experts} experts, model_type {kind!r}) with multi-head latent "
            f"attention (kv_lora_rank={c.get('kv_lora_rank')}): the planner does not count its attention; it counts "
            f"{', '.join(SUPPORTED)}"
        )
    if kind not in SUPPORTED:
        raise ValueError(
            f"a Mixture-of-Experts model ({experts} experts, model_type {kind!r}): the planner counts the experts of "
            f"{', '.join(SUPPORTED)} only, as transformers builds them; this layout it has not checked"
        )
    h, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // heads
    qwen = kind in ("qwen3_moe", "qwen2_moe")
    impl = c.get("experts_implementation") or "grouped_mm"  # transformers' default where it has grouped_mm
    bias = bool(c.get("attention_bias", kind == "gpt_oss"))  # gpt-oss's default: True
    o_bias = h if bias and kind != "qwen2_moe" else 0
    extra = {
        "qwen3_moe": 2 * head_dim,  # q_norm, k_norm over a head
        "olmoe": h + h // heads * c.get("num_key_value_heads", heads),  # q_norm over H, k_norm over KV
        "gpt_oss": heads,  # sinks
    }.get(kind, 0)
    return {
        "experts": Experts(
            count=experts,
            top_k=c["num_experts_per_tok"],
            width=c["moe_intermediate_size"] if qwen else c["intermediate_size"],
            layers=sparse_layers(c, layers) if qwen else layers,
            shared=c.get("shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0,
            bias=kind == "gpt_oss",
            model_type=kind,
            pins_views=impl == "eager" or (impl != "batched_mm" and kind != "gpt_oss"),
        ),
        "intermediate": c["intermediate_size"] if qwen else 0,
        "qkv_bias": bool(c.get("qkv_bias", True)) if kind == "qwen2_moe" else bias,
        "attn_extra": extra + o_bias,
    }


def _parameters(name: str, kind: str) -> tuple[str, ...]:
    """A model.lora.target_parameters entry as the planner's names for it (`experts`: both fused weights,
    model/adapters.py expert_parameters); a ValueError for one it cannot count."""
    if name == "experts":
        return ("gate_up_proj", "down_proj")
    if name.endswith("gate_up_proj") or name.endswith("experts.down_proj") or name == "down_proj":
        return ("gate_up_proj" if name.endswith("gate_up_proj") else "down_proj",)
    if name.endswith("router.weight" if kind == "gpt_oss" else "gate.weight"):
        return ("router",)
    raise ValueError(
        f"config key 'model.lora.target_parameters': {name!r}: the planner counts adapters on the experts' fused "
        f"weights (mlp.experts.gate_up_proj, mlp.experts.down_proj) and the router's weight "
        f"({'mlp.router.weight' if kind == 'gpt_oss' else 'mlp.gate.weight'}) only"
    )


def peft_targets(
    ex: Experts, linears: tuple[str, ...], targets, parameters
) -> tuple[set[str], dict[str, int]]:
    """What peft wraps (module docstring): (the Linear names, {fused parameter or "router": rank / r}).
    `linears`: the Linear names the model has; `targets`: model.lora.target_modules (all-linear: `linears`, as
    dpo_ds passes it); `parameters`: model.lora.target_parameters."""
    v4 = PEFT_V4_NAMES.get(PEFT_PATTERN.get(ex.model_type, ""), {})
    names = set(linears) if list(targets) == ["all-linear"] else set(targets)
    converted = {n for n in names if n in v4}
    params = {v4[n]: 1 for n in converted}
    for name in parameters:
        for each in _parameters(name, ex.model_type):
            params.setdefault(each, 1)
    halves = [n for n, p in v4.items() if p == "gate_up_proj"]
    named = [n for n in halves if n in names]
    if 0 < len(named) < len(halves):  # peft refuses it (_convert_peft_config_moe)
        raise ValueError(
            f"config key 'model.lora.target_modules': {named[0]} without {set(halves) - set(named)}: peft "
            f"fuses both into the experts' gate_up_proj and refuses one without the other"
        )
    if halves and len(named) == len(halves):
        params["gate_up_proj"] = 2  # peft's rank_pattern: r x 2, one rank per half
    return names - converted, params
