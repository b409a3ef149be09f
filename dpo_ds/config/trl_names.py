"""TRL's names and what dpo_ds calls them: one table, read by the config errors, the launch log and the docs.

Every field that `trl.DPOConfig` declares in TRL 1.16 (its own and the transformers.TrainingArguments
ones it inherits), and the DPOConfig fields of older TRL releases that users still type, is one of:

  mapped          a dpo_ds key (or the --ds flag, or a field of the DeepSpeed JSON) and how its meaning differs
  not applicable  the reason it has no place in dpo_ds
  not supported   what dpo_ds does not do

`key_hint` and `flag_hint` turn a TRL name typed as a config key or a command-line flag into the message
that says what it is (parse.py asks key_hint; the CLI asks flag_hint for a flag it does not know);
`render_markdown` writes the docs page, with trl_defaults.py's defaults that differ from TRL's:

    python -m dpo_ds.config.trl_names > docs/coming-from-trl.md

Nothing here imports TRL (it is not a dependency); tests/config/test_trl_names.py checks the table
against TRL 1.16 itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .schema import Config
from .shipped import DEFAULT_DS
from .trl_defaults import DEFAULT_NOTES, ORIGINAL, TRL_ADAM_BETAS, fmt, get, shipped_betas

MAPPED = "mapped"
NOT_APPLICABLE = "not applicable"
NOT_SUPPORTED = "not supported"
KINDS = (MAPPED, NOT_APPLICABLE, NOT_SUPPORTED)

# where TRL declares a name
DPO = "DPOConfig"
TRAINER = "TrainingArguments"
OLDER = "an older TRL's DPOConfig"
ORIGINS = (DPO, TRAINER, OLDER)

FLAG = "--ds"  # a mapped target that is a command-line flag
DS_JSON = "ds:"  # a mapped target that is a field of the DeepSpeed JSON: "ds:optimizer.params.eps"

Write = str | dict[str, str] | Callable[[object], "str | None"] | None


@dataclass(frozen=True)
class TrlName:
    name: str
    origin: str  # one of ORIGINS
    kind: str  # one of KINDS
    note: str  # mapped: how the meaning differs; otherwise: the reason
    targets: tuple[str, ...] = ()  # mapped: dpo_ds keys, FLAG, or DS_JSON + a JSON path
    # mapped: the dpo_ds setting to write for a value: a template ("lr={value}"), value -> setting, or a function
    write: Write = None

    def setting(self, value) -> str | None:
        """The dpo_ds setting that means `name=value`, or None when no single setting does."""
        if self.write is None or value is None:
            return None
        if callable(self.write):
            return self.write(value)
        if isinstance(self.write, dict):
            return self.write.get(_plain(value))
        return self.write.format(value=_plain(value))


def _plain(value) -> str:
    """A value as the user wrote it, booleans spelled true / false (YAML gives bools, the CLI strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def _mapped(name: str, origin: str, targets: str, note: str, write: Write = None) -> TrlName:
    return TrlName(name, origin, MAPPED, note, tuple(targets.split()), write)


def _group(kind: str, origin: str, names: str, reason: str) -> list[TrlName]:
    """Names that share one reason, written as one whitespace-separated string."""
    return [TrlName(name, origin, kind, reason) for name in names.split()]


# TRL's loss_type values -> (the dpo_ds loss, the other settings that make it TRL's loss); None: no dpo_ds loss
LOSS_TYPES: dict[str, tuple[str, str] | None] = {
    "sigmoid": ("dpo", ""),
    "hinge": ("hinge", ""),
    # TRL divides each log-ratio by its response length; dpo_ds's default is the paper's summed form
    "ipo": ("ipo", "loss.ipo_normalize=length"),
    "robust": ("robust", ""),
    "apo_zero": ("apo_zero", ""),
    "apo_down": ("apo_down", ""),
    # in a list with a preference loss: the chosen response's per-token NLL (RPO's term)
    "sft": ("sft", ""),
    "exo_pair": ("exo_pair", ""),  # TRL's label_smoothing is its eps here, as in dpo_ds
    "nca_pair": ("nca_pair", ""),
    "bco_pair": ("bco_pair", ""),
    "sppo_hard": ("sppo_hard", ""),
    "aot": ("aot", ""),
    "aot_unpaired": ("aot_unpaired", ""),
    "aot_pair": ("aot_unpaired", ""),  # an older TRL's name of aot_unpaired
    "discopop": ("discopop", ""),
    "sigmoid_norm": ("dpo_norm", ""),  # loss=sigmoid_norm is accepted too
}


def _loss_values(value) -> list[str]:
    """loss_type as written: `sigmoid`, `[sigmoid,sft]` or `sigmoid,sft` (CLI), or a YAML list."""
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).strip().strip("[]").split(",") if v.strip()]


def loss_setting(value) -> str | None:
    """The dpo_ds setting for TRL's loss_type=value: sigmoid -> loss=dpo, [sigmoid,sft] -> loss=[dpo,sft]."""
    values = _loss_values(value)
    if not values or any(LOSS_TYPES.get(v) is None for v in values):
        return None
    names = [LOSS_TYPES[v][0] for v in values]
    extra = [LOSS_TYPES[v][1] for v in values if LOSS_TYPES[v][1]]
    loss = names[0] if len(names) == 1 else "[" + ",".join(names) + "]"
    return " ".join([f"loss={loss}", *dict.fromkeys(extra)])


def _loss_unsupported(value) -> list[str]:
    return [v for v in _loss_values(value) if LOSS_TYPES.get(v) is None]


_BATCH = "batch_size = per_device_train_batch_size x data-parallel ranks x gradient_accumulation_steps"

MAPPED_NAMES = [
    _mapped("output_dir", TRAINER, "run_dir", "the run directory; default runs/{exp_name}; one that already "
            "holds a run is refused unless resume_from is set", "run_dir={value}"),
    _mapped("per_device_train_batch_size", TRAINER, "batch_size", "global and per optimizer step, in "
            f"preference pairs (SFT examples for loss=sft), where TRL's counts pairs per device per micro-step: {_BATCH}"),
    _mapped("gradient_accumulation_steps", TRAINER, "gradient_accumulation_steps", "same meaning: micro-batches "
            "per optimizer step; batch_size stays the global batch", "gradient_accumulation_steps={value}"),
    _mapped("num_train_epochs", TRAINER, "n_epochs", f"a whole number; default 1 ({ORIGINAL}), TRL's 3; "
            "n_examples, when set, can stop the run earlier", "n_epochs={value}"),
    _mapped("max_steps", TRAINER, "n_examples", "in training examples, not optimizer steps: n_examples = "
            "max_steps x batch_size; the run stops at n_examples or after n_epochs, whichever comes first "
            "(n_epochs=null: n_examples alone)"),
    _mapped("learning_rate", TRAINER, "lr", f"the rate reached after warmup, then held (no decay); default 5e-7 "
            f"({ORIGINAL}), TRL's 1e-6", "lr={value}"),
    _mapped("warmup_steps", TRAINER, "warmup_steps", f"optimizer steps, a whole number (TRL also takes a fraction "
            f"of the run); default 150 ({ORIGINAL}), TRL's 0", "warmup_steps={value}"),
    _mapped("optim", TRAINER, "optimizer", "one of auto (the DeepSpeed JSON's optimizer; AdamW if it has none), "
            "AdamW, Adam or RMSprop; TRL's default adamw_torch_fused is AdamW",
            {"adamw_torch": "optimizer=AdamW", "adamw_torch_fused": "optimizer=AdamW", "rmsprop": "optimizer=RMSprop"}),
    _mapped("weight_decay", TRAINER, "ds:optimizer.params.weight_decay", "a field of the DeepSpeed JSON's "
            "optimizer block; 0.0 in the shipped JSONs, as TRL's default"),
    _mapped("adam_beta1", TRAINER, "ds:optimizer.params.betas", "the first of the DeepSpeed JSON's pair; 0.9 in "
            "the shipped JSONs, as TRL's default"),
    _mapped("adam_beta2", TRAINER, "ds:optimizer.params.betas", "the second of the DeepSpeed JSON's pair; 0.95 in "
            "the shipped JSONs, TRL's 0.999"),
    _mapped("adam_epsilon", TRAINER, "ds:optimizer.params.eps", "a field of the DeepSpeed JSON's optimizer block; 1e-8 in the "
            "shipped JSONs, as TRL's default"),
    _mapped("max_grad_norm", TRAINER, "max_grad_norm", f"same meaning (it fills the DeepSpeed JSON's "
            f"gradient_clipping); default 10 ({ORIGINAL}), TRL's 1.0", "max_grad_norm={value}"),
    _mapped("bf16", TRAINER, "model.policy_dtype model.reference_dtype", "a dtype per model (float32, bfloat16 or "
            f"float16), not a switch; default float32 ({ORIGINAL} for the policy), where TRL's bf16 defaults to true",
            {"true": "model.policy_dtype=bfloat16 model.reference_dtype=bfloat16",
             "false": "model.policy_dtype=float32 model.reference_dtype=float32"}),
    _mapped("fp16", TRAINER, "model.policy_dtype model.reference_dtype", "a dtype per model (float32, bfloat16 or "
            "float16), not a switch",
            {"true": "model.policy_dtype=float16 model.reference_dtype=float16",
             "false": "model.policy_dtype=float32 model.reference_dtype=float32"}),
    _mapped("activation_checkpointing", TRAINER, "model.gradient_checkpointing", "on or off for every decoder "
            "layer; default off", "model.gradient_checkpointing={value}"),
    _mapped("gradient_checkpointing", TRAINER, "model.gradient_checkpointing", "on or off for every decoder layer; "
            "default off (no recomputation, as the original DPO code), TRL's on", "model.gradient_checkpointing={value}"),
    _mapped("logging_steps", TRAINER, "log_every", "optimizer steps between log lines, a whole number; "
            "metrics.jsonl in the run dir records every step", "log_every={value}"),
    _mapped("report_to", TRAINER, "wandb.enabled", "Weights & Biases only; metrics.jsonl in the run dir is always "
            "written", {"wandb": "wandb.enabled=true", "none": "wandb.enabled=false"}),
    _mapped("run_name", TRAINER, "exp_name", "names the run and, by default, its directory runs/{exp_name}",
            "exp_name={value}"),
    _mapped("project", TRAINER, "wandb.project", "the Weights & Biases project (TRL's is Trackio's)",
            "wandb.project={value}"),
    _mapped("eval_steps", TRAINER, "eval_every", "in training examples, not optimizer steps: eval_every = "
            f"eval_steps x batch_size; default 20000 ({ORIGINAL})"),
    _mapped("per_device_eval_batch_size", TRAINER, "eval_batch_size", "global: per_device_eval_batch_size x "
            "data-parallel ranks"),
    _mapped("eval_on_start", TRAINER, "do_first_eval", f"default true ({ORIGINAL}), TRL's false",
            "do_first_eval={value}"),
    _mapped("save_only_model", TRAINER, "checkpoint.save_optimizer", "the opposite sense: save_only_model=true is "
            "checkpoint.save_optimizer=false (weights only, nothing to resume from)",
            {"true": "checkpoint.save_optimizer=false", "false": "checkpoint.save_optimizer=true"}),
    _mapped("save_steps", TRAINER, "checkpoint.save_every", "optimizer steps; dpo_ds also saves at every eval and at "
            "the end, and with 0 (the default) only then", "checkpoint.save_every={value}"),
    _mapped("save_total_limit", TRAINER, "checkpoint.keep_last", "the newest N step dirs are kept, and LATEST's "
            "always; 0 (the default) keeps all", "checkpoint.keep_last={value}"),
    _mapped("seed", TRAINER, "seed", "one seed for the data order and any seeded initialisation; default 0, "
            "TRL's 42", "seed={value}"),
    _mapped("ddp_timeout", TRAINER, "dist_timeout_s", "seconds: the deadline of every collective; default 1800, "
            "as TRL's", "dist_timeout_s={value}"),
    _mapped("deepspeed", TRAINER, FLAG, "a command-line flag: a shipped DeepSpeed JSON by name (zero2, zero3, "
            'zero3_offload) or a file; its "auto" fields are filled from the dpo_ds config', "--ds {value}"),
    _mapped("resume_from_checkpoint", TRAINER, "resume_from", "either auto (this run dir's LATEST, if any) or a "
            "step-N or LATEST directory; the config and data must match the checkpoint's (resume.allow_changes)",
            "resume_from={value}"),
    _mapped("dataset_num_proc", DPO, "data.num_proc", "tokenizing processes per rank", "data.num_proc={value}"),
    _mapped("max_length", DPO, "max_length", f"tokens of prompt and response together; default 512 ({ORIGINAL}), "
            "TRL's 1024; the prompt is cut to max_prompt_length first", "max_length={value}"),
    _mapped("truncation_mode", DPO, "data.truncation_mode", "the default, auto, cuts each source at its own end "
            "(hh keep_end, shp keep_start); keep_start or keep_end cut all alike; original: the original DPO code's rules",
            "data.truncation_mode={value}"),
    _mapped("padding_free", DPO, "data.layout", "with data.layout=packed several sequences share a row, with no "
            "padding between them", {"true": "data.layout=packed", "false": "data.layout=padded"}),
    _mapped("precompute_ref_log_probs", DPO, "model.reference_mode", "with model.reference_mode=precomputed "
            "the reference's log-probs are computed once before training, and no reference model is held while the "
            "policy trains", {"true": "model.reference_mode=precomputed", "false": "model.reference_mode=auto"}),
    _mapped("loss_type", DPO, "loss", "a dpo_ds loss name, or a list of them for a weighted sum "
            "(loss=[dpo,sft] loss.weights=[1,0.2])", loss_setting),
    _mapped("loss_weights", DPO, "loss.weights", "one weight per loss of loss=[...]; default all 1",
            "loss.weights={value}"),
    _mapped("label_smoothing", DPO, "loss.label_smoothing", "with loss=dpo it makes conservative DPO "
            "(cDPO), loss=robust takes it as its epsilon; TRL applies it to robust, exo_pair and aot, not to sigmoid",
            "loss.label_smoothing={value}"),
    _mapped("beta", DPO, "loss.beta", "same meaning (tau for IPO); default 0.1, as TRL's", "loss.beta={value}"),
    _mapped("lr_scheduler_type", TRAINER, "lr_schedule", "linear, cosine and constant_with_warmup after "
            "warmup_steps; TRL's default is linear, dpo_ds's constant (the original DPO code)",
            {"linear": "lr_schedule=linear", "cosine": "lr_schedule=cosine", "constant_with_warmup": "lr_schedule=constant",
             "constant": "lr_schedule=constant warmup_steps=0"}),
    _mapped("f_divergence_type", DPO, "loss.f_divergence", "the same four divergences (reverse_kl, forward_kl, "
            "js_divergence, alpha_divergence) for the same losses (dpo, dpo_norm, ipo, hinge, robust, exo_pair, "
            "discopop)", "loss.f_divergence={value}"),
    _mapped("f_alpha_divergence_coef", DPO, "loss.f_alpha", "same meaning and default (0.5)", "loss.f_alpha={value}"),
    _mapped("ld_alpha", DPO, "loss.ld_alpha", "the same weight of the tokens past the shorter response, in the "
            "policy's and the reference's log-probs alike, in every layout", "loss.ld_alpha={value}"),
    _mapped("sync_ref_model", DPO, "model.reference_sync_steps", "TR-DPO is on when model.reference_sync_steps > 0 "
            "(one key, not a switch beside a count); true writes TRL's default count, 512", {"true":
            "model.reference_sync_steps=512", "false": "model.reference_sync_steps=0"}),
    _mapped("ref_model_sync_steps", DPO, "model.reference_sync_steps", "the same count of optimizer steps between "
            "updates, after the step; 0 (the default) is off, where TRL's default is 512 behind sync_ref_model",
            "model.reference_sync_steps={value}"),
    _mapped("ref_model_mixup_alpha", DPO, "model.reference_mixup_alpha", "same meaning and default (0.6); the update "
            "is made on each shard where it lives, in fp32, rounded once to the reference's dtype",
            "model.reference_mixup_alpha={value}"),
    _mapped("use_weighting", DPO, "loss.wpo", "the same weights (exp of each response's mean per-token log p - "
            "log sum_v p_v^2, chosen times rejected, no gradient) on every loss term; refused with aot and "
            "aot_unpaired, as TRL refuses them", "loss.wpo={value}"),
    _mapped("discopop_tau", DPO, "loss.discopop_tau", "same meaning and default (0.05)", "loss.discopop_tau={value}"),
    _mapped("router_aux_loss_coef", DPO, "loss.router_aux_coef", "the same default (null: the model config's own "
            "coefficient) and the same load-balancing formula, added to the policy's objective and logged as "
            "aux_loss/train; refused for a dense model, where TRL raises too", "loss.router_aux_coef={value}"),
    _mapped("rpo_alpha", OLDER, "loss.chosen_nll_weight", "the weight of the chosen response's per-token NLL "
            "added to the loss (RPO, Pang et al. 2024), as rpo_alpha was; loss=[dpo,sft] loss.weights=[1,alpha] "
            "is the same", "loss.chosen_nll_weight={value}"),
    _mapped("generate_during_eval", OLDER, "sample_during_eval", "writes n_eval_model_samples generations at each "
            "eval to samples.jsonl in the run dir", "sample_during_eval={value}"),
    _mapped("max_prompt_length", OLDER, "max_prompt_length", f"same meaning; default 256 ({ORIGINAL})",
            "max_prompt_length={value}"),
    _mapped("reference_free", OLDER, "loss.reference_free", "same meaning: an implicit uniform reference, and no "
            "reference model is built", "loss.reference_free={value}"),
]  # fmt: skip

_NO_METRICS = "there is no compute_metrics: an eval computes dpo_ds's own metrics (loss, rewards, accuracies)"
_PADDING = "padded positions are masked out of every log-prob, so the pad id does not matter"

NOT_APPLICABLE_NAMES = [
    *_group(NOT_APPLICABLE, TRAINER, "optim_args", "optimizer arguments live in the DeepSpeed JSON's "
            "optimizer.params (--ds)"),
    *_group(NOT_APPLICABLE, TRAINER, "average_tokens_across_devices", "the preference losses are per pair, averaged "
            "over the global batch; loss=sft with loss.sft_normalize=token averages over every token of the global batch"),
    *_group(NOT_APPLICABLE, TRAINER, "label_smoothing_factor", "the Trainer's token-level smoothing of the "
            "cross-entropy; DPO's label smoothing is loss.label_smoothing"),
    *_group(NOT_APPLICABLE, TRAINER, "bf16_full_eval fp16_full_eval", "evaluation runs in each model's own dtype "
            "(model.policy_dtype, model.reference_dtype)"),
    *_group(NOT_APPLICABLE, TRAINER, "use_cache", "training never uses the KV cache; generation at eval does"),
    *_group(NOT_APPLICABLE, TRAINER, "logging_strategy logging_first_step log_on_each_node log_level "
            "log_level_replica disable_tqdm", "dpo_ds's logging is fixed: rank 0 logs a line every log_every "
            "optimizer steps, the other ranks only warnings, and metrics.jsonl in the run dir records every step"),
    *_group(NOT_APPLICABLE, TRAINER, "logging_nan_inf_filter", "a step whose loss or gradient norm is not finite "
            "is skipped and counted; guard.max_bad_steps of them in a row stop the run"),
    *_group(NOT_APPLICABLE, TRAINER, "eval_strategy", "dpo_ds evaluates every eval_every training examples, and "
            "before the first step unless do_first_eval=false"),
    *_group(NOT_APPLICABLE, TRAINER, "prediction_loss_only eval_do_concat_batches eval_use_gather_object "
            "eval_accumulation_steps include_for_metrics batch_eval_metrics", _NO_METRICS),
    *_group(NOT_APPLICABLE, TRAINER, "save_strategy", "dpo_ds saves at every eval and at the end, and every "
            "checkpoint.save_every optimizer steps when that is set"),
    *_group(NOT_APPLICABLE, TRAINER, "enable_jit_checkpoint", "a preemption signal (SIGTERM, SIGUSR1) always makes "
            "dpo_ds save and exit 0"),
    *_group(NOT_APPLICABLE, TRAINER, "ignore_data_skip", "a resumed run goes on with exactly the batches an "
            "uninterrupted run would have seen, without reading the ones before"),
    *_group(NOT_APPLICABLE, TRAINER, "restore_callback_states_from_checkpoint", "dpo_ds has no callbacks"),
    *_group(NOT_APPLICABLE, TRAINER, "use_cpu", "dpo_ds runs on the CPU when DeepSpeed finds no GPU"),
    *_group(NOT_APPLICABLE, TRAINER, "accelerator_config parallelism_config", "dpo_ds does not use Accelerate: "
            "data parallelism and ZeRO come from the DeepSpeed JSON (--ds), sequence parallelism from "
            "parallel.sequence_parallel_size"),
    *_group(NOT_APPLICABLE, TRAINER, "dataloader_drop_last dataloader_num_workers dataloader_pin_memory "
            "dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context "
            "dataloader_in_order", "there is no torch DataLoader: batches are cut from dpo_ds's token cache, "
            "tokenized once before training"),
    *_group(NOT_APPLICABLE, TRAINER, "remove_unused_columns label_names", "rows are read by dpo_ds's data "
            "sources, never passed to the model's forward as columns"),
    *_group(NOT_APPLICABLE, TRAINER, "ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers "
            "ddp_static_graph", "DeepSpeed, not DDP, runs data parallelism; its bucket sizes are in the "
            "DeepSpeed JSON"),
    *_group(NOT_APPLICABLE, TRAINER, "ddp_backend", "DeepSpeed picks the backend for the device (NCCL on NVIDIA "
            "GPUs, gloo on the CPU)"),
    *_group(NOT_APPLICABLE, TRAINER, "fsdp fsdp_config", "dpo_ds shards with DeepSpeed ZeRO (--ds zero3), not "
            "FSDP"),
    *_group(NOT_APPLICABLE, TRAINER, "skip_memory_metrics", "dpo_ds logs its memory figures (memory/*) itself"),
    *_group(NOT_APPLICABLE, TRAINER, "do_train do_eval do_predict", "switches for the Trainer's example scripts; "
            "a dpo_ds run always trains, and evaluates every eval_every examples"),
    *_group(NOT_APPLICABLE, TRAINER, "local_rank", "set by the launcher (--local_rank), not a config key"),
    *_group(NOT_APPLICABLE, DPO, "disable_dropout", "dropout is always off in both models: DPO compares their "
            "log-probs"),
    *_group(NOT_APPLICABLE, DPO, "precompute_ref_batch_size", "model.reference_mode=precomputed runs the very "
            "micro-batches training will run, so its log-probs equal the live reference's"),
    *_group(NOT_APPLICABLE, DPO, "pad_token", _PADDING),
    *_group(NOT_APPLICABLE, OLDER, "label_pad_token_id padding_value", _PADDING),
    *_group(NOT_APPLICABLE, OLDER, "max_completion_length", "no separate cap: a response gets max_length minus "
            "its (truncated) prompt"),
    *_group(NOT_APPLICABLE, OLDER, "max_target_length is_encoder_decoder", "for encoder-decoder models; dpo_ds "
            "trains causal LMs"),
    *_group(NOT_APPLICABLE, OLDER, "model_adapter_name ref_adapter_name", "dpo_ds trains one LoRA adapter "
            "(model.lora.r); the reference is the base model with it switched off (model.reference_mode=adapters_off)"),
    *_group(NOT_APPLICABLE, OLDER, "force_use_ref_model", "with LoRA, model.reference_mode=engine keeps a separate "
            "reference model"),
]  # fmt: skip

NOT_SUPPORTED_NAMES = [
    *_group(NOT_SUPPORTED, TRAINER, "lr_scheduler_kwargs", "a schedule's own arguments: lr_schedule's linear and "
            "cosine decay to 0 at the run's last step"),
    *_group(NOT_SUPPORTED, TRAINER, "optim_target_modules", "the GaLore and APOLLO optimizers"),
    *_group(NOT_SUPPORTED, TRAINER, "tf32", "switching TF32 on or off: dpo_ds leaves torch's setting as it is"),
    *_group(NOT_SUPPORTED, TRAINER, "activation_checkpointing_kwargs gradient_checkpointing_kwargs", "checkpointing "
            "arguments: model.gradient_checkpointing checkpoints every decoder layer, non-reentrant"),
    *_group(NOT_SUPPORTED, TRAINER, "torch_compile torch_compile_backend torch_compile_mode", "torch.compile"),
    *_group(NOT_SUPPORTED, TRAINER, "use_liger_kernel liger_kernel_config", "Liger's kernels; dpo_ds's own "
            "log-prob kernels are model.logprob_impl (chunked, triton, fused_linear)"),
    *_group(NOT_SUPPORTED, TRAINER, "neftune_noise_alpha", "NEFTune's embedding noise"),
    *_group(NOT_SUPPORTED, TRAINER, "torch_empty_cache_steps", "emptying the device cache on a schedule"),
    *_group(NOT_SUPPORTED, TRAINER, "auto_find_batch_size", "searching for a batch size that fits; dpo_ds.plan "
            "estimates a run's memory before it starts"),
    *_group(NOT_SUPPORTED, TRAINER, "include_num_input_tokens_seen", "counting the input tokens seen"),
    *_group(NOT_SUPPORTED, TRAINER, "trackio_space_id trackio_bucket_id trackio_static_space_id", "Trackio; "
            "dpo_ds reports to Weights & Biases (wandb.*) and to metrics.jsonl"),
    *_group(NOT_SUPPORTED, TRAINER, "eval_delay", "delaying the first evals"),
    *_group(NOT_SUPPORTED, TRAINER, "save_on_each_node", "saving on every node"),
    *_group(NOT_SUPPORTED, TRAINER, "push_to_hub hub_token hub_private_repo hub_model_id hub_strategy "
            "hub_always_push hub_revision", "pushing to the Hugging Face Hub: export the run to a model directory "
            "and upload that"),
    *_group(NOT_SUPPORTED, TRAINER, "load_best_model_at_end metric_for_best_model greater_is_better", "choosing "
            "a best checkpoint"),
    *_group(NOT_SUPPORTED, TRAINER, "full_determinism", "torch's deterministic-algorithms mode"),
    *_group(NOT_SUPPORTED, TRAINER, "data_seed", "a second seed: seed drives the data order"),
    *_group(NOT_SUPPORTED, TRAINER, "train_sampling_strategy length_column_name", "other orders: training "
            "examples come in a seeded shuffle, not grouped by length"),
    *_group(NOT_SUPPORTED, TRAINER, "debug", "the Trainer's debug modes"),
    *_group(NOT_SUPPORTED, DPO, "model_init_kwargs", "extra from_pretrained arguments: the model loads from "
            "model.name_or_path in model.policy_dtype, with model.attn_implementation"),
    *_group(NOT_SUPPORTED, DPO, "trust_remote_code", "models whose code comes with their weights; dpo_ds loads "
            "the architectures transformers has"),
    *_group(NOT_SUPPORTED, DPO, "pad_to_multiple_of", "padding lengths to a multiple"),
    *_group(NOT_SUPPORTED, DPO, "activation_offloading", "offloading activations to the CPU (--ds zero3_offload "
            "offloads parameters and optimizer states)"),
    *_group(NOT_SUPPORTED, OLDER, "ref_model_init_kwargs", "extra from_pretrained arguments for the reference: it "
            "loads from the policy's weights, in model.reference_dtype"),
]  # fmt: skip


def _index(entries: list[TrlName]) -> dict[str, TrlName]:
    out: dict[str, TrlName] = {}
    for entry in entries:
        if entry.name in out:
            raise ValueError(f"TRL name {entry.name!r} is classified twice")
        out[entry.name] = entry
    return out


TRL_NAMES: dict[str, TrlName] = _index(MAPPED_NAMES + NOT_APPLICABLE_NAMES + NOT_SUPPORTED_NAMES)


def _targets_text(entry: TrlName) -> str:
    parts = []
    for target in entry.targets:
        if target == FLAG:
            parts.append(f"the flag {FLAG}")
        elif target.startswith(DS_JSON):
            parts.append(f"'{target[len(DS_JSON) :]}' of the DeepSpeed JSON given to {FLAG}")
        else:
            parts.append(f"'{target}'")
    return " and ".join(parts)


def _hint(entry: TrlName, value, flag: bool = False) -> str:
    name = f"--{entry.name}" if flag else entry.name
    head = f"'{name}' is TRL's {'flag' if flag else 'name'} ({entry.origin})"
    if entry.kind == NOT_APPLICABLE:
        return f"{head}; it does not apply to dpo_ds: {entry.note}"
    if entry.kind == NOT_SUPPORTED:
        return f"{head}; dpo_ds does not support it: {entry.note}"
    text = f"{head}; dpo_ds calls it {_targets_text(entry)}"
    if flag and FLAG not in entry.targets and not entry.targets[0].startswith(DS_JSON):
        text += (
            ", config keys written key=value"
            if len(entry.targets) > 1
            else ", a config key written key=value"
        )
    if value is None:  # `--bf16` alone means true; a template shows where the value goes
        switch = flag and isinstance(entry.write, dict) and "true" in entry.write
        value = "<value>" if isinstance(entry.write, str) else "true" if switch else None
    setting = entry.setting(value)
    if setting:
        text += f"; write {setting}"
    elif entry.name == "loss_type" and value is not None and _loss_unsupported(value):
        have = ", ".join(f"{k} ({loss_setting(k)})" for k, v in LOSS_TYPES.items() if v)
        text += f"; dpo_ds has no loss {', '.join(_loss_unsupported(value))}, the loss_type values it has are {have}"
    note = entry.note if entry.note.startswith("dpo_ds") else entry.note[0].upper() + entry.note[1:]
    return f"{text}. {note}"


def key_hint(name: str, value=None) -> str | None:
    """What a TRL name typed as a config key is (`learning_rate=1e-6`), or None for a name TRL does not use."""
    entry = TRL_NAMES.get(name)
    return None if entry is None else _hint(entry, value)


def flag_hint(flag: str, value=None) -> str | None:
    """What a TRL / Trainer command-line flag is (`--deepspeed`, `--output_dir=runs/x`), or None: for the
    CLI's unknown flags (dpo_ds takes config keys as key=value, and a few flags of its own such as --ds)."""
    name, _, inline = flag.lstrip("-").partition("=")
    entry = TRL_NAMES.get(name.replace("-", "_"))
    return None if entry is None else _hint(entry, inline or value, flag=True)


# ----------------------------------------------------------------------------- docs


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _dpo_ds_cell(entry: TrlName) -> str:
    parts = []
    for target in entry.targets:
        if target.startswith(DS_JSON):
            parts.append(f"`{target[len(DS_JSON) :]}` (DeepSpeed JSON)")
        else:
            parts.append(f"`{target}`")
    return ", ".join(parts)


def _write_cell(entry: TrlName) -> str:
    if isinstance(entry.write, dict):
        return "; ".join(f"{k}: `{v}`" for k, v in entry.write.items())
    if isinstance(entry.write, str):
        return f"`{entry.write.format(value='<value>')}`"
    return "see Losses" if callable(entry.write) else ""


def _mapped_table() -> list[str]:
    lines = [
        "| TRL | declared in | dpo_ds | how it differs | write |",
        "|---|---|---|---|---|",
    ]
    for e in MAPPED_NAMES:
        lines.append(f"| `{e.name}` | {e.origin} | {_dpo_ds_cell(e)} | {_cell(e.note)} | {_write_cell(e)} |")
    return lines


def _grouped_table(entries: list[TrlName], heading: str) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        groups.setdefault((e.origin, e.note), []).append(f"`{e.name}`")
    lines = [f"| TRL | declared in | {heading} |", "|---|---|---|"]
    for (origin, note), names in groups.items():
        lines.append(f"| {', '.join(names)} | {origin} | {_cell(note)} |")
    return lines


def _loss_table() -> list[str]:
    lines = ["| TRL `loss_type` | dpo_ds |", "|---|---|"]
    for value, mapped in LOSS_TYPES.items():
        lines.append(f"| `{value}` | {f'`{loss_setting(value)}`' if mapped else 'not supported'} |")
    return lines


def _defaults_table() -> list[str]:
    defaults = Config()
    lines = ["| dpo_ds key | dpo_ds default | TRL | TRL default | why |", "|---|---|---|---|---|"]
    for n in DEFAULT_NOTES:
        ours = fmt(get(defaults, n.key))
        lines.append(f"| `{n.key}` | `{ours}` | `{n.trl}` | `{fmt(n.trl_default)}` | {_cell(n.why)} |")
    ours = shipped_betas()
    if ours is not None and tuple(ours) != TRL_ADAM_BETAS:
        trl = ", ".join(fmt(b) for b in TRL_ADAM_BETAS)
        lines.append(f"| optimizer betas (DeepSpeed JSON) | `{ours}` | `adam_beta1`, `adam_beta2` | `{trl}` | "
                     f"the shipped `{DEFAULT_DS}` JSON's |")  # fmt: skip
    return lines


INTRO = """# Coming from TRL

dpo_ds's settings are config keys, written `key=value` on the command line or as a YAML file
(`--config`), named after the original DPO code rather than TRL's `DPOConfig`. A TRL name used as a
config key or a command-line flag is refused with a message that says what dpo_ds calls it, for
example, for `learning_rate=1e-6`:

    dpo_ds: error: unknown config key 'learning_rate': {example}

This page lists every field of TRL 1.16's `DPOConfig` (its own and the `TrainingArguments` fields it
inherits) and the older `DPOConfig` fields users still type (`rpo_alpha`, `generate_during_eval`, ...).
Each is mapped to a dpo_ds key, not applicable to dpo_ds, or not supported. Regenerate the page with
`python -m dpo_ds.config.trl_names > docs/coming-from-trl.md`.
"""

DEFAULTS_TEXT = """## Defaults that differ from TRL's

dpo_ds follows the original DPO code. A run prints the differing defaults it uses once at launch;
setting the key (to any value) silences its line.
"""


def render_markdown() -> str:
    sections = [
        INTRO.format(example=key_hint("learning_rate", "1e-6")),
        DEFAULTS_TEXT,
        "\n".join(_defaults_table()) + "\n",
        "## Losses\n\n`loss_type` is `loss`; a list of them is a weighted sum, `loss=[dpo,sft] loss.weights=[1,0.2]`.\n",
        "\n".join(_loss_table()) + "\n",
        "## Mapped\n",
        "\n".join(_mapped_table()) + "\n",
        "## Not applicable\n",
        "\n".join(_grouped_table(NOT_APPLICABLE_NAMES, "why")) + "\n",
        "## Not supported\n",
        "\n".join(_grouped_table(NOT_SUPPORTED_NAMES, "what dpo_ds does not do")) + "\n",
    ]
    return "\n".join(sections)


if __name__ == "__main__":
    print(render_markdown(), end="")
