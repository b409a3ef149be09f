"""The config's typed dataclasses and the values its string keys may take.

The key names follow the original DPO code (eric-mitchell/direct-preference-optimization):
`loss=dpo loss.beta=0.1 model.archive=... batch_size=64 ...`. Parsing lives in parse.py, the "auto" and
normalised values in resolve.py, the checks in validate.py.

Every field carries its help text, `opt(default, "help", choices=...)`: one string read by the trainer's
--help-keys, the unknown key's "did you mean" hint and the generated docs/reference/config.md (keys.py
walks the dataclasses). Its first sentence is the summary the hint quotes.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

SFT_NORMALIZE = ("sequence", "token")
IPO_NORMALIZE = ("sum", "length")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # training/losses.f_scores
TRUNCATION_MODES = ("auto", "keep_start", "keep_end", "original")
ADD_BOS = ("auto", "true", "false")
LR_SCHEDULES = ("constant", "linear", "cosine")  # after the warmup (engine/build.py lr_factor)
DTYPES = ("float32", "bfloat16", "float16")
LOGPROB_IMPLS = ("naive", "chunked", "triton", "fused_linear")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "dpo_ds_blocks")
OPTIMIZERS = ("auto", "AdamW", "Adam", "RMSprop")
MODEL_INITS = ("auto", "random")
GATHER_MODES = ("auto", "true", "false")
ADAPTER_DTYPES = ("policy", "float32")
GUARD_ACTIONS = ("warn", "stop")
WANDB_MODES = ("online", "offline", "disabled")


def opt(default=MISSING, help: str = "", *, factory=MISSING, choices: tuple[str, ...] = ()):
    """A config field with its help text and, for a string key, the values it takes (keys.py reads both)."""
    metadata = {"help": help, "choices": tuple(choices)} if choices else {"help": help}
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class LossConfig:
    name: str = opt(
        "dpo",
        "The loss: sft, dpo, dpo_norm (alias sigmoid_norm), ipo, hinge, robust, apo_zero, apo_down, exo_pair, "
        "nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, discopop, simpo or orpo (`loss=ipo` on the "
        "command line sets it). A weighted sum is written as a list, `loss=[dpo,sft]` (YAML "
        "`loss: [dpo, sft]`), and stored as `dpo+sft`, which parses too.",
    )
    weights: list[float] = opt(
        help="One weight per summed loss of a list-valued loss. Empty: every loss has weight 1.",
        factory=list,
    )
    beta: float = opt(
        0.1, "KL temperature of Eq. 7 of the DPO paper. For IPO it is tau; for SimPO the reward scale."
    )
    label_smoothing: float = opt(
        0.0, "cDPO / robust: the assumed probability that a preference label is flipped, in [0, 0.5)."
    )
    reference_free: bool = opt(
        False, "Use an implicit reference that is uniform over responses (no reference model)."
    )
    chosen_nll_weight: float = opt(
        0.0, "RPO (Pang et al. 2024): adds weight x NLL(chosen) per token to the preference loss. 0: off."
    )
    gamma: float = opt(
        0.5, "SimPO's target reward margin (Eq. 6 of the SimPO paper; TRL's simpo_gamma default)."
    )
    ld_alpha: float | None = opt(
        None,
        "LD-DPO (Liu et al. 2024): the weight, in [0, 1], of each response's tokens past the pair's shorter "
        "response, in both models' log-probs; null: off (every token weighs 1, as 1 does).",
    )
    wpo: bool = opt(
        False,
        "WPO (Zhou et al. 2024; TRL's use_weighting): multiply each pair's loss by the exp of its responses' "
        "mean per-token log p - log sum_v p_v^2 under the policy, chosen times rejected, without gradient. "
        "Not with aot or aot_unpaired, which sort the batch.",
    )
    discopop_tau: float = opt(
        0.05,
        "DiscoPOP's temperature tau (Eq. 5 of the DiscoPOP paper; its recommended value, TRL's default).",
    )
    f_divergence: str = opt(
        "reverse_kl",
        "f-DPO's regulariser between policy and reference: reverse_kl (DPO), forward_kl, js_divergence or "
        "alpha_divergence; for the losses built on a log-ratio margin (dpo, dpo_norm, ipo, hinge, robust, "
        "exo_pair, discopop).",
        choices=F_DIVERGENCES,
    )
    f_alpha: float = opt(
        0.5, "The alpha of loss.f_divergence=alpha_divergence (TRL's f_alpha_divergence_coef)."
    )
    orpo_lambda: float = opt(
        0.1, "ORPO's lambda: the weight of its odds-ratio term (Eq. 6 of the ORPO paper; TRL's default too)."
    )
    ipo_normalize: str = opt(
        "sum",
        "How IPO forms h: `sum` from summed log-probs (the IPO paper), `length` from per-token means "
        "(TRL's DPOTrainer). loss=ipo only.",
        choices=IPO_NORMALIZE,
    )
    router_aux_coef: float | None = opt(
        None,
        "Mixture-of-Experts: the weight of the router's load-balancing loss added to the policy's objective "
        "(logged as aux_loss/train and aux_loss/eval). null: the model config's own router_aux_loss_coef; "
        "0: off. Refused for a dense model.",
    )
    sft_normalize: str = opt(
        "sequence",
        "How SFT averages: `sequence` sums each sequence's NLL and averages over sequences (the original "
        "code); `token` averages over every trained-on token of the global batch (TRL's SFTTrainer, HF "
        "Trainer). loss=sft only.",
        choices=SFT_NORMALIZE,
    )

    @property
    def names(self) -> list[str]:
        """The losses summed: ["dpo"] for loss=dpo, ["dpo", "sft"] for loss=[dpo,sft]."""
        return self.name.split("+")


@dataclass
class LoraSettings:
    r: int = opt(
        0,
        "LoRA rank, through peft (model/adapters.py). 0: every parameter trains; > 0: only rank-r adapters train.",
    )
    alpha: float | None = opt(None, "LoRA's alpha (the adapters are scaled by alpha / r). null: 2 x r.")
    dropout: float = opt(
        0.0,
        "Dropout on the adapters' input, in [0, 1). 0: off, as in the rest of both models (DPO compares their "
        "log-probs).",
    )
    target_modules: list[str] = opt(
        help="The modules wrapped: `all-linear` (every linear layer of the decoder but the lm_head), or module names. "
        "On a Mixture-of-Experts model all-linear reaches the attention (and any dense MLP) but not the fused "
        "experts, whose weights are 3-D parameters, not linear layers: name those in model.lora.target_parameters.",
        factory=lambda: ["all-linear"],
    )
    target_parameters: list[str] = opt(
        help="Parameters wrapped directly (peft's target_parameters): a Mixture-of-Experts model's fused expert "
        "weights, e.g. `[mlp.experts.gate_up_proj,mlp.experts.down_proj]`, or `[experts]` for every 3-D expert "
        "parameter of the model. Needs model.lora.dropout=0. Empty: none.",
        factory=list,
    )
    adapter_dtype: str = opt(
        "policy",
        "Dtype of the adapters. `policy`: model.policy_dtype (one dtype per module; DeepSpeed's optimizer keeps "
        "the fp32 master copy); `float32`: fp32 adapters on a bf16/fp16 base (model/adapters.py says when it helps).",
        choices=ADAPTER_DTYPES,
    )


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "demo",
        "The model: a local Hugging Face causal-LM directory, or `demo` / `tiny` / `tiny_moe` (configs dpo_ds ships; tiny_moe is a Qwen3-MoE).",
    )
    init: str = opt(
        "auto",
        "Where the starting weights come from. `auto`: the directory's weights (an error when it has none), "
        "model.archive's, or a seeded init for the shipped demo / tiny configs; `random`: a seeded random "
        "init, when asked for.",
        choices=MODEL_INITS,
    )
    archive: str | None = opt(
        None, "An SFT run's LATEST/policy.pt, loaded into both policy and reference. null: none."
    )
    policy_dtype: str = opt(
        "float32",
        "Dtype of the policy: float32, or DeepSpeed mixed precision in bfloat16 / float16 (sets the JSON's "
        "bf16 / fp16 blocks).",
        choices=DTYPES,
    )
    reference_dtype: str = opt("float32", "Dtype of the reference model.", choices=DTYPES)
    reference_offload: bool = opt(False, "Keep a ZeRO-3 reference's parameters on CPU.")
    reference_mode: str = opt(
        "auto",
        "Where the reference log-probs come from: `engine` (a frozen inference engine beside the policy), "
        "`precomputed` (computed once before training; no reference model while the policy trains), "
        "`adapters_off` (LoRA only: the policy's own base with its adapters switched off, no second copy), "
        "or `auto` (adapters_off with LoRA, else engine).",
    )
    reference_zero_stage: int | None = opt(
        None, "ZeRO stage of the reference engine: 0 or 3. null: 3 when the policy is ZeRO-3, else 0."
    )
    reference_sync_steps: int = opt(
        0,
        "TR-DPO (Gorbatovski et al. 2024; TRL's ref_model_sync_steps): every N optimizer steps, after the update, "
        "move the reference toward the policy, ref = a * policy + (1 - a) * ref, each shard where it lives. 0: "
        "off (a frozen reference).",
    )
    reference_mixup_alpha: float = opt(
        0.6,
        "TR-DPO's a (TRL's ref_model_mixup_alpha and default), in [0, 1]: 1 copies the policy (the hard update).",
    )
    logprob_impl: str = opt(
        "chunked",
        "How per-token log-probs are computed (model/logprobs/): `naive` (an fp32 log-softmax of all "
        "logits), `chunked` (rows in chunks, softmax recomputed in backward), `triton` (a Triton kernel), "
        "`fused_linear` (from the hidden states and the lm_head weight; the logits never exist whole).",
        choices=LOGPROB_IMPLS,
    )
    attn_implementation: str = opt(
        "auto",
        "The attention kernel. `auto`: for packed / shared_prompt rows, flex_attention on a GPU (a "
        "block-sparse mask) and dpo_ds_blocks on CPU (attention per segment, no mask; model/attention.py); "
        "transformers' default (sdpa) otherwise.",
        choices=ATTN_IMPLEMENTATIONS,
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute the policy's activations in backward (transformers' gradient checkpointing)."
    )
    freeze_router: bool = opt(
        False,
        "Mixture-of-Experts: keep the routers' weights fixed (they get no gradient), as several MoE DPO recipes "
        "do; the router loss then reaches only the layers below each router. Refused for a dense model.",
    )
    lora: LoraSettings = opt(
        help="LoRA adapters through peft: off unless model.lora.r > 0.", factory=LoraSettings
    )


@dataclass
class DataConfig:
    layout: str = opt(
        "padded",
        "How sequences make rows: `padded` (one sequence per row), `packed` (several sequences per row, no "
        "padding between them), `shared_prompt` (each pair one block [prompt | chosen | rejected], the "
        "prompt computed once).",
    )
    packing: bool = opt(False, "Deprecated alias of data.layout=packed.")
    max_tokens_per_micro_batch: int = opt(
        0, "Token budget of a packed or shared_prompt micro-batch. 0: no budget."
    )
    row_tokens: int = opt(
        0, "Length of a packed row. 0: max_length (packed), 2 x max_length (shared_prompt)."
    )
    cache_dir: str | None = opt(
        None,
        "Directory of the token cache (data/cache.py; shared by every run pointing here) and of `datasets`' "
        "own cache. null: the token cache lives in the run dir.",
    )
    num_proc: int = opt(1, "Tokenizing processes per rank (fork). More help only with spare cores.")
    truncation_mode: str = opt(
        "auto",
        "Which end of an over-long sequence is kept. `auto`: each source's own (hh keep_end, shp / se "
        "keep_start); `keep_start` / `keep_end`: that end for every source; `original`: the original code's "
        "rules token for token (no BOS, responses cut to max_length - max_prompt_length).",
        choices=TRUNCATION_MODES,
    )
    add_bos: str = opt(
        "auto",
        "Whether sequences start with BOS. `auto`: what tokenizer(text) adds in front (Llama's <s>, nothing "
        "for GPT-2); `true` / `false`: always / never.",
        choices=ADD_BOS,
    )
    chat_template: str | None = opt(
        None, "A Jinja template file for conversational rows. null: the tokenizer's own chat template."
    )


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = opt(
        1,
        "Ranks that share one sequence (DeepSpeed Ulysses): each holds 1/N of every row's tokens, attention "
        "runs on the whole sequence with 1/N of the heads, and data parallelism runs over world / N. 1: off.",
    )
    tiled_mlp_tokens: int = opt(
        0,
        "ALST's TiledMLP (DeepSpeed), for long rows: every decoder layer's MLP runs over tiles of this many "
        "tokens and is recomputed tile by tile in backward, so its (tokens x intermediate) activations never "
        "exist whole, at the cost of one more MLP forward per step. 0: off. ALST itself tiles by "
        "hidden_size; bench/long_context.py --tiled-mlp measures it.",
    )


@dataclass
class CheckpointConfig:
    save_optimizer: bool = opt(
        True, "Save the DeepSpeed checkpoint to resume from. false: policy.pt only (the weights)."
    )
    save_every: int = opt(0, "Also save every N optimizer steps. 0: save only at evals and at the end.")
    keep_last: int = opt(0, "Keep the N newest step dirs (LATEST's is never removed). 0: keep all.")
    max_failed_saves: int = opt(
        3, "A failed save is logged and training goes on, until this many fail in a row."
    )
    verify_checksums: bool = opt(
        True,
        "On resume, read every file of the checkpoint once and compare it with the checksum recorded as it "
        "was written; a mismatch falls back to an older checkpoint like a file cut short. The read's size "
        "and time are logged. false: sizes and zip directories only (no file read whole).",
    )


@dataclass
class GuardConfig:
    max_bad_steps: int = opt(
        5,
        "Non-finite steps in a row that stop the run. A step whose loss or gradient norm is not finite on "
        "any rank is skipped (DeepSpeed discards it) and counted.",
    )
    max_chosen_drop_per_token: float | None = opt(
        None,
        "Likelihood displacement guard (training/guards.py): the per-token drop of the chosen responses' "
        "log-probs below the reference's, with reward accuracy above 0.5, that makes the run warn or stop. "
        "null: off.",
    )
    action: str = opt(
        "warn",
        "What the displacement guard does: `warn`, or `stop` (saves a checkpoint, exits 0).",
        choices=GUARD_ACTIONS,
    )


@dataclass
class EvalConfig:
    checker: str | None = opt(
        None,
        "A `module:function` that scores (prompt, generation, row) in [0, 1], run on greedy generations "
        "at each eval. null: none.",
    )
    n_checked: int = opt(64, "Held-out prompts generated from and checked at each eval (with eval.checker).")
    gather_for_generation: str = opt(
        "auto",
        "Under ZeRO-3: gather the whole model once for each generation (`true`; `auto`: when a full copy "
        "fits), or keep DeepSpeed's per-module gathers (`false`). training/generation.py.",
        choices=GATHER_MODES,
    )


@dataclass
class ResumeConfig:
    allow_changes: list[str] = opt(
        help="Keys that may differ from the checkpoint's config on resume, each written in full (`lr`, "
        "`loss.beta`), and `data` for training data whose token ids differ; each change is logged. Every "
        "other key that shapes training must match; batch_size and the world size never change.",
        factory=list,
    )


@dataclass
class WandbConfig:
    enabled: bool = opt(False, "Log the metrics to Weights & Biases too (rank 0; needs dpo_ds[wandb]).")
    project: str = opt("dpo_ds", "The wandb project.")
    entity: str | None = opt(None, "The wandb entity (user or team). null: wandb's default.")
    mode: str = opt(
        "online", "The wandb mode; `offline` needs no account, `disabled` logs nothing.", choices=WANDB_MODES
    )


@dataclass
class Config:
    loss: LossConfig = opt(
        help="The objective: which loss, or weighted sum of losses, and its hyperparameters. `loss=NAME` sets loss.name.",
        factory=LossConfig,
    )
    model: ModelConfig = opt(
        help="The policy and reference models: weights, dtypes, reference mode, log-prob and attention kernels, LoRA.",
        factory=ModelConfig,
    )
    data: DataConfig = opt(
        help="How rows become token sequences: layout, token cache, truncation, BOS, chat template.",
        factory=DataConfig,
    )
    parallel: ParallelConfig = opt(
        help="Sequence parallelism and tiled MLP, for long sequences.", factory=ParallelConfig
    )
    checkpoint: CheckpointConfig = opt(
        help="What is saved, how often, and how much is kept.", factory=CheckpointConfig
    )
    guard: GuardConfig = opt(
        help="When a run stops itself: non-finite steps, likelihood displacement.", factory=GuardConfig
    )
    eval: EvalConfig = opt(help="Generation and the checker at each eval.", factory=EvalConfig)
    resume: ResumeConfig = opt(help="What may change when a run resumes.", factory=ResumeConfig)
    wandb: WandbConfig = opt(help="Weights & Biases logging.", factory=WandbConfig)
    datasets: list[str] = opt(
        help="The data sources; their examples are pooled. Each is a hub name (hh, shp, se, ultrafeedback), "
        "a local copy in a hub set's shape (hh:DIR, shp:DIR, se:DIR, ultrafeedback:DIR), `demo` (the bundled "
        "demo data), a local .jsonl / .json / .parquet file, or a directory holding "
        "{split}.jsonl|json|parquet.",
        factory=lambda: ["demo"],
    )
    batch_size: int = opt(
        4,
        "Global batch: preference pairs (or SFT examples) per optimizer step, over every rank and "
        "micro-batch. Must be divisible by world size x gradient_accumulation_steps.",
    )
    eval_batch_size: int = opt(16, "Global eval batch; must be divisible by the world size.")
    gradient_accumulation_steps: int = opt(
        1,
        "Micro-batches per rank per optimizer step: each holds batch_size / (world size x "
        "gradient_accumulation_steps) examples. With data.max_tokens_per_micro_batch set, the token budget "
        "decides how many micro-batches a step takes (agreed across ranks) and this only has to divide "
        "batch_size.",
    )
    optimizer: str = opt(
        "auto",
        "The optimizer. `auto`: the DeepSpeed JSON's optimizer, AdamW when it has none; RMSprop is the "
        "original code's.",
        choices=OPTIMIZERS,
    )
    lr: float = opt(5e-7, "Learning rate, reached after the warmup and then held constant.")
    warmup_steps: int = opt(150, "Optimizer steps of linear warmup up to lr.")
    lr_schedule: str = opt(
        "constant",
        "After the warmup: `constant` holds lr (the original DPO code); `linear` decays it linearly to 0 at the "
        "run's last step (TRL's and open-instruct's default); `cosine` to 0 along a half cosine.",
        choices=LR_SCHEDULES,
    )
    max_grad_norm: float = opt(10.0, "Gradient clipping (DeepSpeed's gradient_clipping). 0: off.")
    max_length: int = opt(512, "Most tokens of a sequence, prompt and response together.")
    max_prompt_length: int = opt(256, "Most tokens of a prompt; must be < max_length.")
    n_epochs: int | None = opt(
        1,
        "Epochs over the training data; the run stops at n_epochs or n_examples, whichever comes first. null: no limit.",
    )
    n_examples: int | None = opt(
        None,
        "Training examples to run through (pairs for DPO). null: no limit; n_epochs and n_examples cannot both be null.",
    )
    n_eval_examples: int = opt(
        256, "Held-out examples each eval runs on, in whole eval batches (the remainder is dropped)."
    )
    eval_every: int = opt(
        20000, "Evaluate, and save, every this many training examples (counted as in the original code)."
    )
    do_first_eval: bool = opt(True, "Evaluate before the first step of a fresh run.")
    sample_during_eval: bool = opt(
        False,
        "Write greedy samples of the policy and the reference at each eval to the run dir's samples.jsonl.",
    )
    n_eval_model_samples: int = opt(16, "Held-out prompts sampled at each eval (with sample_during_eval).")
    max_new_tokens: int = opt(128, "Most tokens generated per prompt at eval (samples and eval.checker).")
    seed: int = opt(0, "Seed of the data order and of every seeded init (model.init, the LoRA adapters).")
    exp_name: str = opt(
        "run", "The run's name (no '/'): its default run dir is runs/{exp_name}; wandb's run name."
    )
    run_dir: str | None = opt(
        None, "Where the run writes checkpoints, metrics and its data report. null: runs/{exp_name}."
    )
    resume_from: str | None = opt(
        None,
        "`auto` (this run_dir's LATEST, if any), or a step-N / LATEST directory. null: a fresh start, "
        "refused when run_dir already holds a run.",
    )
    dist_timeout_s: float = opt(
        1800.0,
        "Deadline of every collective and of the process group's forming, in seconds (the process group's "
        "own timeout is 60 s more).",
    )
    step_timeout_s: float | None = opt(
        None,
        "Deadline of a training step, in seconds. null: 10 x the slowest of the first steps, at least 60 s.",
    )
    torch_threads: int = opt(0, "torch threads per rank. 0: 1 per rank on CPU, torch's default on GPU.")
    log_every: int = opt(10, "Optimizer steps between log lines.")
