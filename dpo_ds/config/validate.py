"""validate(): impossible values are errors naming the key. It only checks, it never changes the config.

The values it reads are the resolved ones (resolve.py: model.reference_mode is never "auto" here,
data.add_bos and eval.gather_for_generation are lower-case). Checks needing the world size live in
engine/ds_config.py; which losses exist and which hyperparameters each defines, in objectives.build_objective.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from .errors import ConfigError
from .registry import LAYOUTS, REFERENCE_MODES
from .resolve import reference_mode
from .schema import (
    ADAPTER_DTYPES,
    ADD_BOS,
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    F_DIVERGENCES,
    GATHER_MODES,
    GUARD_ACTIONS,
    IPO_NORMALIZE,
    LOGPROB_IMPLS,
    LR_SCHEDULES,
    MODEL_INITS,
    OPTIMIZERS,
    SFT_NORMALIZE,
    TRUNCATION_MODES,
    WANDB_MODES,
    Config,
)


def validate(cfg: Config) -> None:
    """Impossible values are errors naming the key. Checks needing the world size live in engine/ds_config.py."""
    _check_finite(cfg)  # first: `lr=inf` passes `> 0`, and nan's own message is clearer than "must be > 0"
    _check_loss(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_lora(cfg)
    _check_reference_mode(cfg)
    _check_reference_sync(cfg)
    _check_model_weights(cfg)
    _check_batches_and_optimizer(cfg)
    _check_run_lengths(cfg)
    _check_runtime(cfg)
    _check_guard(cfg)
    _check_eval(cfg)
    _check_checkpoint(cfg)
    _check_token_budget(cfg)
    _check_layout(cfg)
    _check_parallel(cfg)
    _check_wandb(cfg)


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _need(cfg: Config, ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}, got {_get(cfg, key)!r}")


def float_keys(obj, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every float-typed key of the config (float, float | None, list[float]), found
    from the dataclasses' own annotations, so a float key added later is checked without being listed."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key, tp = getattr(obj, f.name), prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(value):
            out += float_keys(value, key + ".")
        elif float in (tp, *typing.get_args(tp)) or tp == list[float]:
            out += (
                [(f"{key}[{i}]", v) for i, v in enumerate(value)]
                if isinstance(value, list)
                else [(key, value)]
            )
    return out


def _check_finite(cfg: Config) -> None:
    """No float key may be inf or nan: `lr=inf` or `loss.beta=nan` would train on garbage, not fail."""
    for key, value in float_keys(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")


def _check_loss(cfg: Config) -> None:
    # which losses exist and which hyperparameters each defines: objectives.build_objective (each loss
    # spec checks its own); here only what any loss config must satisfy
    loss = cfg.loss
    names = loss.names
    _need(cfg, len(set(names)) == len(names), "loss.name", "names a loss twice")
    if loss.weights:
        _need(
            cfg,
            len(loss.weights) == len(names) and names != ["sft"],
            "loss.weights",
            f"must give one weight per loss in loss={loss.name} ({len(names)}); loss=sft takes none",
        )
    _need(cfg, all(w >= 0 for w in loss.weights), "loss.weights", "must be >= 0")
    if "sft" in names and len(names) > 1:
        _need(
            cfg,
            loss.chosen_nll_weight == 0,
            "loss.chosen_nll_weight",
            f"is the sft term of loss={loss.name} already; give its weight in loss.weights only",
        )
    _need(cfg, loss.beta > 0, "loss.beta", "must be > 0")
    _need(cfg, loss.gamma >= 0, "loss.gamma", "must be >= 0")
    _need(cfg, loss.orpo_lambda >= 0, "loss.orpo_lambda", "must be >= 0")
    _need(cfg, loss.discopop_tau > 0, "loss.discopop_tau", "must be > 0")
    if loss.ld_alpha is not None:
        _need(cfg, 0.0 <= loss.ld_alpha <= 1.0, "loss.ld_alpha", "must be in [0, 1] or null")
        _need(
            cfg, names != ["sft"], "loss.ld_alpha", "weighs the tokens of preference pairs; loss=sft has none"
        )
    if loss.wpo:
        _need(cfg, names != ["sft"], "loss.wpo", "weighs preference pairs; loss=sft has none")
        sorted_ = sorted({"aot", "aot_unpaired"} & set(names))
        _need(
            cfg,
            not sorted_,
            "loss.wpo",
            f"cannot weigh loss={sorted_[0] if sorted_ else ''}: it sorts the micro-batch's margins, so a "
            "pair's loss is no longer the pair's own (TRL refuses it too)",
        )
    _need(cfg, loss.f_divergence in F_DIVERGENCES, "loss.f_divergence", f"must be one of {F_DIVERGENCES}")
    _need(cfg, loss.f_alpha > 0, "loss.f_alpha", "must be > 0")
    if loss.f_alpha != 0.5:
        _need(
            cfg,
            loss.f_divergence == "alpha_divergence",
            "loss.f_alpha",
            "applies to loss.f_divergence=alpha_divergence only",
        )
    _need(cfg, loss.ipo_normalize in IPO_NORMALIZE, "loss.ipo_normalize", f"must be one of {IPO_NORMALIZE}")
    if loss.ipo_normalize != "sum":
        _need(cfg, "ipo" in names, "loss.ipo_normalize", "applies to loss=ipo only")
    _need(cfg, 0.0 <= loss.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)")
    _need(cfg, loss.chosen_nll_weight >= 0, "loss.chosen_nll_weight", "must be >= 0")
    _need(
        cfg,
        loss.router_aux_coef is None or loss.router_aux_coef >= 0,
        "loss.router_aux_coef",
        "must be >= 0 or null",
    )
    _need(cfg, loss.sft_normalize in SFT_NORMALIZE, "loss.sft_normalize", f"must be one of {SFT_NORMALIZE}")
    if loss.sft_normalize != "sequence":
        _need(cfg, loss.name == "sft", "loss.sft_normalize", "applies to loss=sft only")


def _check_data(cfg: Config) -> None:
    """Tokenisation: truncation, BOS (lower-cased by resolve), chat template."""
    data = cfg.data
    _need(
        cfg,
        data.truncation_mode in TRUNCATION_MODES,
        "data.truncation_mode",
        f"must be one of {TRUNCATION_MODES}",
    )
    _need(cfg, data.add_bos in ADD_BOS, "data.add_bos", f"must be one of {ADD_BOS}")
    if data.truncation_mode == "original":
        _need(
            cfg,
            data.add_bos != "true",
            "data.add_bos",
            "cannot be true with data.truncation_mode=original (the original code adds no BOS)",
        )
    if data.chat_template is not None:
        _need(
            cfg,
            Path(data.chat_template).is_file(),
            "data.chat_template",
            "must name a Jinja template file that exists",
        )


def _check_model(cfg: Config) -> None:
    model = cfg.model
    _need(cfg, model.policy_dtype in DTYPES, "model.policy_dtype", f"must be one of {DTYPES}")
    _need(cfg, model.reference_dtype in DTYPES, "model.reference_dtype", f"must be one of {DTYPES}")
    _need(cfg, model.logprob_impl in LOGPROB_IMPLS, "model.logprob_impl", f"must be one of {LOGPROB_IMPLS}")
    _need(
        cfg,
        model.reference_zero_stage in (None, 0, 3),
        "model.reference_zero_stage",
        "must be 0, 3 or null",
    )


def _check_lora(cfg: Config) -> None:
    lora = cfg.model.lora
    _need(cfg, lora.r >= 0, "model.lora.r", "must be >= 0 (0: no LoRA, every parameter trained)")
    _need(cfg, lora.alpha is None or lora.alpha > 0, "model.lora.alpha", "must be > 0 or null (2 x r)")
    _need(cfg, 0.0 <= lora.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
    if lora.target_parameters:
        _need(cfg, lora.r > 0, "model.lora.target_parameters", "needs LoRA (model.lora.r > 0)")
        _need(
            cfg,
            lora.dropout == 0,
            "model.lora.dropout",
            "must be 0 with model.lora.target_parameters (peft applies no dropout to a targeted parameter)",
        )
    _need(
        cfg,
        bool(lora.target_modules),
        "model.lora.target_modules",
        "must name at least one module (or all-linear)",
    )
    _need(
        cfg,
        lora.adapter_dtype in ADAPTER_DTYPES,
        "model.lora.adapter_dtype",
        "must be policy or float32",
    )


def _check_reference_sync(cfg: Config) -> None:
    """TR-DPO (model.reference_sync_steps): a reference model that can move, alpha in [0, 1]."""
    model = cfg.model
    _need(cfg, model.reference_sync_steps >= 0, "model.reference_sync_steps", "must be >= 0 (0: off)")
    _need(cfg, 0.0 <= model.reference_mixup_alpha <= 1.0, "model.reference_mixup_alpha", "must be in [0, 1]")
    if not model.reference_sync_steps:
        _need(
            cfg,
            model.reference_mixup_alpha == 0.6,
            "model.reference_mixup_alpha",
            "applies with model.reference_sync_steps > 0 only",
        )
        return
    mode = reference_mode(cfg)
    _need(
        cfg,
        mode != "precomputed",
        "model.reference_sync_steps",
        "moves the reference, but model.reference_mode=precomputed computed its log-probs once, before training",
    )
    _need(
        cfg,
        not (mode == "adapters_off" and cfg.model.lora.target_parameters),
        "model.reference_sync_steps",
        "moves a LoRA reference through adapters on modules; model.lora.target_parameters (fused expert weights) "
        "cannot take the reference adapter",
    )
    _need(
        cfg,
        not cfg.loss.reference_free,
        "model.reference_sync_steps",
        "moves a reference model, and loss.reference_free=true has none",
    )


def _check_reference_mode(cfg: Config) -> None:
    """model.reference_mode (resolved: never auto here) is a registered mode, and the mode's own checks
    (REFERENCE_MODES: what it needs of the config), after the LoRA keys they read."""
    mode = reference_mode(cfg)  # a config validate() is given unresolved means what resolve() would make it
    names = REFERENCE_MODES.names()
    _need(cfg, mode in names, "model.reference_mode", f"must be one of {names}")
    REFERENCE_MODES.get(mode).check(cfg, lambda ok, key, msg: _need(cfg, ok, key, msg))


def _check_model_weights(cfg: Config) -> None:
    model = cfg.model
    _need(cfg, bool(model.name_or_path), "model.name_or_path", "must name a model directory")
    _need(cfg, model.init in MODEL_INITS, "model.init", f"must be one of {MODEL_INITS}")
    if model.init == "random":
        _need(
            cfg,
            model.archive is None,
            "model.init",
            "is random, but model.archive gives the weights; pick one",
        )


def _check_batches_and_optimizer(cfg: Config) -> None:
    _need(cfg, cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
    _need(cfg, len(cfg.datasets) > 0, "datasets", "must list at least one dataset")
    _need(cfg, cfg.batch_size > 0, "batch_size", "must be > 0")
    _need(cfg, cfg.eval_batch_size > 0, "eval_batch_size", "must be > 0")
    _need(cfg, cfg.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be > 0")
    _need(
        cfg,
        cfg.batch_size % cfg.gradient_accumulation_steps == 0,
        "batch_size",
        f"must be divisible by gradient_accumulation_steps={cfg.gradient_accumulation_steps}",
    )
    _need(cfg, cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
    _need(cfg, cfg.lr > 0, "lr", "must be > 0")
    _need(cfg, cfg.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    _need(cfg, cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")


def _check_run_lengths(cfg: Config) -> None:
    """Sequence lengths, how long the run is, how much each eval does."""
    _need(cfg, cfg.max_length > 1, "max_length", "must be > 1")
    _need(cfg, cfg.max_prompt_length > 0, "max_prompt_length", "must be > 0")
    _need(
        cfg,
        cfg.max_prompt_length < cfg.max_length,
        "max_prompt_length",
        f"must be < max_length={cfg.max_length} so responses keep at least one token",
    )
    _need(cfg, cfg.n_epochs is None or cfg.n_epochs > 0, "n_epochs", "must be > 0 or null")
    _need(cfg, cfg.n_examples is None or cfg.n_examples > 0, "n_examples", "must be > 0 or null")
    _need(
        cfg,
        cfg.n_epochs is not None or cfg.n_examples is not None,
        "n_epochs",
        "and n_examples cannot both be null",
    )
    _need(cfg, cfg.n_eval_examples >= 0, "n_eval_examples", "must be >= 0")
    _need(cfg, cfg.eval_every > 0, "eval_every", "must be > 0")
    _need(cfg, cfg.n_eval_model_samples >= 0, "n_eval_model_samples", "must be >= 0")
    _need(cfg, cfg.max_new_tokens > 0, "max_new_tokens", "must be > 0")


def _check_runtime(cfg: Config) -> None:
    _need(cfg, cfg.torch_threads >= 0, "torch_threads", "must be >= 0")
    _need(cfg, cfg.log_every > 0, "log_every", "must be > 0")
    _need(cfg, cfg.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
    _need(cfg, cfg.step_timeout_s is None or cfg.step_timeout_s > 0, "step_timeout_s", "must be > 0 or null")


def _check_guard(cfg: Config) -> None:
    guard = cfg.guard
    _need(cfg, guard.max_bad_steps > 0, "guard.max_bad_steps", "must be > 0")
    drop = guard.max_chosen_drop_per_token
    _need(cfg, drop is None or drop >= 0, "guard.max_chosen_drop_per_token", "must be >= 0 or null")
    _need(cfg, guard.action in GUARD_ACTIONS, "guard.action", "must be warn or stop")


def _check_eval(cfg: Config) -> None:
    _need(cfg, cfg.eval.n_checked > 0, "eval.n_checked", "must be > 0")
    _need(
        cfg,
        cfg.eval.gather_for_generation in GATHER_MODES,  # lower-cased by resolve
        "eval.gather_for_generation",
        f"must be one of {GATHER_MODES}",
    )


def _check_checkpoint(cfg: Config) -> None:
    """What is saved, and the run's name (its default run dir)."""
    ckpt = cfg.checkpoint
    _need(cfg, ckpt.save_every >= 0, "checkpoint.save_every", "must be >= 0")
    _need(cfg, ckpt.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps every checkpoint)")
    _need(cfg, ckpt.max_failed_saves > 0, "checkpoint.max_failed_saves", "must be > 0")
    _need(
        cfg,
        bool(cfg.exp_name) and "/" not in cfg.exp_name,
        "exp_name",
        "must be a non-empty name without '/'",
    )


def _check_token_budget(cfg: Config) -> None:
    """The budget's sign; what a budget needs of the layout is _check_layout's."""
    _need(cfg, cfg.data.max_tokens_per_micro_batch >= 0, "data.max_tokens_per_micro_batch", "must be >= 0")


def _check_layout(cfg: Config) -> None:
    """Every check of data.layout: a known layout, the packing alias agrees, a token budget fits it."""
    data = cfg.data
    if data.packing:
        _need(
            cfg,
            data.layout in ("padded", "packed"),
            "data.packing",
            f"contradicts data.layout={data.layout}",
        )
    _need(cfg, data.layout in LAYOUTS, "data.layout", f"must be one of {LAYOUTS.names()}")
    if data.max_tokens_per_micro_batch:
        _need(
            cfg,
            LAYOUTS.get(data.layout).segmented,  # a budget of tokens needs rows that hold several sequences
            "data.max_tokens_per_micro_batch",
            "needs a packed layout (data.layout=packed or shared_prompt)",
        )
        _need(
            cfg,
            data.max_tokens_per_micro_batch >= 2 * cfg.max_length,
            "data.max_tokens_per_micro_batch",
            f"must hold one pair (2 * max_length = {2 * cfg.max_length} tokens)",
        )


def _check_parallel(cfg: Config) -> None:
    """Sequence parallelism, tiled MLP, packed row length, tokenizing processes, attention kernel."""
    _need(
        cfg,
        cfg.parallel.sequence_parallel_size >= 1,
        "parallel.sequence_parallel_size",
        "must be >= 1 (1: no sequence parallelism)",
    )
    _need(cfg, cfg.data.row_tokens >= 0, "data.row_tokens", "must be >= 0 (0: the layout's default)")
    _need(
        cfg,
        cfg.parallel.tiled_mlp_tokens >= 0,
        "parallel.tiled_mlp_tokens",
        "must be >= 0 (0: no tiled MLP)",
    )
    _need(cfg, cfg.data.num_proc >= 1, "data.num_proc", "must be >= 1")
    _need(
        cfg,
        cfg.model.attn_implementation in ATTN_IMPLEMENTATIONS,
        "model.attn_implementation",
        f"must be one of {ATTN_IMPLEMENTATIONS}",
    )


def _check_wandb(cfg: Config) -> None:
    _need(
        cfg,
        cfg.wandb.mode in WANDB_MODES,
        "wandb.mode",
        "must be online|offline|disabled",
    )
