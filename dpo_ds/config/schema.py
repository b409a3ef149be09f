"""The config's typed dataclasses and the values its string keys may take.

The key names follow the original DPO code (eric-mitchell/direct-preference-optimization):
`loss=dpo loss.beta=0.1 model.archive=... batch_size=64 ...`. Parsing lives in parse.py, the "auto" and
normalised values in resolve.py, the checks in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SFT_NORMALIZE = ("sequence", "token")
IPO_NORMALIZE = ("sum", "length")
TRUNCATION_MODES = ("auto", "keep_start", "keep_end", "original")
ADD_BOS = ("auto", "true", "false")
DTYPES = ("float32", "bfloat16", "float16")
LOGPROB_IMPLS = ("naive", "chunked", "triton", "fused_linear")
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
