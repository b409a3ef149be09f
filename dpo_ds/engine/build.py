"""Building the engines: the HF model (inside zero.Init under ZeRO-3), its starting weights, a LoRA
adapter merged in, then DeepSpeed's policy engine (with its optimizer) or inference-only reference engine."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from dpo_ds.config import Config, ConfigError
from dpo_ds.dist.comm import sync_max
from dpo_ds.engine.sequence_parallel import SequenceParallel
from dpo_ds.model.files import TORCH_DTYPES, ModelError, disable_dropout, load_config, resolve_model_dir
from dpo_ds.model.lm import LogprobLM

log = logging.getLogger("dpo_ds")


def _zero3(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("stage", 0) == 3


def build_lm(model_dir: Path, ds: dict, dtype: str, from_weights: bool, attn: str | None = None):
    """A HF causal LM built for `ds`: under ZeRO-3 its parameters are partitioned as they are created
    (HfDeepSpeedConfig makes transformers build inside deepspeed.zero.Init, and from_pretrained
    load each shard into the partitions), so no rank ever holds a full 70B model."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # zero.Init reads the ZeRO section; it checks the batch fields against the whole world, which under
    # sequence parallelism they do not count (data parallelism runs over world / N): its copy has no
    # train_batch_size, which DeepSpeed then derives, so only the engine (given the groups) checks it
    build = {k: v for k, v in ds.items() if k != "train_batch_size"}
    hf_ds = HfDeepSpeedConfig(build) if _zero3(ds) else None  # noqa: F841  (kept alive while building)
    try:
        config = load_config(model_dir)
        if attn == "dpo_ds_blocks":  # ours (attention.py): made a transformers implementation first
            from dpo_ds.model.attention import register

            register()
        elif attn == "flex_attention":  # on CPU, through torch's eager FlexAttention (attention.py)
            from dpo_ds.model.attention import flex_on_cpu

            flex_on_cpu()
        extra = {"attn_implementation": attn} if attn else {}
        if from_weights:
            lm = AutoModelForCausalLM.from_pretrained(
                str(model_dir), config=config, dtype=TORCH_DTYPES[dtype], **extra
            )
        else:
            lm = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype], **extra)
    finally:
        unset_hf_deepspeed_config()
    disable_dropout(lm)
    return lm


def _tensors(lm: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by name (tied weights once), the things a state dict holds."""
    return list(lm.named_parameters()) + list(lm.named_buffers())


def load_state(lm: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a full state dict into `lm`, partitioned (ZeRO-3) or not, after checking the keys.

    Tied weights (lm_head and embed_tokens as one tensor) need one of their names: policy.pt has
    both, a Hugging Face safetensors file only one. Under ZeRO-3 each parameter is gathered in turn,
    rank 0 writes it, and DeepSpeed re-partitions it: every rank must call this (all do, in the same
    order)."""
    import deepspeed

    names_of: dict[int, list[str]] = {}  # one entry per tensor: all its state-dict names
    for name, t in lm.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(name)
    expected = {n for names in names_of.values() for n in names}
    missing = sorted(names[0] for names in names_of.values() if not any(n in state for n in names))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(
            f"{source}: state keys do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            f" ({len(missing)}), unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    # Shapes are checked on every rank before any gather (ds_shape: a ZeRO-3 parameter's full shape).
    # Checked on rank 0 inside the gather, the other ranks would go on into the next collective and
    # die on a closed peer (gloo) or hang (NCCL) instead of failing with the same message.
    sources = []  # (parameter or buffer, the state entry it takes)
    for name, p in _tensors(lm):
        present = [n for n in names_of.get(id(p), [name]) if n in state]
        if not present:
            continue  # a non-persistent buffer (rotary inv_freq): not saved, rebuilt by the model
        src = state[present[0]]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(src.shape) != shape:
            raise ModelError(f"{source}: '{present[0]}' has shape {tuple(src.shape)}, model has {shape}")
        sources.append((p, src))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with torch.no_grad():
        for p, src in sources:
            zero3 = hasattr(p, "ds_id")
            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else nullcontext()
            with ctx:
                if rank == 0 or not zero3:
                    p.copy_(src.to(p.dtype))


def build_base(model_dir: Path, ds: dict, dtype: str, start, attn: str | None = None):
    """The HF model a run starts from (start.Start): built for `ds` (inside zero.Init under ZeRO-3),
    filled with the starting state, and with any LoRA adapter the start names merged into it."""
    lm = build_lm(model_dir, ds, dtype, from_weights=start.from_weights, attn=attn)
    if start.state is not None:
        load_state(lm, start.state, start.source)
    for adapter in start.adapters:
        merge_adapter(lm, adapter)
    return lm


def merge_adapter(lm, adapter_dir: Path) -> None:
    """Merge a saved LoRA adapter into lm's own weights, partitioned (ZeRO-3) or not, with peft's merge:
    the adapter is loaded beside the base, each wrapped layer's weight is gathered (every rank, same
    order) and merged on rank 0, then the adapter layers go and the base modules stay."""
    import deepspeed
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with torch.no_grad():
        for module in peft_model.modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            zero3 = hasattr(weight, "ds_id")
            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0) if zero3 else nullcontext():
                if rank == 0 or not zero3:
                    module.merge()
    peft_model.unload()  # lm's modules are the base ones again, their weights merged


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _without_muon_compile(ds: dict) -> None:
    """DeepSpeed's ZeRO and bf16 optimizers import their Muon optimizer's module to ask whether ours is a
    Muon (isinstance), and importing it compiles Muon's kernels with torch.compile: ~3-4 s per rank at
    every launch, a third of a small run's start on CPU, for an optimizer no dpo_ds config names. Unless
    the DeepSpeed JSON asks for Muon, that module is a stand-in whose MuonWithAuxAdam nothing is an
    instance of, which is the answer the real one gives; DeepSpeed imports nothing else from it then."""
    import sys
    import types

    wanted = str((ds.get("optimizer") or {}).get("type", "")).lower()
    if "muon" in wanted or MUON_MODULE in sys.modules:
        return
    stand_in = types.ModuleType(
        MUON_MODULE, "dpo_ds: DeepSpeed's Muon module, not imported (no Muon optimizer)"
    )

    class MuonWithAuxAdam:  # never instantiated: isinstance(x, it) is False for every optimizer
        pass

    stand_in.MuonWithAuxAdam = MuonWithAuxAdam
    sys.modules[MUON_MODULE] = stand_in


def tile_mlps(lm, tokens: int) -> int:
    """parallel.tiled_mlp_tokens: each decoder layer's MLP (`layers[i].mlp`) through DeepSpeed's TiledMLP
    when a backward follows (training forwards, and their recomputation under gradient checkpointing), over
    tiles of `tokens` tokens (ALST uses hidden_size), the count agreed over every rank (ZeRO-3 gathers a layer's
    weights once per tile: the ranks must run as many). Forwards without grad (eval, generation, whose
    ranks may run different numbers of steps) stay whole. Before LoRA wraps the model: the MLP's own
    forward then calls the adapters' layers. Returns how many MLPs were tiled."""
    import math

    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(module):
        forward = type(module).forward

        def tiled_forward(x):
            if not torch.is_grad_enabled():  # eval, generation, the reference: nothing kept for a backward
                return forward(module, x)
            shards = math.ceil(x.shape[-2] / tokens)
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                shards = sync_max(shards)
            if shards <= 1:
                return forward(module, x)
            params = [p for p in module.parameters() if p.requires_grad]
            return TiledMLP.apply(forward, module, x, shards, params)

        return tiled_forward

    mlps = [m for name, m in lm.named_modules() if name.endswith(".mlp") and ".layers." in name]
    if not mlps:
        raise ConfigError(
            "config key 'parallel.tiled_mlp_tokens': the model has no decoder-layer MLPs named layers.N.mlp to tile"
        )
    for m in mlps:
        m.forward = tiled(m)
    return len(mlps)


def set_leaf_modules(lm, ds: dict) -> None:
    """ZeRO-3 and an MoE block that runs its experts one module each (model/moe.py PER_EXPERT_BLOCKS): the
    block becomes a DeepSpeed leaf, its parameters gathered at its entry on every rank, whichever experts
    this rank's tokens pick, so no rank waits on a gather the others never make."""
    from dpo_ds.model import moe

    if ds.get("zero_optimization", {}).get("stage", 0) != 3:
        return
    classes, _ = moe.per_expert_blocks(lm)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(lm, classes)
        log.info(f"ZeRO-3 leaf modules: {', '.join(c.__name__ for c in classes)} (each gathered whole)")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiple of lr the optimizer step `step` (0-based) uses: (step + 1) / (warmup + 1) while warming up,
    then 1 (`constant`, the original DPO code's), or down to 0 at the last of `total` steps, linearly
    (`linear`) or along a half cosine (`cosine`)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    left = max(total - warmup, 1)
    done = min(max(step - warmup, 0) / left, 1.0)
    return 1.0 - done if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def reference_adapter_rank(cfg: Config, total_steps: int) -> int:
    """TR-DPO under LoRA: the columns the reference adapter needs (reference_sync.mix_reference_adapter): r for
    the hard update, else r for each sync the run's total_steps make."""
    r, every = cfg.model.lora.r, cfg.model.reference_sync_steps
    return r if cfg.model.reference_mixup_alpha == 1.0 else r * max(1, total_steps // every)


def build_policy(lm, ds: dict, cfg: Config, sp: SequenceParallel | None = None, total_steps: int = 0):
    import deepspeed

    from dpo_ds.model import adapters, moe, router

    _without_muon_compile(ds)

    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.parallel.tiled_mlp_tokens:
        n = tile_mlps(lm, cfg.parallel.tiled_mlp_tokens)
        log.info(
            f"parallel.tiled_mlp_tokens: {n} MLPs run in tiles of {cfg.parallel.tiled_mlp_tokens} tokens (DeepSpeed's TiledMLP)"
        )
    if (
        cfg.model.freeze_router
    ):  # the routers fixed (checked at launch: an MoE whose routers transformers names)
        n = router.freeze_routers(lm)
        log.info(f"model.freeze_router: {n} router parameters frozen")
    if cfg.model.lora.r:  # the base frozen; only the adapters train (adapters.py)
        base = resolve_model_dir(cfg.model.name_or_path)
        lm = adapters.wrap(lm, cfg.model.lora, cfg.seed, cfg.model.gradient_checkpointing, base)
        if cfg.model.reference_sync_steps:  # TR-DPO: the moved reference's own frozen adapter
            rank = reference_adapter_rank(cfg, total_steps)
            adapters.add_reference_adapter(lm, rank, cfg.model.lora.adapter_dtype == "float32")
            log.info(
                f"TR-DPO: a reference adapter of rank {rank} beside the policy's (rank {cfg.model.lora.r})"
            )
        trainable = [p for p in lm.parameters() if p.requires_grad]
        frozen = [p for p in lm.parameters() if not p.requires_grad]
        log.info(
            f"LoRA: {sum(adapters.full_numel(p) for p in trainable) / 1e6:.2f}M adapter parameters in {trainable[0].dtype} "
            f"train, {sum(adapters.full_numel(p) for p in frozen) / 1e6:.2f}M base parameters in {frozen[0].dtype} are frozen"
        )
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for note in moe.launch_notes(lm, lora=bool(cfg.model.lora.r)) if first else []:
        log.warning(note)  # an MoE model: what dpo_ds does not do for it, said once
    set_leaf_modules(lm, ds)
    # an MoE's router loss (router.ROUTERS); LD-DPO's token weights (loss.ld_alpha); WPO's log sum p^2 (loss.wpo)
    model = LogprobLM(
        lm, cfg.model.logprob_impl, sp, router=True, ld_alpha=cfg.loss.ld_alpha, wpo=cfg.loss.wpo
    )
    optimizer = None
    if cfg.optimizer == "RMSprop" and "optimizer" not in ds:
        # the original DPO code's default; the trainable parameters only (LoRA: the adapters)
        optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    def schedule(opt):
        # linear warmup to lr over warmup_steps optimizer steps, then cfg.lr_schedule (lr_factor)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.lr_schedule)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None
        if optimizer is not None
        else [p for p in model.parameters() if p.requires_grad],
        lr_scheduler=schedule,
        config=ds,
        **({"mpu": sp.mpu} if sp is not None else {}),
    )
    return engine


def build_reference(lm, ds: dict, cfg: Config, sp: SequenceParallel | None = None):
    import deepspeed

    lm.requires_grad_(False)
    set_leaf_modules(lm, ds)
    # an MoE's expert load at eval; LD-DPO weighs the reference's tokens as the policy's
    model = LogprobLM(lm, cfg.model.logprob_impl, sp, router=True, ld_alpha=cfg.loss.ld_alpha)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds, **({"mpu": sp.mpu} if sp is not None else {})
    )
    engine.eval()
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_param", {}).get("device", "none")
    log.info(
        f"reference engine: ZeRO stage {zero.get('stage', 0)}, {cfg.model.reference_dtype}, "
        f"parameters offloaded to {offload}"
    )
    return engine


def destroy(engine) -> None:
    """Give an engine's memory back: DeepSpeed's hooks and partitioned parameters hold references
    to the module, so dropping the engine object alone frees nothing."""
    import gc

    engine.destroy()
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the rank's partition lives here, p.data is a placeholder
            p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)  # a full copy (stage 0)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
