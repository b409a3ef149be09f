"""One typed config: dataclass defaults <- optional YAML file <- key=value overrides.

The key names follow the original DPO code (eric-mitchell/direct-preference-optimization):
`loss=dpo loss.beta=0.1 model.archive=... batch_size=64 ...`. Unknown keys, values of the wrong
type and impossible values are errors that name the key; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key."""


SFT_NORMALIZE = ("sequence", "token")
IPO_NORMALIZE = ("sum", "length")
TRUNCATION_MODES = ("auto", "keep_start", "keep_end", "original")
ADD_BOS = ("auto", "true", "false")
DTYPES = ("float32", "bfloat16", "float16")
LOGPROB_IMPLS = ("naive", "chunked", "triton", "fused_linear")
REFERENCE_MODES = ("auto", "engine", "precomputed", "adapters_off")
LAYOUTS = ("padded", "packed", "shared_prompt")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "dpo_ds_blocks")
OPTIMIZERS = ("auto", "AdamW", "Adam", "RMSprop")
MODEL_INITS = ("auto", "random")
GATHER_MODES = ("auto", "true", "false")


@dataclass
class LossConfig:
    # one of objectives.OBJECTIVES (`loss=ipo` on the command line sets this), or a weighted sum written as
    # a list, `loss=[dpo,sft]` (YAML `loss: [dpo, sft]`), stored as "dpo+sft" (which parses too)
    name: str = "dpo"
    weights: list[float] = field(default_factory=list)  # one per summed loss; empty: all 1
    beta: float = 0.1  # KL temperature of Eq. 7; for IPO it is tau; SimPO's reward scale
    label_smoothing: float = 0.0  # cDPO / robust: assumed probability that a label is flipped
    reference_free: bool = False  # implicit reference that is uniform over responses
    chosen_nll_weight: float = 0.0  # RPO: + weight * NLL(chosen) per token (Pang et al. 2024)
    gamma: float = 0.5  # SimPO's target reward margin (Eq. 6; TRL's simpo_gamma default)
    orpo_lambda: float = 0.1  # ORPO's lambda: weight of its odds-ratio term (Eq. 6; TRL's default too)
    # IPO: "sum" forms h from summed log-probs (the paper); "length" from per-token means (TRL's DPOTrainer)
    ipo_normalize: str = "sum"
    # SFT: "sequence" sums each sequence's NLL and averages over sequences (the original code);
    # "token" averages over every trained-on token of the global batch (TRL's SFTTrainer, HF Trainer)
    sft_normalize: str = "sequence"

    @property
    def names(self) -> list[str]:
        """The losses summed: ["dpo"] for loss=dpo, ["dpo", "sft"] for loss=[dpo,sft]."""
        return self.name.split("+")


@dataclass
class LoraSettings:
    # LoRA adapters through peft (adapters.py): 0 trains every parameter; > 0 trains rank-r adapters only
    r: int = 0
    alpha: float | None = None  # LoRA's alpha (scaling alpha / r); null: 2 x r
    dropout: float = 0.0  # DPO compares log-probs: dropout off, as in both models
    # the modules wrapped: every linear layer of the decoder but the lm_head ("all-linear"), or names
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # policy: the adapters in model.policy_dtype (one dtype per module; DeepSpeed's optimizer keeps the
    # fp32 master copy); float32: fp32 adapters on a bf16/fp16 base (adapters.py says when it helps)
    adapter_dtype: str = "policy"


@dataclass
class ModelConfig:
    name_or_path: str = "demo"  # local HF causal-LM directory; "demo" / "tiny" are shipped configs
    # auto: the directory's weights (an error when it has none), model.archive's, or for the shipped
    # demo / tiny configs a seeded init; random: a seeded random init, asked for
    init: str = "auto"
    archive: str | None = None  # an SFT run's LATEST/policy.pt, loaded into policy and reference
    policy_dtype: str = "float32"  # float32 | bfloat16 | float16 (DeepSpeed mixed precision)
    reference_dtype: str = "float32"
    reference_offload: bool = False  # ZeRO-3 reference parameters live on CPU
    # auto: adapters_off with LoRA, else engine. engine: a frozen inference engine beside the policy;
    # precomputed: its log-probs computed once before training (no reference while the policy trains);
    # adapters_off (LoRA): the policy's own base, its adapters switched off, no second copy
    reference_mode: str = "auto"
    reference_zero_stage: int | None = None  # 0 | 3; null: 3 when the policy is ZeRO-3, else 0
    logprob_impl: str = "chunked"  # naive | chunked | triton | fused_linear
    # auto: for packed/shared_prompt rows flex_attention on a GPU (block-sparse mask) and dpo_ds_blocks
    # on CPU (attention per segment, no mask; attention.py); transformers' default (sdpa) otherwise
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    # padded: one sequence per row; packed: several sequences per row, no padding between them;
    # shared_prompt: each pair one block [prompt | chosen | rejected], the prompt computed once
    layout: str = "padded"
    packing: bool = False  # deprecated alias of layout=packed
    max_tokens_per_micro_batch: int = 0  # token budget of a packed micro-batch (0 = no budget)
    row_tokens: int = 0  # length of a packed row; 0: max_length (packed), 2 x max_length (shared_prompt)
    # the token cache (data/cache.py; shared by every run pointing here) and `datasets`' own cache;
    # null: the token cache in the run dir
    cache_dir: str | None = None
    num_proc: int = 1  # tokenizing processes per rank (fork); more only help with spare cores
    # auto: each source's end (hh keep_end, shp/se keep_start); keep_start | keep_end for all;
    # original: the original code's rules token for token (no BOS, responses to max_length - max_prompt_length)
    truncation_mode: str = "auto"
    add_bos: str = "auto"  # auto: what tokenizer(text) adds in front (Llama <s>, GPT-2 nothing); true | false
    chat_template: str | None = None  # a Jinja file for conversational rows; default: the tokenizer's own


@dataclass
class ParallelConfig:
    # ranks that share one sequence (DeepSpeed Ulysses): each holds 1/N of every row's tokens, attention
    # runs on the whole sequence with 1/N of the heads; data parallelism runs over world / N. 1: off
    sequence_parallel_size: int = 1
    # ALST's TiledMLP (DeepSpeed): every decoder layer's MLP runs over tiles of this many tokens and is
    # recomputed tile by tile in backward, so its (tokens x intermediate) activations never exist whole;
    # one more MLP forward per step. 0: off; ALST tiles by hidden_size. For long rows
    # (bench/long_context.py --tiled-mlp measures it)
    tiled_mlp_tokens: int = 0


@dataclass
class CheckpointConfig:
    save_optimizer: bool = True  # false: policy.pt only (weights), no DeepSpeed checkpoint to resume from
    save_every: int = 0  # also save every N optimizer steps (0: only at evals and the end)
    keep_last: int = 0  # keep the N newest step dirs (never LATEST's); 0 keeps all
    max_failed_saves: int = 3  # a failed save is logged and training goes on, until N fail in a row


@dataclass
class GuardConfig:
    # a step whose loss or gradient norm is not finite on any rank is skipped (DeepSpeed discards it)
    # and counted; this many in a row stop the run
    max_bad_steps: int = 5
    # likelihood displacement (guards.py): off when null; else the per-token drop of the chosen
    # responses below the reference, with reward accuracy above 0.5, that makes the run warn or stop
    max_chosen_drop_per_token: float | None = None
    action: str = "warn"  # warn | stop (saves a checkpoint, exits 0)


@dataclass
class EvalConfig:
    checker: str | None = None  # module:function scoring (prompt, generation, row) -> [0, 1] at each eval
    n_checked: int = 64  # held-out prompts generated from and checked at each eval
    # under ZeRO-3: gather the whole model for each generation (auto: when a full copy fits), or keep
    # DeepSpeed's per-module gathers (false); generation.py
    gather_for_generation: str = "auto"


@dataclass
class ResumeConfig:
    # keys that may differ from the checkpoint's config on resume (logged); the others must match
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dpo_ds"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled


@dataclass
class Config:
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    datasets: list[str] = field(default_factory=lambda: ["demo"])
    batch_size: int = 4  # global: preference pairs (or SFT examples) per optimizer step
    eval_batch_size: int = 16  # global
    gradient_accumulation_steps: int = 1
    optimizer: str = "auto"  # auto = the DeepSpeed JSON's optimizer, AdamW if it has none
    lr: float = 5e-7
    warmup_steps: int = 150
    max_grad_norm: float = 10.0
    max_length: int = 512
    max_prompt_length: int = 256
    n_epochs: int | None = 1
    n_examples: int | None = None
    n_eval_examples: int = 256
    eval_every: int = 20000  # in training examples, as in the original
    do_first_eval: bool = True
    sample_during_eval: bool = False
    n_eval_model_samples: int = 16
    max_new_tokens: int = 128
    seed: int = 0
    exp_name: str = "run"
    run_dir: str | None = None  # default runs/{exp_name}
    resume_from: str | None = None  # auto (this run_dir's LATEST, if any), or a step-N / LATEST directory
    dist_timeout_s: float = 1800.0  # deadline of every collective (the process group's: 60 s more)
    # deadline of a training step; null: 10x the slowest of the first steps, at least 60 s
    step_timeout_s: float | None = None
    torch_threads: int = 0  # per rank; 0 = 1 per rank on CPU, torch's default on GPU
    log_every: int = 10  # optimizer steps between log lines


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Turn a YAML/CLI value into `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            loaded = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = loaded
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list like [a,b], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f == f and f.is_integer():
                return int(f)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _set(obj, dotted: str, value, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    full = prefix + head
    if head not in names:
        raise ConfigError(f"unknown config key '{full}'; known keys here: {', '.join(names)}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, prefix=full + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                _set(current, str(k), v, prefix=full + ".")
        elif head == "loss":
            current.name = _loss_name("loss", value)  # `loss=dpo` as in the original's hydra groups
        else:
            raise ConfigError(f"config key '{full}' is a group; set its fields as {full}.<field>=value")
        return
    if rest:
        raise ConfigError(f"unknown config key '{prefix + dotted}': '{full}' has no sub-keys")
    if isinstance(obj, LossConfig) and head == "name":
        value = _loss_name(full, value)
    setattr(obj, head, _coerce(full, value, hints[head]))


def _loss_name(key: str, value) -> str:
    """`dpo`, or a sum of losses written as a list, `[dpo,sft]` (CLI) / `[dpo, sft]` (YAML): 'dpo+sft'."""
    if isinstance(value, list) or (isinstance(value, str) and value.strip().startswith("[")):
        try:
            value = "+".join(name.strip() for name in _coerce(key, value, list[str]))
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}': expected a list like [dpo,sft], got {value!r}") from None
    return _coerce(key, value, str)


def validate(cfg: Config) -> None:
    """Impossible values are errors naming the key. Checks needing the world size live in engines."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}, got {_get(cfg, key)!r}")

    # which losses exist and which hyperparameters each defines: objectives.build_objective (each loss
    # spec checks its own); here only what any loss config must satisfy
    names = cfg.loss.names
    need(len(set(names)) == len(names), "loss.name", "names a loss twice")
    if cfg.loss.weights:
        need(
            len(cfg.loss.weights) == len(names) and names != ["sft"],
            "loss.weights",
            f"must give one weight per loss in loss={cfg.loss.name} ({len(names)}); loss=sft takes none",
        )
    need(all(w >= 0 for w in cfg.loss.weights), "loss.weights", "must be >= 0")
    if "sft" in names and len(names) > 1:
        need(
            cfg.loss.chosen_nll_weight == 0,
            "loss.chosen_nll_weight",
            f"is the sft term of loss={cfg.loss.name} already; give its weight in loss.weights only",
        )
    need(cfg.loss.beta > 0, "loss.beta", "must be > 0")
    need(cfg.loss.gamma >= 0, "loss.gamma", "must be >= 0")
    need(cfg.loss.orpo_lambda >= 0, "loss.orpo_lambda", "must be >= 0")
    need(cfg.loss.ipo_normalize in IPO_NORMALIZE, "loss.ipo_normalize", f"must be one of {IPO_NORMALIZE}")
    if cfg.loss.ipo_normalize != "sum":
        need("ipo" in names, "loss.ipo_normalize", "applies to loss=ipo only")
    need(0.0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
    need(cfg.loss.chosen_nll_weight >= 0, "loss.chosen_nll_weight", "must be >= 0")
    need(cfg.loss.sft_normalize in SFT_NORMALIZE, "loss.sft_normalize", f"must be one of {SFT_NORMALIZE}")
    if cfg.loss.sft_normalize != "sequence":
        need(cfg.loss.name == "sft", "loss.sft_normalize", "applies to loss=sft only")
    need(
        cfg.data.truncation_mode in TRUNCATION_MODES,
        "data.truncation_mode",
        f"must be one of {TRUNCATION_MODES}",
    )
    cfg.data.add_bos = str(cfg.data.add_bos).lower()
    need(cfg.data.add_bos in ADD_BOS, "data.add_bos", f"must be one of {ADD_BOS}")
    if cfg.data.truncation_mode == "original":
        need(
            cfg.data.add_bos != "true",
            "data.add_bos",
            "cannot be true with data.truncation_mode=original (the original code adds no BOS)",
        )
    if cfg.data.chat_template is not None:
        need(
            Path(cfg.data.chat_template).is_file(),
            "data.chat_template",
            "must name a Jinja template file that exists",
        )
    need(cfg.model.policy_dtype in DTYPES, "model.policy_dtype", f"must be one of {DTYPES}")
    need(cfg.model.reference_dtype in DTYPES, "model.reference_dtype", f"must be one of {DTYPES}")
    need(cfg.model.logprob_impl in LOGPROB_IMPLS, "model.logprob_impl", f"must be one of {LOGPROB_IMPLS}")
    need(
        cfg.model.reference_mode in REFERENCE_MODES,
        "model.reference_mode",
        f"must be one of {REFERENCE_MODES}",
    )
    need(cfg.model.reference_zero_stage in (None, 0, 3), "model.reference_zero_stage", "must be 0, 3 or null")
    lora = cfg.model.lora
    need(lora.r >= 0, "model.lora.r", "must be >= 0 (0: no LoRA, every parameter trained)")
    need(lora.alpha is None or lora.alpha > 0, "model.lora.alpha", "must be > 0 or null (2 x r)")
    need(0.0 <= lora.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
    need(
        bool(lora.target_modules),
        "model.lora.target_modules",
        "must name at least one module (or all-linear)",
    )
    need(lora.adapter_dtype in ("policy", "float32"), "model.lora.adapter_dtype", "must be policy or float32")
    if cfg.model.reference_mode == "auto":
        cfg.model.reference_mode = "adapters_off" if lora.r else "engine"
    if cfg.model.reference_mode == "adapters_off":
        need(lora.r > 0, "model.reference_mode", "is adapters_off, which needs LoRA (model.lora.r > 0)")
    if lora.r:
        need(
            cfg.model.reference_mode != "engine",
            "model.reference_mode",
            "is engine, a second copy of the base model beside a LoRA policy whose own base, adapters off, is "
            "that reference; use adapters_off (the default with LoRA) or precomputed",
        )
    need(bool(cfg.model.name_or_path), "model.name_or_path", "must name a model directory")
    need(cfg.model.init in MODEL_INITS, "model.init", f"must be one of {MODEL_INITS}")
    if cfg.model.init == "random":
        need(
            cfg.model.archive is None,
            "model.init",
            "is random, but model.archive gives the weights; pick one",
        )
    need(len(cfg.datasets) > 0, "datasets", "must list at least one dataset")
    need(cfg.batch_size > 0, "batch_size", "must be > 0")
    need(cfg.eval_batch_size > 0, "eval_batch_size", "must be > 0")
    need(cfg.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
    need(
        cfg.batch_size % cfg.gradient_accumulation_steps == 0,
        "batch_size",
        f"must be divisible by gradient_accumulation_steps={cfg.gradient_accumulation_steps}",
    )
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(cfg.max_length > 1, "max_length", "must be > 1")
    need(cfg.max_prompt_length > 0, "max_prompt_length", "must be > 0")
    need(
        cfg.max_prompt_length < cfg.max_length,
        "max_prompt_length",
        f"must be < max_length={cfg.max_length} so responses keep at least one token",
    )
    need(cfg.n_epochs is None or cfg.n_epochs > 0, "n_epochs", "must be > 0 or null")
    need(cfg.n_examples is None or cfg.n_examples > 0, "n_examples", "must be > 0 or null")
    need(
        cfg.n_epochs is not None or cfg.n_examples is not None,
        "n_epochs",
        "and n_examples cannot both be null",
    )
    need(cfg.n_eval_examples >= 0, "n_eval_examples", "must be >= 0")
    need(cfg.eval_every > 0, "eval_every", "must be > 0")
    need(cfg.n_eval_model_samples >= 0, "n_eval_model_samples", "must be >= 0")
    need(cfg.max_new_tokens > 0, "max_new_tokens", "must be > 0")
    need(cfg.torch_threads >= 0, "torch_threads", "must be >= 0")
    need(cfg.log_every > 0, "log_every", "must be > 0")
    need(cfg.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
    need(cfg.step_timeout_s is None or cfg.step_timeout_s > 0, "step_timeout_s", "must be > 0 or null")
    need(cfg.guard.max_bad_steps > 0, "guard.max_bad_steps", "must be > 0")
    drop = cfg.guard.max_chosen_drop_per_token
    need(drop is None or drop >= 0, "guard.max_chosen_drop_per_token", "must be >= 0 or null")
    need(cfg.guard.action in ("warn", "stop"), "guard.action", "must be warn or stop")
    need(cfg.eval.n_checked > 0, "eval.n_checked", "must be > 0")
    cfg.eval.gather_for_generation = str(cfg.eval.gather_for_generation).lower()
    need(
        cfg.eval.gather_for_generation in GATHER_MODES,
        "eval.gather_for_generation",
        f"must be one of {GATHER_MODES}",
    )
    need(cfg.checkpoint.save_every >= 0, "checkpoint.save_every", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps every checkpoint)")
    need(cfg.checkpoint.max_failed_saves > 0, "checkpoint.max_failed_saves", "must be > 0")
    need(bool(cfg.exp_name) and "/" not in cfg.exp_name, "exp_name", "must be a non-empty name without '/'")
    need(cfg.data.max_tokens_per_micro_batch >= 0, "data.max_tokens_per_micro_batch", "must be >= 0")
    if cfg.data.packing:
        need(
            cfg.data.layout in ("padded", "packed"),
            "data.packing",
            f"contradicts data.layout={cfg.data.layout}",
        )
    need(cfg.data.layout in LAYOUTS, "data.layout", f"must be one of {LAYOUTS}")
    need(
        cfg.parallel.sequence_parallel_size >= 1,
        "parallel.sequence_parallel_size",
        "must be >= 1 (1: no sequence parallelism)",
    )
    need(cfg.data.row_tokens >= 0, "data.row_tokens", "must be >= 0 (0: the layout's default)")
    need(cfg.parallel.tiled_mlp_tokens >= 0, "parallel.tiled_mlp_tokens", "must be >= 0 (0: no tiled MLP)")
    need(cfg.data.num_proc >= 1, "data.num_proc", "must be >= 1")
    need(
        cfg.model.attn_implementation in ATTN_IMPLEMENTATIONS,
        "model.attn_implementation",
        f"must be one of {ATTN_IMPLEMENTATIONS}",
    )
    if cfg.data.max_tokens_per_micro_batch:
        need(
            cfg.data.layout != "padded",
            "data.max_tokens_per_micro_batch",
            "needs a packed layout (data.layout=packed or shared_prompt)",
        )
        need(
            cfg.data.max_tokens_per_micro_batch >= 2 * cfg.max_length,
            "data.max_tokens_per_micro_batch",
            f"must hold one pair (2 * max_length = {2 * cfg.max_length} tokens)",
        )
    need(cfg.wandb.mode in ("online", "offline", "disabled"), "wandb.mode", "must be online|offline|disabled")


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        out.append((key.strip(), value))
    return out


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {config_file} must hold a mapping of keys, got {type(data).__name__}"
            )
        for key, value in data.items():
            try:
                _set(cfg, str(key), value)
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {e}") from None
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / cfg.exp_name)
    if cfg.data.packing and cfg.data.layout == "padded":
        warnings.warn("data.packing=true is deprecated: use data.layout=packed", FutureWarning, stacklevel=2)
        cfg.data.layout = "packed"
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
