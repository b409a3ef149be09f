"""Memory of a DPO run per rank, from the model's config.json and the run's config alone (no weights).

Every term is a formula of its own, with its derivation beside it, and a test (tests/test_plan.py);
dpo_ds/plan/planner.py prints them as a table, and train.py logs their total at launch. Bytes per rank; N is the
model's parameter count, R the ranks a ZeRO stage shards over, p the bytes of one value in the policy's
dtype (4 fp32, 2 bf16/fp16).

Model states (DeepSpeed ZeRO, AdamW):
    weights     N p, / R under ZeRO-3 (partitioned parameters)
    gradients   T p (T the trainable parameters: N, or LoRA's adapters), / R from ZeRO-2 (partitioned)
    master      T x 4: DeepSpeed's ZeRO optimizers keep an fp32 copy of the trainable partition, in fp32
                runs too (the flat fp32 groups the optimizer steps), / R from ZeRO-1
    Adam        T x 8 (exp_avg, exp_avg_sq in fp32), / R from ZeRO-1
    so a full fp32 policy under ZeRO-3 is 20 bytes a parameter over R, bf16 mixed precision 16 over R.
Reference: engine: N x its dtype's bytes, / R when it is ZeRO-3 (its own placement), 0 on the device when
    offloaded (model.reference_offload=true: its weights in CPU memory; the policy JSON's offload_param is
    not copied to the reference, engine/ds_config.py), plus what its forward holds while the policy's
    activations are alive: its own ZeRO-3 prefetch bucket and its logits under no_grad (M V x 4, fp32;
    fused_linear: one chunk); precomputed: 8 bytes (chosen, rejected fp32) per example, on the CPU; LoRA
    adapters off / reference-free: nothing.
Activations of one micro-batch, per token, for a Llama-shaped decoder layer (hidden H, query width Q = heads
    x head dim (H in a Llama), KV width K = KV heads x head dim, MLP width I), what autograd keeps for the
    backward:
        attention block: the norm's input and output (2H), q, k, v (Q + 2K), the attention output (Q), the
                         o_proj output added to the residual (H), the rotary q/k copies (Q + K)
        MLP block: the norm's input and output (2H), gate, up, silu(gate), their product (4I), down (H)
    ~ 7H + 3Q + 3K + 4I values a token a layer (10H + 3K + 4I when Q = H; 58M Llama, H 512, K 512, I 1376:
    11.6k values, 45.5 KiB in fp32; measured by bench/memory.py at module level: 45.6 KiB), x p bytes. With
    gradient checkpointing a layer keeps its input (H) and one layer is recomputed at a time, its activations
    and their gradients alive together: L H p + 2 (7H + 3Q + 3K + 4I) p. Attention itself keeps O(tokens)
    (SDPA's flash/efficient kernels, FlexAttention and dpo_ds_blocks never build a (T x T) matrix; a dense
    shared-prompt mask does).
    Plus the embedding output and the final norm (3H p).
Logits of the scored tokens M (every response token; a bound: prompts are often half the tokens), V vocab:
    naive      M V (2p + 3): the logits, their gradient, and log-softmax's fp32 work (measured 2.73x the fp32
               logits' size on CPU)
    chunked    M V (p + 3): the logits kept for the backward, chunks of fp32 work (measured 1.77x)
    triton     M V (p + 1): the logits and their gradient written in place, no fp32 copy
    fused_linear  no logits: one (chunk, V) fp32 buffer, chunk = FUSED_CHUNK_ROWS
Communication buffers (the DeepSpeed JSON's sizes, in elements of p bytes): ZeRO-3 prefetches
    stage3_prefetch_bucket_size and reduces in reduce_bucket_size buckets; ZeRO-1/2 reduce gradients through
    one reduce_bucket_size bucket allocated whole (the updated partitions are gathered into the parameters
    themselves; on CPU the bucket's pages are not resident and it counts nothing there).
Offload (a GPU's; on CPU ranks offloaded memory is the same process's, so nothing moves): offload_param
    (ZeRO-3) keeps the policy's weights in CPU memory, offload_optimizer the fp32 master copy and Adam's
    moments and, under ZeRO-3, the gradient partitions too (DeepSpeed's stage 3 allocates its flat gradient
    partition buffer on the optimizer's device); on the device remain the gathered layers (the buffers) and
    the step's activations. offloaded() names what moved; estimate() counts it off the device and out of
    the allocator reserve.
The save's peak (rank 0, policy.pt streamed): the largest tensor gathered in fp32, twice (the gathered
    copy and the collective's temporary one); gathered on the device under offload as well (DeepSpeed
    gathers an offloaded parameter into device memory). A LoRA run never writes policy.pt (its every save,
    the final one too, goes through run/save.py's save_adapter; export is a process of its own, after
    training): each adapter tensor is gathered in turn (ZeRO-3) in the adapters' dtype
    (model.lora.adapter_dtype) and rank 0 copies it (a clone, then to the CPU): on the device the largest
    adapter tensor, twice under ZeRO-3 (gathered and the clone), once below; on CPU ranks rank 0 also keeps
    every adapter tensor's copy until safetensors writes them (from their memory, no serialized copy).
    DeepSpeed's checkpoint of the LoRA engine gathers nothing (engine/io.py save_checkpoint,
    exclude_frozen_parameters): each rank torch.saves its own partition of the adapters' fp32 master copy
    and Adam moments and the adapters' module state, tensors the other terms count already, copied to the
    host one storage at a time as they are written.
Mixture-of-Experts (plan/experts.py says what each model type builds; estimates, checked against the tensors
    autograd saves on tiny models, not against a GPU run): model states count every expert (total parameters);
    a sparse layer's MLP keeps k (2H + 4I) values a token (k = num_experts_per_tok experts of width I: active,
    not all E), plus the router's fp32 probabilities, E x 4 bytes a token a sparse layer (the "router" term);
    ZeRO-3 gathers one layer's experts module whole (E x 3 I H values), however small its prefetch bucket, and
    a full run's backward makes that module's gradient whole before reducing it; and since autograd saves
    views of the gathered fused weights, every sparse layer's stay alive until its backward (the "gathered
    experts kept" term, pinned_experts_bytes; measured by bench/memory.py --moe). dpo_ds has no expert
    parallelism: every rank holds every expert of a layer while it is gathered. A LoRA adapter on a fused
    parameter (peft's target_parameters, or a name peft converts) materialises W + B A, the parameter's size in
    the policy's dtype, on every forward, and autograd keeps it for the backward: one per sparse layer (one
    layer under checkpointing), plus its gradient, as large, in the backward (the "LoRA expert weights" term).
LoRA adds r values a token a layer per wrapped projection (A(x), kept for B's backward). An attention that
    materializes its scores (eager; FlexAttention on CPU) keeps heads x block^2 a block a layer; sequence
    parallelism holds one layer's q, k, v and output in both layouts during Ulysses' all-to-all.
On CPU a process also holds its libraries, interpreter and fixed buffers (torch, DeepSpeed, transformers,
datasets): the planner measures its own imports (a launch: the rank's resident set before any model) and adds
CPU_RUNTIME_EXTRA_GIB; without a measurement, CPU_PROCESS_GIB (the whole run of a 0.07M-parameter model). On
a GPU the device holds the CUDA context and the allocator's reserve besides torch's allocations: both assumed
(CUDA_CONTEXT_GIB, ALLOCATOR_RESERVE_FRACTION) and named as such in the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dpo_ds.config import REFERENCE_MODES
from dpo_ds.engine.ds_config import offloads_to_device
from dpo_ds.model import moe
from dpo_ds.plan import experts as experts_of
from dpo_ds.plan.experts import Experts

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# a CPU rank's resident set whatever the model: libraries, interpreter, the data phase, DeepSpeed's and
# torch's fixed buffers once engines exist and step (bench/memory.py row 11: the whole run of a
# 0.07M-parameter model peaks at 0.556 GiB a rank)
CPU_PROCESS_GIB = 0.54
# the planner on CPU measures what a rank holds before any model instead (its imports, at launch also the
# data), and adds what a rank adds besides the modelled terms while it trains: gloo, DeepSpeed's engines and
# their fixed buffers, the step's Python heap: measured here as that 0.556 GiB whole run less the 0.42 GiB a
# rank holds when the launch plans
CPU_RUNTIME_EXTRA_GIB = 0.12
# and while rank 0 saves and evaluates on CPU: torch.save's pickling buffers, DeepSpeed's checkpoint writer,
# the eval's generation (the shipped demo's whole run peaks 0.10 GiB above its training steps)
CPU_SAVE_EVAL_GIB = 0.10
# on a GPU, beside what torch allocates (max_memory_allocated): the CUDA context of the process (driver,
# cuBLAS/NCCL workspaces: ~0.5 GiB on recent cards, CUDA 12) and the caching allocator's reserve beyond its
# allocations (fragmentation between block sizes), taken as 10% of them. Assumed, not measured here (no GPU);
# stated as such in the plan; bench/gpu_check.sh compares the allocated part with max_memory_allocated
CUDA_CONTEXT = "CUDA context (not allocated by torch)"
CUDA_CONTEXT_GIB = 0.5
ALLOCATOR_RESERVE = "allocator reserve (10% of allocations)"
ALLOCATOR_RESERVE_FRACTION = 0.10
GPU_OVERHEAD_TERMS = (CUDA_CONTEXT, ALLOCATOR_RESERVE)
SYNC_PEAK = "reference sync peak"  # TR-DPO's update between steps (sync_peak_bytes)
FUSED_CHUNK_ROWS = 1024  # logprobs.reference.default_chunk_rows at these vocabularies (a bound)
# an MoE model's terms (module docstring, Mixture-of-Experts): step-time, like the activations
ROUTER = "router (MoE, fp32)"
LORA_WEIGHTS = "LoRA expert weights (W + BA)"
PINNED_EXPERTS = "gathered experts kept (MoE, ZeRO-3)"
LORA_TARGETS_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama-shaped decoder from its config.json: what every formula reads; an MoE one's sparse layers in
    `experts` (plan/experts.py)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the dense MLP's width (an MoE model's dense layers; 0 when it has none)
    tied: bool
    qkv_bias: bool = False  # Qwen2's q, k, v projections carry biases
    experts: Experts | None = None
    # a layer's attention parameters besides q, k, v, o and q/k/v biases (plan/experts.py)
    attn_extra: int = 0

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        c = config.get("text_config", config)
        heads = c["num_attention_heads"]
        fields = dict(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"],
            tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
            qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        )
        if n := moe.expert_count(config):  # its experts counted, or a ValueError naming what is not
            fields.update(experts_of.shape_fields(c, n))
        return cls(**fields)

    @classmethod
    def from_dir(cls, model_dir: Path) -> Shape:
        try:
            return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
        except ValueError as e:  # the model named, for the planner's error and the launch's note
            raise ValueError(f"{model_dir}: {e}") from None

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def sparse_layers(self) -> int:
        return self.experts.layers if self.experts else 0

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear projection of one dense layer, by its name in a Llama."""
        h, q, k, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def layer_linears(self) -> list[tuple[str, int, int, int]]:
        """(name, in, out, layers) of every Linear of the decoder by its leaf name (what peft's target_modules
        match): attention on every layer, the dense MLP on the dense layers, an MoE model's shared expert and
        its gate on the sparse ones."""
        dense, sparse = self.layers - self.sparse_layers, self.sparse_layers
        out = [(n, a, b, self.layers if n in experts_of.ATTENTION else dense)
               for n, (a, b) in self.linear_shapes().items()]  # fmt: skip
        s = self.experts.shared if self.experts else 0
        if s:
            h = self.hidden
            out += [("gate_proj", h, s, sparse), ("up_proj", h, s, sparse), ("down_proj", s, h, sparse),
                    ("shared_expert_gate", h, 1, sparse)]  # fmt: skip
        return [row for row in out if row[3]]

    def _params(self, sparse_layer: int) -> int:
        attention = sum(a * b for n, (a, b) in self.linear_shapes().items() if n in experts_of.ATTENTION)
        attention += (self.q_width + 2 * self.kv_width if self.qkv_bias else 0) + self.attn_extra
        dense = (self.layers - self.sparse_layers) * 3 * self.hidden * self.intermediate
        head = 0 if self.tied else self.vocab * self.hidden
        norms = 2 * self.hidden * self.layers + self.hidden
        layers = self.layers * attention + dense + self.sparse_layers * sparse_layer
        return self.vocab * self.hidden + layers + norms + head

    @property
    def params(self) -> int:
        """Embeddings V H, per layer its attention projections (and q/k/v biases where the model has them, and
        plan/experts.py's extras) and two norms (2H), the dense layers' MLPs (3 H I), the sparse layers' routers,
        experts and shared experts, the final norm, the lm_head (V H unless tied to the embeddings)."""
        return self._params(self.experts.layer_params(self.hidden) if self.experts else 0)

    @property
    def active_params(self) -> int:
        """The parameters one token goes through: params with k experts a sparse layer instead of all E."""
        return self._params(self.experts.active_layer_params(self.hidden) if self.experts else 0)

    @property
    def gathered(self) -> int:
        """Values ZeRO-3 gathers whole beyond its prefetch bucket: one layer's experts module (0 for a dense
        model, whose buckets the formulas keep as before)."""
        return self.experts.gathered(self.hidden) if self.experts else 0

    @property
    def largest_tensor(self) -> int:
        sizes = [a * b for n, a, b, _ in self.layer_linears()]
        sizes += list(self.experts.fused(self.hidden).values()) if self.experts else []
        return max(self.vocab * self.hidden, *sizes)


@dataclass(frozen=True)
class Adapter:
    """One wrapped Linear's or parameter's LoRA tensors, A (a) and B (b), on `layers` layers; `wraps`: the
    values of a wrapped parameter, materialised as W + B A on every forward (plan/experts.py; 0 for a Linear)."""

    a: tuple[int, int]
    b: tuple[int, int]
    layers: int
    wraps: int = 0


def lora_adapters(shape: Shape, r: int, targets, parameters=()) -> list[Adapter]:
    """What peft makes for model.lora.{r, target_modules, target_parameters}: a Linear (in, out) takes A (r, in)
    and B (out, r); a fused parameter of E experts, rank rho (r, or 2r where peft fuses two named halves),
    A (rho E, in) and B (out, rho E); the router (E, H) A (r, H) and B (E, r) (plan/experts.py)."""
    if shape.experts is None:
        if parameters:
            raise ValueError(
                f"config key 'model.lora.target_parameters': {list(parameters)}: a dense model has no fused "
                "expert parameters; name its Linear layers in model.lora.target_modules"
            )
        names = lora_target_names(targets)
        return [
            Adapter((r, a), (b, r), shape.layers) for n, (a, b) in shape.linear_shapes().items() if n in names
        ]
    ex, h = shape.experts, shape.hidden
    linears = shape.layer_linears()
    modules, params = experts_of.peft_targets(ex, tuple(n for n, *_ in linears), targets, parameters)
    out = [Adapter((r, a), (b, r), layers) for n, a, b, layers in linears if n in modules]
    fan = {"gate_up_proj": (h, 2 * ex.width), "down_proj": (ex.width, h)}  # (in, out) as the layer computes
    for name, times in params.items():
        if name == "router":
            out.append(Adapter((r, h), (ex.count, r), ex.layers, ex.count * h))
            continue
        rank, (fan_in, fan_out) = r * times * ex.count, fan[name]
        out.append(Adapter((rank, fan_in), (fan_out, rank), ex.layers, ex.count * fan_in * fan_out))
    return out


def lora_params(shape: Shape, r: int, targets, parameters=()) -> int:
    """The adapters' values: A and B of every wrapped Linear and parameter (lora_adapters), on every layer."""
    return sum(
        t.layers * (t.a[0] * t.a[1] + t.b[0] * t.b[1]) for t in lora_adapters(shape, r, targets, parameters)
    )


def lora_largest_tensor(shape: Shape, r: int, targets, parameters=()) -> int:
    """The largest adapter tensor, in values: r x max(in, out) of the widest wrapped projection (A is
    r x in, B out x r); on a fused parameter rho E x max(in, out)."""
    adapters = lora_adapters(shape, r, targets, parameters)
    return max((max(t.a[0] * t.a[1], t.b[0] * t.b[1]) for t in adapters), default=0)


def lora_target_names(targets) -> tuple[str, ...]:
    """model.lora.target_modules as projection names: `all-linear` is every linear layer of the decoder."""
    return LORA_TARGETS_ALL if list(targets) == ["all-linear"] else tuple(targets)


def model_states(n: int, trainable: int, stage: int, p: int, ranks: int) -> dict[str, float]:
    """Weights, gradients, fp32 master copy and Adam states per rank (module docstring), in bytes."""
    return {
        "weights": n * p / (ranks if stage == 3 else 1),
        "gradients": trainable * p / (ranks if stage >= 2 else 1),
        "optimizer": trainable * (4 + 8) / (ranks if stage >= 1 else 1),
    }


def holds_engine(mode: str) -> bool:
    """Whether a reference of this mode (config.REFERENCE_MODES; "none": no reference) keeps a model resident
    beside the policy while it trains."""
    return mode != "none" and REFERENCE_MODES.get(mode).holds_engine


def reference_bytes(
    mode: str, n: int, p: int, stage: int, ranks: int, offload: bool, zero: dict, scored: int, vocab: int, impl: str,
    gathered: int = 0,
) -> float:  # fmt: skip
    """On the device, per rank: an engine's weights (N p, / R under ZeRO-3, 0 offloaded: offload needs a
    ZeRO-3 reference, the launch refuses it at stage 0, counted there as a whole copy), its prefetch
    bucket (ZeRO-3; an MoE layer's experts module, `gathered` values, when that is larger) and its no-grad
    logits; the other modes nothing there (a precomputed table, 8 bytes an example, lives on the CPU)."""
    if not holds_engine(mode):
        return 0.0
    weights = 0.0 if offload and stage == 3 else n * p / (ranks if stage == 3 else 1)
    bucket = min(float(zero.get("stage3_prefetch_bucket_size", 5e7)), n)
    prefetch = max(bucket, gathered) * p if stage == 3 else 0.0
    logits = min(scored, FUSED_CHUNK_ROWS) * vocab * 4.0 if impl == "fused_linear" else scored * vocab * 4.0
    return weights + prefetch + logits


def per_token_layer(shape: Shape, sparse: bool = False) -> int:
    """Values autograd keeps a token a layer: 7H + 3Q + 3K + 4I (module docstring); in a sparse layer the
    experts' k (2H + 4I) (and a shared expert's, plan/experts.py) instead of the dense MLP's 4I."""
    attention = 7 * shape.hidden + 3 * shape.q_width + 3 * shape.kv_width
    return attention + (shape.experts.per_token(shape.hidden) if sparse else 4 * shape.intermediate)


def activation_bytes(shape: Shape, tokens: int, p: int, checkpointing: bool) -> float:
    """One micro-batch's activations on a rank holding `tokens` tokens of it."""
    edges = 3 * shape.hidden * tokens * p  # embedding output, final norm in and out
    kinds = [(shape.layers - shape.sparse_layers, per_token_layer(shape)),
             (shape.sparse_layers, per_token_layer(shape, sparse=True) if shape.experts else 0)]  # fmt: skip
    if checkpointing:  # the widest layer recomputed
        return tokens * p * (shape.layers * shape.hidden + 2 * max(v for n, v in kinds if n)) + edges
    return tokens * p * sum(n * v for n, v in kinds) + edges


def router_bytes(shape: Shape, tokens: int, checkpointing: bool) -> float:
    """An MoE model's router probabilities, softmax over E experts in fp32 (its output, kept for the
    backward): E x 4 bytes a token a sparse layer; one layer's (and its gradient) under checkpointing. A bound
    for gpt-oss, whose softmax spans its top-k only."""
    if shape.experts is None:
        return 0.0
    return tokens * shape.experts.count * 4.0 * (2 if checkpointing else shape.sparse_layers)


def lora_activation_bytes(shape: Shape, tokens: int, p: int, r: int, targets, checkpointing: bool,
                          parameters=()) -> float:  # fmt: skip
    """LoRA's own activations: each wrapped projection keeps A(x), r values a token, for B's backward (x is
    the base projection's saved input, shared; dropout 0). Under checkpointing one layer's worth. A wrapped
    parameter keeps no per-token value (lora_weight_bytes)."""
    if not r:
        return 0.0
    linear = [t for t in lora_adapters(shape, r, targets, parameters) if not t.wraps]
    if checkpointing:
        return tokens * p * 2 * sum(t.a[0] for t in linear)
    return tokens * p * sum(t.a[0] * t.layers for t in linear)


def lora_weight_bytes(shape: Shape, p: int, r: int, targets, checkpointing: bool, parameters=()) -> float:
    """Adapters on parameters (module docstring): W + B A of every wrapped parameter, kept by autograd in each
    sparse layer (one layer under checkpointing), plus the largest one's gradient in the backward; p bytes."""
    if not r:
        return 0.0
    wrapped = [t for t in lora_adapters(shape, r, targets, parameters) if t.wraps]
    if not wrapped:
        return 0.0
    kept = sum(t.wraps * (1 if checkpointing else t.layers) for t in wrapped)
    return (kept + max(t.wraps for t in wrapped)) * float(p)


def pinned_experts_bytes(shape: Shape, p: int, stage: int, checkpointing: bool, r: int, targets,
                         parameters=()) -> float:  # fmt: skip
    """ZeRO-3 frees a module's gathered parameters after its forward by swapping each one's data for an empty
    tensor; but the experts compute from views of their fused weights (grouped_mm: a transpose; eager: one
    expert's slice), autograd saves the views for the input's gradient, and a view keeps the gathered storage
    alive: every sparse layer's fused weights until its backward, all of them as the backward begins (policy
    dtype, p bytes). Not counted: under checkpointing (one layer's, recomputed: the gathered module the
    buffers count), below ZeRO-3 (the weights are resident whole: the weights term), a weight LoRA wraps
    (computed as W + B A, its own term), weights saved as the parameter itself (Experts.pins_views)."""
    ex = shape.experts
    if ex is None or stage != 3 or checkpointing or not ex.pins_views:
        return 0.0
    linears = tuple(n for n, *_ in shape.layer_linears())
    wrapped = experts_of.peft_targets(ex, linears, targets, parameters)[1] if r else {}
    kept = sum(v for name, v in ex.fused(shape.hidden).items() if name not in wrapped)
    return float(kept * ex.layers * p)


def attention_score_bytes(shape: Shape, tokens: int, block: int, p: int, attention: str, on_cpu: bool,
                          checkpointing: bool) -> float:  # fmt: skip
    """An attention that materializes its scores (eager; FlexAttention on CPU, torch's eager path there)
    keeps the softmax's output, heads x block x block a block, for its backward: tokens / block blocks of
    `block` tokens. SDPA's fused kernels and dpo_ds_blocks keep none (O(tokens))."""
    if not (attention == "eager" or (attention == "flex_attention" and on_cpu)):
        return 0.0
    per_layer = shape.heads * tokens * block * p
    return per_layer * (2 if checkpointing else shape.layers)


def all_to_all_bytes(shape: Shape, tokens: int, p: int, sequence_parallel: int) -> float:
    """Ulysses (sequence parallelism): one layer's q, k, v and attention output in both layouts at once while
    they are exchanged (head-sharded and sequence-sharded): 2 x (2H + 2K) values a token of this rank."""
    if sequence_parallel <= 1:
        return 0.0
    return 2 * (2 * shape.hidden + 2 * shape.kv_width) * tokens * p


def logits_bytes(impl: str, scored: int, vocab: int, p: int) -> float:
    if impl == "fused_linear":
        return min(scored, FUSED_CHUNK_ROWS) * vocab * 4.0
    per = {"naive": 2 * p + 3, "chunked": p + 3, "triton": p + 1}[impl]
    return float(scored) * vocab * per


def buffer_bytes(zero: dict, stage: int, n: int, p: int, on_cpu: bool = False, gathered: int = 0,
                 gradient: int = 0) -> float:  # fmt: skip
    """The JSON's bucket sizes in elements (DeepSpeed's defaults where unset). ZeRO-3's fill as parameters
    and gradients pass, so at most the model's size; a module larger than its bucket is gathered whole
    (`gathered`: an MoE layer's experts module) and its gradient made whole before it is reduced (`gradient`:
    the same module in a full run, 0 under LoRA). ZeRO-1/2 allocate their reduce bucket whole at start
    (device memory on a GPU); on CPU its pages are not resident (bench/memory.py row 5 measures none of
    it), so there it counts nothing."""

    def size(key, default, cap=True):
        v = zero.get(key, default)
        v = float(v) if v != "auto" else default
        return (min(v, n) if cap else v) * p

    if stage == 3:
        return max(size("stage3_prefetch_bucket_size", 5e7), gathered * p) + max(
            size("reduce_bucket_size", 5e8), gradient * p
        )
    if stage in (1, 2):
        return 0.0 if on_cpu else size("reduce_bucket_size", 5e8, cap=False)
    return 0.0


@dataclass
class Run:
    """What a run is, in the terms the formulas need (plan.describe builds it from a config)."""

    shape: Shape
    ranks: int  # every rank of the job
    stage: int
    policy_bytes: int
    reference_mode: str  # engine | precomputed | adapters_off | none
    reference_bytes: int
    reference_stage: int
    reference_offload: bool
    lora_r: int
    lora_targets: tuple
    tokens_per_micro: int  # tokens of one micro-batch on one rank before sequence parallelism
    scored_per_micro: int
    checkpointing: bool
    logprob_impl: str
    sequence_parallel: int
    zero: dict = field(default_factory=dict)
    on_cpu: bool = False
    # the attention implementation the run resolves to (data.layout.attn_implementation)
    attention: str = "sdpa"
    block_tokens: int = 0  # the tokens one attention block spans (a padded row, a packed segment); 0: unknown
    # on CPU: what a rank holds besides the run, measured (planner.process_now_gib); None: CPU_PROCESS_GIB
    process_gib: float | None = None
    assumed: str = ""  # what the plan took for the run (dtypes, attention, micro-batch), said in its header
    notes: tuple = ()  # warnings about the config the plan read (a batch that does not divide, ...)
    # what the planner's changes read (plan.planner.FIXES): whether model.reference_zero_stage pins the
    # reference's stage, and the micro-batch's making: examples a data-parallel rank runs at once,
    # gradient_accumulation_steps, data.max_tokens_per_micro_batch (0: none), max_length
    reference_stage_pinned: bool = False
    micro_examples: int = 1
    accumulation: int = 1
    token_budget: int = 0
    max_length: int = 0
    adapter_bytes: int = 0  # model.lora.adapter_dtype's bytes a value; 0: the policy's (its default)
    reference_sync: bool = False  # TR-DPO on a reference engine; reference_adapter_rank: under LoRA, 0: none
    reference_adapter_rank: int = 0
    lora_parameters: tuple = ()  # model.lora.target_parameters: fused parameters peft wraps (plan/experts.py)

    def offloads(self, what: str) -> bool:
        """Whether the JSON's offload_param / offload_optimizer moves memory off this run's device: a GPU's
        (on CPU ranks it is the same process's memory); offload_param only under ZeRO-3."""
        if self.on_cpu or (what == "offload_param" and self.stage != 3):
            return False
        return offloads_to_device(self.zero, what)


def save_peak_bytes(run: Run) -> float:
    """What rank 0 adds while it saves a step dir (module docstring): a full policy's largest tensor in
    fp32, twice; a LoRA policy's largest adapter tensor in the adapters' dtype, gathered (ZeRO-3) and
    copied, and on CPU ranks every adapter tensor's copy besides."""
    if not run.lora_r:
        return 2 * run.shape.largest_tensor * 4.0
    a = run.adapter_bytes or run.policy_bytes
    largest = lora_largest_tensor(run.shape, run.lora_r, run.lora_targets, run.lora_parameters) * a
    gathered = largest if run.stage == 3 else 0.0  # below ZeRO-3 the adapters are whole: only the clone
    if run.on_cpu:  # the clones are kept (the whole adapter) and the gathered one is in the same memory
        return lora_params(run.shape, run.lora_r, run.lora_targets, run.lora_parameters) * a + gathered
    return gathered + largest


def sync_peak_bytes(run: Run) -> float:
    """What a rank adds while TR-DPO moves the reference (engine/reference_sync.py), between steps: the largest
    tensor's update in three fp32 buffers (a shard under a ZeRO-3 reference), and its policy copy gathered whole
    for a ZeRO-0 reference under a ZeRO-3 policy."""
    t, gather = run.shape.largest_tensor, run.stage == 3 and run.reference_stage != 3
    shards = run.ranks if run.reference_stage == 3 else 1
    return (3 * 4.0 * t / shards + (t * run.policy_bytes if gather else 0.0)) if run.reference_sync else 0.0


def policy_states(run: Run) -> dict[str, float]:
    """The policy's weights, gradients and optimizer state per rank, wherever they live, in bytes."""
    n = run.shape.params
    trainable = lora_params(run.shape, run.lora_r, run.lora_targets, run.lora_parameters) if run.lora_r else n
    states = model_states(n, trainable, run.stage, run.policy_bytes, run.ranks)
    if run.lora_r:  # the adapters' own weights beside the frozen base, and TR-DPO's frozen reference adapter
        adapter = trainable + lora_params(run.shape, run.reference_adapter_rank, run.lora_targets)
        states["weights"] += adapter * run.policy_bytes / (run.ranks if run.stage == 3 else 1)
    return states


def offloaded(run: Run) -> dict[str, float]:
    """What this run keeps in CPU memory instead of on its GPU, per rank, in bytes, by term (module
    docstring, Offload): nothing on CPU ranks."""
    states, out = policy_states(run), {}
    if run.offloads("offload_param"):
        out["weights"] = states["weights"]
    if run.offloads("offload_optimizer"):
        out["optimizer"] = states["optimizer"]
        if run.stage == 3:
            out["gradients"] = states["gradients"]
    if reference_offloaded(run):
        out["reference"] = run.shape.params * run.reference_bytes / run.ranks
    return out


def reference_offloaded(run: Run) -> bool:
    """model.reference_offload=true on a GPU run with a ZeRO-3 reference engine (what the launch builds)."""
    engine = holds_engine(run.reference_mode) and run.reference_stage == 3
    return run.reference_offload and engine and not run.on_cpu


def estimate(run: Run) -> dict[str, float]:
    """Every term for one rank, in bytes, and their total; on CPU the process constants too. On a GPU the
    device's: what offload moves to CPU memory (offloaded()) counts nothing here."""
    s = run.shape
    n = s.params
    moved = offloaded(run)
    states = {k: 0.0 if k in moved else v for k, v in policy_states(run).items()}
    tokens = -(-run.tokens_per_micro // run.sequence_parallel)
    scored = -(-run.scored_per_micro // run.sequence_parallel)
    terms = {
        **states,
        "reference": reference_bytes(
            run.reference_mode,
            n,
            run.reference_bytes,
            run.reference_stage,
            run.ranks,
            "reference" in moved,
            run.zero,
            scored,
            s.vocab,
            run.logprob_impl,
            s.gathered,
        ),  # fmt: skip
        "activations": activation_bytes(s, tokens, run.policy_bytes, run.checkpointing)
        + lora_activation_bytes(s, tokens, run.policy_bytes, run.lora_r, run.lora_targets, run.checkpointing,
                                run.lora_parameters),
        ROUTER: router_bytes(s, tokens, run.checkpointing),
        LORA_WEIGHTS: lora_weight_bytes(s, run.policy_bytes, run.lora_r, run.lora_targets, run.checkpointing,
                                        run.lora_parameters),
        PINNED_EXPERTS: pinned_experts_bytes(s, run.policy_bytes, run.stage, run.checkpointing, run.lora_r,
                                             run.lora_targets, run.lora_parameters),
        "attention scores": attention_score_bytes(s, tokens, run.block_tokens or tokens, run.policy_bytes,
                                                  run.attention, run.on_cpu, run.checkpointing),
        "sequence-parallel all-to-all": all_to_all_bytes(s, tokens, run.policy_bytes, run.sequence_parallel),
        "logits": logits_bytes(run.logprob_impl, scored, s.vocab, run.policy_bytes),
        "buffers": buffer_bytes(run.zero, run.stage, n, run.policy_bytes, run.on_cpu, s.gathered,
                                0 if run.lora_r else s.gathered),
    }  # fmt: skip
    if run.on_cpu:
        terms["libraries (CPU)"] = (run.process_gib or CPU_PROCESS_GIB) * GIB
    else:
        model = sum(terms.values())
        terms[CUDA_CONTEXT] = CUDA_CONTEXT_GIB * GIB
        terms[ALLOCATOR_RESERVE] = ALLOCATOR_RESERVE_FRACTION * model
    terms["total"] = sum(terms.values())
    terms["save peak (rank 0)"] = save_peak_bytes(run) + (CPU_SAVE_EVAL_GIB * GIB if run.on_cpu else 0.0)
    terms[SYNC_PEAK] = sync_peak_bytes(run)
    return terms
