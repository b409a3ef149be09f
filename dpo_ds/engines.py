"""Everything that touches DeepSpeed: distributed init, the two engines, backward/step, collectives,
checkpoints. The trainer sees only the small surface below.

Policy: `deepspeed.initialize` with an optimizer; its ZeRO stage, offload and precision come from the
user's DeepSpeed JSON, with "auto" fields filled from the dpo_ds config (and explicit values that
contradict the config rejected). Reference: a second, inference-only engine (no optimizer) built
from a config derived from the policy's: its own dtype, ZeRO-3 with optional CPU parameter offload
when the policy is ZeRO-3, plain (stage 0) otherwise -- a frozen model has no optimizer state or
gradients to partition, so below stage 3 ZeRO buys it nothing.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ds.checkpoint import DS_TAG, ds_dir
from dpo_ds.config import Config, ConfigError
from dpo_ds.launcher import free_port
from dpo_ds.model import TORCH_DTYPES, LogprobLM, ModelError, disable_dropout, load_config, resolve_model_dir

log = logging.getLogger("dpo_ds")


# ----------------------------------------------------------------------------- distributed


def set_threads(n: int, on_cpu: bool) -> None:
    """On CPU every rank defaults to all cores; 2 ranks x N threads on N cores thrash (14x slower
    seen on 2 cores), so CPU ranks take 1 thread unless told otherwise."""
    if n > 0:
        torch.set_num_threads(n)
    elif on_cpu:
        torch.set_num_threads(1)


# The process group's timeout is a backstop behind the watchdog (which polls twice a second): were
# they equal, gloo's own exception would often win the race and the hang report would be lost.
BACKEND_TIMEOUT_MARGIN_S = 60.0


def init_distributed(torch_threads: int = 0, timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size, device).

    Works under the `deepspeed` launcher, torchrun, and a bare `python` (a world of one). timeout_s
    is the watchdog's deadline for a collective; the process group's own timeout (gloo raises, NCCL
    aborts) is BACKEND_TIMEOUT_MARGIN_S later, so the watchdog reports first, with every stack."""
    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    set_threads(torch_threads, on_cpu)
    if on_cpu and os.environ.get("DPO_DS_CPU_SHM", "0") != "1":
        # The CPU accelerator JIT-compiles a shared-memory all-reduce (~2 min) on first use; gloo is
        # fine for CPU runs. Patch the module object itself: `import deepspeed.comm.torch as m`
        # binds the real `torch` package instead.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # torch.distributed.nn binds `group=group.WORLD` as default arguments when first imported (by
    # transformers/accelerate, when a tokenizer loads): imported after the process group exists, it
    # pins the group forever, destroy_process_group() cannot join gloo's threads, and one of them
    # may take the GIL during interpreter shutdown ('terminate called without an active exception',
    # exit 250, seen about one run in six). Imported first, the defaults are None.
    importlib.import_module("torch.distributed.nn")
    if timeout_s is not None:
        from datetime import timedelta

        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s + BACKEND_TIMEOUT_MARGIN_S))
    else:
        deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    acc.set_device(local_rank)
    device = torch.device(acc.device_name(local_rank)) if not on_cpu else torch.device("cpu")
    return rank, world, device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def sync_max(n: int) -> int:
    t = torch.tensor([n], dtype=torch.long, device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def across_ranks(values: list[float]) -> torch.Tensor:
    """(world, len(values)) float64: every rank's values, in one all-reduce (each rank fills its row)."""
    t = torch.zeros(
        torch.distributed.get_world_size(), len(values), dtype=torch.float64, device=comm_device()
    )
    t[torch.distributed.get_rank()] = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(t).cpu()


def memory_across_ranks(named: dict[str, float]) -> dict[str, float]:
    """Rank 0's memory figures as given, plus for each the largest over the ranks and which rank has it
    (`memory/peak_gib` -> `memory/peak_gib_max`, `memory/peak_gib_max_rank`): rank 0 holds what the
    other ranks do not (the save's writer, the metrics), and the rank that runs out is the one to know."""
    names = list(named)
    table = across_ranks([named[k] for k in names])  # (world, k)
    out = {k: float(table[0, i]) for i, k in enumerate(names)}
    for i, k in enumerate(names):
        r = int(table[:, i].argmax())
        out[f"{k}_max"], out[f"{k}_max_rank"] = float(table[r, i]), r
    return out


def all_gather_objects(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def peak_memory_gib() -> float:
    """This rank's peak memory since reset_peak_memory(): device allocations on a GPU, the process's
    resident-set high-water mark (VmHWM) on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    return kib / 2**20


def reset_peak_memory() -> None:
    """Start peak_memory_gib() over from now (the build phase's peak is not training's)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        pass


def broadcast_from_rank0(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_rank0(decide, errors: tuple[type[BaseException], ...] = (Exception,)):
    """decide() run on rank 0 alone, its result given to every rank; an exception of `errors` it raises
    is raised on every rank alike (same type, same message). With node-local disks ranks can see
    different files, and one rank raising alone would leave the others waiting in the next collective:
    so rank 0 looks and decides for all. Every rank must call this, in the same order."""
    outcome = None
    if torch.distributed.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except errors as e:
            outcome = ("error", type(e), str(e))
    outcome = broadcast_from_rank0(outcome)
    if outcome[0] == "error":
        _, cls, message = outcome
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments: still raised alike everywhere
            error = RuntimeError(f"{cls.__name__}: {message}")
        raise error
    return outcome[1]


def barrier() -> None:
    torch.distributed.barrier()


def say(message: str) -> None:
    """A line on stderr in one write: ranks print their refusals at once into one pipe, and print()'s
    separate write of the newline let two ranks' messages run into one line."""
    import sys

    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def part_together(timeout_s: float = 30.0) -> None:
    """Before a rank exits on an error raised on every rank alike: wait (at most timeout_s) until every
    rank has reached this point, so each has printed its message before the launcher, seeing the first
    rank exit, kills the rest mid-sentence. A rank that never arrives (an error raised on one rank only)
    costs the others timeout_s, never a hang."""
    import threading

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    waiter = threading.Thread(target=torch.distributed.barrier, daemon=True)
    waiter.start()
    waiter.join(timeout_s)


def shutdown() -> None:
    """Tear the process group down while Python is alive: this joins gloo's worker threads, which,
    left running into interpreter shutdown, can abort the process there (see init_distributed)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def comm_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.current_device_name())


# ----------------------------------------------------------------------------- DeepSpeed JSON


def _fill(
    ds: dict, key: str, want, source: str, path: str, where: dict | None = None, label: str | None = None
):
    """Set ds[key] to `want` when missing or "auto"; an explicit different value is an error."""
    where = ds if where is None else where
    have = where.get(key, "auto")
    if have == "auto":
        where[key] = want
    elif have != want:
        raise ConfigError(
            f"{path}: '{label or key}' is {have!r} but the dpo_ds config gives {want!r} ({source}); "
            f'set it to "auto" or make the two agree'
        )


def resolve_ds_config(path: str, cfg: Config, world: int, on_cpu: bool) -> dict:
    """Read the user's DeepSpeed JSON and make it agree with the dpo_ds config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds {path}: DeepSpeed config file not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds {path}: must hold a JSON object")

    gas = cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * gas):
        raise ConfigError(
            f"config key 'batch_size': {cfg.batch_size} must be divisible by world_size x "
            f"gradient_accumulation_steps = {world} x {gas}"
        )
    if cfg.eval_batch_size % world:
        raise ConfigError(
            f"config key 'eval_batch_size': {cfg.eval_batch_size} must be divisible by world_size {world}"
        )
    _fill(ds, "train_batch_size", cfg.batch_size, "batch_size", path)
    _fill(ds, "gradient_accumulation_steps", gas, "gradient_accumulation_steps", path)
    micro = cfg.batch_size // (world * gas)
    _fill(
        ds,
        "train_micro_batch_size_per_gpu",
        micro,
        "batch_size / (world_size x gradient_accumulation_steps)",
        path,
    )
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "max_grad_norm", path)

    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        block = ds.setdefault(section, {"enabled": "auto"})
        if not isinstance(block, dict):
            raise ConfigError(f'{path}: \'{section}\' must be an object like {{"enabled": "auto"}}')
        want = cfg.model.policy_dtype == dtype
        _fill(
            ds,
            "enabled",
            want,
            f"model.policy_dtype={cfg.model.policy_dtype}",
            path,
            block,
            f"{section}.enabled",
        )

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")

    if "scheduler" in ds:
        raise ConfigError(
            f"{path}: remove the 'scheduler' block; dpo_ds builds the linear warmup from warmup_steps={cfg.warmup_steps}"
        )
    opt = ds.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or "type" not in opt:
            raise ConfigError(f"{path}: 'optimizer' must be an object with a 'type'")
        if cfg.optimizer not in ("auto", opt["type"]):
            raise ConfigError(
                f"{path}: 'optimizer.type' is {opt['type']!r} but the config key 'optimizer' is {cfg.optimizer!r}; "
                f"remove the JSON's optimizer block to use {cfg.optimizer}, or make them agree"
            )
        params = opt.setdefault("params", {})
        _fill(ds, "lr", cfg.lr, "lr", path, params, "optimizer.params.lr")
        if on_cpu and opt["type"].lower() in ("adam", "adamw"):
            # DeepSpeed's fused/CPU Adam would be JIT-compiled here (minutes); torch's Adam is fine on CPU.
            params.setdefault("torch_adam", True)
    elif cfg.optimizer in ("auto", "AdamW", "Adam"):
        ds["optimizer"] = {
            "type": "AdamW" if cfg.optimizer == "auto" else cfg.optimizer,
            "params": {"lr": cfg.lr, **({"torch_adam": True} if on_cpu else {})},
        }
    elif zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # A torch RMSprop on offloaded states is slow but correct; DeepSpeed refuses it unless told.
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)  # dpo_ds logs itself
    return ds


def reference_ds_config(policy_ds: dict, cfg: Config) -> dict:
    """Inference-only config for the frozen reference: same batch fields (DeepSpeed checks them),
    its own precision, no optimizer. Its placement is its own: ZeRO-3 (parameters sharded over the
    ranks, optionally on CPU) or stage 0 (a whole copy per rank, no gathers), by
    model.reference_zero_stage; by default it follows the policy (3 when the policy is ZeRO-3)."""
    ref = {
        k: copy.deepcopy(policy_ds[k])
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    }
    ref["bf16"] = {"enabled": cfg.model.reference_dtype == "bfloat16"}
    ref["fp16"] = {"enabled": cfg.model.reference_dtype == "float16"}
    ref["steps_per_print"] = 10**9
    policy_stage = policy_ds.get("zero_optimization", {}).get("stage", 0)
    stage = cfg.model.reference_zero_stage
    if stage is None:
        stage = 3 if policy_stage == 3 else 0
    if stage == 3:
        src = policy_ds.get("zero_optimization", {})
        zero = {"stage": 3}
        for k in (
            "stage3_param_persistence_threshold",
            "stage3_prefetch_bucket_size",
            "stage3_max_live_parameters",
        ):
            if k in src:
                zero[k] = src[k]
        if cfg.model.reference_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        ref["zero_optimization"] = zero
    else:
        if cfg.model.reference_offload:
            raise ConfigError(
                "config key 'model.reference_offload': needs a ZeRO-3 reference (a ZeRO-3 policy config, or "
                "model.reference_zero_stage=3)"
            )
        ref["zero_optimization"] = {"stage": 0}
    return ref


# ----------------------------------------------------------------------------- models


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
            from dpo_ds.attention import register

            register()
        elif attn == "flex_attention":  # on CPU, through torch's eager FlexAttention (attention.py)
            from dpo_ds.attention import flex_on_cpu

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


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3 parameter's full size


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
                count = torch.tensor(shards, device=x.device)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                shards = int(count.item())
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


def build_policy(lm, ds: dict, cfg: Config, sp: SequenceParallel | None = None):
    import deepspeed

    from dpo_ds import adapters

    _without_muon_compile(ds)

    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.parallel.tiled_mlp_tokens:
        n = tile_mlps(lm, cfg.parallel.tiled_mlp_tokens)
        log.info(
            f"parallel.tiled_mlp_tokens: {n} MLPs run in tiles of {cfg.parallel.tiled_mlp_tokens} tokens (DeepSpeed's TiledMLP)"
        )
    if cfg.model.lora.r:  # the base frozen; only the adapters train (adapters.py)
        base = resolve_model_dir(cfg.model.name_or_path)
        lm = adapters.wrap(lm, cfg.model.lora, cfg.seed, cfg.model.gradient_checkpointing, base)
        trainable = [p for p in lm.parameters() if p.requires_grad]
        frozen = [p for p in lm.parameters() if not p.requires_grad]
        log.info(
            f"LoRA: {sum(_numel(p) for p in trainable) / 1e6:.2f}M adapter parameters in {trainable[0].dtype} "
            f"train, {sum(_numel(p) for p in frozen) / 1e6:.2f}M base parameters in {frozen[0].dtype} are frozen"
        )
    model = LogprobLM(lm, cfg.model.logprob_impl, sp)
    optimizer = None
    if cfg.optimizer == "RMSprop" and "optimizer" not in ds:
        # the original DPO code's default; the trainable parameters only (LoRA: the adapters)
        optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    warmup = cfg.warmup_steps

    def schedule(opt):
        # linear warmup to lr over warmup_steps optimizer steps, then constant (as in the original)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))

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
    model = LogprobLM(lm, cfg.model.logprob_impl, sp)
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


def memory_now_gib() -> float:
    """This rank's memory now: device allocations on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


# ----------------------------------------------------------------------------- train surface


def backward(engine, loss: torch.Tensor, last_micro_batch: bool) -> None:
    """Accumulate one micro-batch; the optimizer steps on the last one of the step.

    The loss arrives already normalised over the whole global batch, so DeepSpeed must not divide
    by gradient_accumulation_steps again (the packed path runs a variable number of micro-batches)."""
    engine.set_gradient_accumulation_boundary(last_micro_batch)
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def grad_norm(engine) -> float:
    n = engine.get_global_grad_norm()
    return float(n) if n is not None else float("nan")


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def apply_lr(engine, lr: float) -> None:
    """Make a resumed engine use the configured lr (allowed by resume.allow_changes): the checkpoint
    restored the scheduler's base lr and the optimizer's current one, both from the old run."""
    sched = engine.lr_scheduler
    sched.base_lrs = [lr for _ in sched.base_lrs]
    for group, fn in zip(engine.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(sched.last_epoch)


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def local_weights_finite(engine) -> bool:
    """Whether this rank's parameters (its ZeRO-3 partition, or the whole model) are all finite; no
    gathering. For the guard: ZeRO stages 1-3 discard a step with a non-finite gradient norm; a stage
    0 optimizer applies it."""
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        if t.numel() and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def unwrap_lm(engine):
    return engine.module.lm


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are ZeRO-3 partitions (a forward gathers them collectively)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def free_memory_bytes() -> int:
    """Memory this rank could still take: free device memory on a GPU; on CPU the node's MemAvailable
    shared by its ranks (LOCAL_WORLD_SIZE / LOCAL_SIZE, as the launchers set them)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("MemAvailable:")), 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return kib * 1024 // max(local, 1)


# ----------------------------------------------------------------------------- sequence parallelism


@dataclass
class SequenceParallel:
    """This rank's sequence-parallel group (DeepSpeed Ulysses, ALST): `size` consecutive ranks share each
    row, this one holding piece `rank` of it (data/layout.MicroBatch.shard). mpu: DeepSpeed's
    parallel_state_sp, given to deepspeed.initialize so that data parallelism runs over world / size.
    grad_scale: what model.SumOverGroup multiplies each piece's gradient by (see start_sequence_parallel)."""

    size: int
    rank: int
    group: object
    grad_scale: float
    mpu: object


_SP_ACTIVE = [True]  # off while generating: prompts are whole on every rank, attention unsharded


def sequence_parallel_place(rank: int, world: int, size: int) -> tuple[int, int, int]:
    """(data-parallel rank, its rank in its group, the data-parallel world): groups are consecutive ranks,
    as DeepSpeed's parallel_state_sp builds them; a world they do not divide is refused."""
    if world % size:
        raise ConfigError(
            f"config key 'parallel.sequence_parallel_size': {size} does not divide the world of {world} ranks"
        )
    return rank // size, rank % size, world // size


def check_sequence_parallel(size: int, model_dir: Path) -> None:
    """Before any engine: heads the group can split (Ulysses gives each rank 1/size of the query heads,
    and of the KV heads, or replicates them when there are fewer). The world: sequence_parallel_place."""
    if size == 1:
        return
    key = "config key 'parallel.sequence_parallel_size'"
    text = load_config(model_dir).get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ConfigError(f"{key}: {size} does not divide the model's {heads} attention heads ({model_dir})")
    if kv % size and size % kv:
        raise ConfigError(
            f"{key}: {size} and the model's {kv} key/value heads do not divide one another ({model_dir})"
        )


def start_sequence_parallel(size: int, attn: str, model_dir: Path, stage: int) -> SequenceParallel | None:
    """The groups, and the model's core attention (`attn`, which the layout chose) wrapped in DeepSpeed's
    UlyssesSPAttentionHF for every forward of the process (both engines; the reference shares it): each
    rank sends its piece of every head and gets the whole sequence of 1/size of the heads, runs the core
    attention on it, and sends it back. One Ulysses module per row count (it is built for a fixed one and
    checks every call against it). Generation pauses it (gathered_for_generation).

    The gradient: every rank of a group computes the same loss from the summed pieces; with the identity
    backward each parameter's gradient summed over the group is the sequence's gradient once. ZeRO-1/2
    sum gradients over every rank and divide by the data-parallel world (world / size): right as it is.
    ZeRO-3's reduce-scatter divides by the whole world, size times more: each piece's gradient is
    multiplied by size to make up for it (tests/test_sequence_parallel.py measures both against SP 1)."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attn == "dpo_ds_blocks":
        from dpo_ds.attention import register

        register()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    group = mpu.get_sequence_parallel_group()
    text = load_config(model_dir).get_text_config()
    core = ALL_ATTENTION_FUNCTIONS[attn]
    by_rows: dict[int, UlyssesSPAttentionHF] = {}

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not _SP_ACTIVE[0]:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        rows = query.shape[0]
        if rows not in by_rows:
            ulysses = UlyssesSPAttentionHF(
                attn=core,
                batch_size=rows,
                attn_head_count=text.num_attention_heads,
                attn_head_size=getattr(text, "head_dim", None)
                or text.hidden_size // text.num_attention_heads,
                kv_head_count=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                num_hidden_layers=text.num_hidden_layers,
                process_group=group,
                seq_length_is_variable=True,
            )
            ulysses.core_attn_implementation = attn
            by_rows[rows] = ulysses
        groups = getattr(module, "num_key_value_groups", None)  # Ulysses resets it when KV heads repeat
        try:
            # no mask: the core is causal (padded rows) or reads the spans (dpo_ds_blocks)
            return by_rows[rows](module, query, key, value, None, *args, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups

    ALL_ATTENTION_FUNCTIONS[attn] = attention
    log.info(
        f"sequence parallelism: groups of {size} ranks share each row (DeepSpeed Ulysses over {attn}); "
        f"data parallelism over {torch.distributed.get_world_size() // size}"
    )
    return SequenceParallel(
        size, mpu.get_sequence_parallel_rank(), group, float(size if stage == 3 else 1), mpu
    )


@contextmanager
def sequence_parallel_paused():
    was = _SP_ACTIVE[0]
    _SP_ACTIVE[0] = False
    try:
        yield
    finally:
        _SP_ACTIVE[0] = was


# A model gathered for generation may take this share of the free memory (the generation's
# activations and KV cache need the rest).
GATHER_MEMORY_SHARE = 0.5


@contextmanager
def gathered_for_generation(engine, mode: str):
    """_gathered_for_generation's, with sequence parallelism paused: under it each rank generates from
    its own whole prompts (data-parallel), attention unsharded."""
    with sequence_parallel_paused(), _gathered_for_generation(engine, mode) as out:
        yield out


@contextmanager
def _gathered_for_generation(engine, mode: str):
    """(the HF model to call generate on, what was done, whether the ranks must step together).

    Under ZeRO-3 a generate through DeepSpeed's hooks fetches and releases every submodule's
    parameters for every token; and once an engine's parameter trace holds an earlier generate (a
    forward-only reference engine records one at its first eval, then replays it), each release walks
    the rest of that trace: a cost quadratic in the tokens generated, paid at every eval. So:

      mode true, or auto when a full copy fits in GATHER_MEMORY_SHARE of the free memory on every rank:
          the whole model is gathered once, the module hooks are taken off for the generation and put
          back after it (as TRL does under ZeRO-3), and each rank generates on its own;
      otherwise (false, or auto when it does not fit): DeepSpeed's per-module gathers, the memory stays
          sharded, the trace is invalidated first so no release walks a stale one, and the ranks step
          together (synced_gpus).

    Every rank makes the same choice (a gather is a collective). Greedy output is the same either way.
    """
    import deepspeed

    lm = unwrap_lm(engine)
    if not is_partitioned(engine.module):
        yield lm, "the model is whole on every rank", False
        return
    params = list(engine.module.parameters())
    need = sum(p.ds_numel * p.element_size() for p in params)  # bytes of one full copy
    fits = need <= GATHER_MEMORY_SHARE * free_memory_bytes()
    fits_everywhere = sync_max(0 if fits else 1) == 0  # one collective, so every rank decides alike
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # inference: the offload
    gib = need / 2**30
    if mode == "false" or (mode == "auto" and not fits_everywhere):
        why = (
            "eval.gather_for_generation=false"
            if mode == "false"
            else "a full copy does not fit on every rank"
        )
        coordinator = offload.get_param_coordinator()
        # (DPO_DS_GENERATION_KEEP_TRACE=1 keeps DeepSpeed's own behaviour: bench/generation.py's 'before')
        if os.environ.get("DPO_DS_GENERATION_KEEP_TRACE") != "1" and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        yield lm, f"per-module ZeRO-3 gathers, memory stays sharded ({why}; a full copy: {gib:.2f} GiB)", True
        return
    with deepspeed.zero.GatheredParameters(params):  # modifier_rank=None: read-only, released on exit
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield lm, f"the whole model gathered for it ({gib:.2f} GiB per rank), then released", False
        finally:
            offload._register_deepspeed_module(offload.module)  # the hooks back; invalidates the trace


class SaveError(RuntimeError):
    """A checkpoint that was not written (or must not become LATEST); raised on every rank alike."""


def save_weights(engine, step_dir: Path, step_idx: int, metrics: dict) -> None:
    """The step dir's weights: policy.pt (the full model), or with LoRA the adapter alone in peft's
    format; nothing gathers the base of a LoRA policy."""
    from dpo_ds import adapters
    from dpo_ds.checkpoint import policy_file

    if adapters.is_lora(unwrap_lm(engine)):
        save_adapter(engine, step_dir)
    else:
        save_policy(engine, policy_file(step_dir), step_idx, metrics)


def save_adapter(engine, step_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) in step_dir: every rank gathers
    each adapter parameter in turn (ZeRO-3), rank 0 keeps a copy and writes; SaveError on every rank if
    it could not."""
    import deepspeed
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from dpo_ds.adapters import ADAPTER_WEIGHTS

    peft_model = unwrap_lm(engine)
    rank = torch.distributed.get_rank()
    state = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        zero3 = hasattr(p, "ds_id")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero3 else nullcontext():
            if rank == 0:
                state[name] = p.detach().clone().cpu().contiguous()

    def write():
        adapter = get_peft_model_state_dict(peft_model, state_dict=state)
        tmp = Path(step_dir) / f".{ADAPTER_WEIGHTS}.tmp"
        save_file(adapter, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, Path(step_dir) / ADAPTER_WEIGHTS)
        config = peft_model.peft_config["default"]
        config.save_pretrained(str(step_dir))

    try:
        decided_by_rank0(write, (OSError, RuntimeError, ValueError))
    except (OSError, RuntimeError, ValueError) as e:
        raise SaveError(f"{step_dir}: the adapter: {type(e).__name__}: {e}") from None


def save_policy(engine, path: Path, step_idx: int, metrics: dict) -> None:
    """{'step_idx', 'state', 'metrics'} at `path`, as torch.save would write the HF model's state dict,
    streamed while gathering: every rank gathers one ZeRO-3 parameter at a time, rank 0 writes its
    bytes and drops it, so no rank ever holds more than the largest tensor beyond its own shard. The
    weights are checked finite on the way. Every rank must call this; every rank raises SaveError
    alike if rank 0 could not write the file (which is then absent) or found non-finite weights."""
    import deepspeed

    from dpo_ds.archive_writer import STATE, ArchiveWriter, TensorSpec

    lm = unwrap_lm(engine)
    rank = torch.distributed.get_rank()
    state = lm.state_dict(keep_vars=True)  # names in state-dict order; tied names share one tensor
    first: dict[int, str] = {}
    specs = []
    for name, t in state.items():
        owner = first.setdefault(id(t), name)
        shape = tuple(getattr(t, "ds_shape", t.shape))  # a ZeRO-3 parameter's full shape
        specs.append(TensorSpec(name, shape, t.dtype, alias_of=None if owner == name else owner))
    error, nonfinite = None, []
    writer = None
    if rank == 0:
        try:
            writer = ArchiveWriter(path, {"step_idx": step_idx, "state": STATE, "metrics": metrics}, specs)
            writer.__enter__()
        except Exception as e:  # noqa: BLE001 - reported on every rank below, after the gathers
            error, writer = f"{type(e).__name__}: {e}", None
    for name, t in state.items():
        if first[id(t)] != name:
            continue
        zero3 = hasattr(t, "ds_id")
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None) if zero3 else nullcontext():
            if writer is not None:
                try:
                    full = t.detach()
                    # in chunks: a whole isfinite() mask of the largest tensor would be a second copy of it
                    if full.is_floating_point() and not all(
                        bool(torch.isfinite(c).all()) for c in full.reshape(-1).split(1 << 22)
                    ):
                        nonfinite.append(name)
                    writer.write(name, full)
                except Exception as e:  # noqa: BLE001 - keep gathering: the other ranks are in this loop too
                    error = error or f"{type(e).__name__}: {e}"

    def finish():  # rank 0: the file whole, or no file and the reason
        problem = error
        if writer is not None:
            try:
                if problem or nonfinite:
                    writer.__exit__(SaveError, SaveError("not saved"), None)  # leaves no file behind
                else:
                    writer.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001
                problem = problem or f"{type(e).__name__}: {e}"
        if nonfinite and not problem:
            problem = (
                f"non-finite weights in {nonfinite[:4]}{' ...' if len(nonfinite) > 4 else ''}; not saved"
            )
        if problem:
            raise SaveError(f"{path}: {problem}")

    decided_by_rank0(finish, (SaveError,))


class _GuardedWrites:
    """Stands in for engine.checkpoint_engine during a save. A write that fails inside DeepSpeed's
    save_checkpoint (a full disk: torch.save raises RuntimeError, os calls OSError) would leave its rank
    raising out of DeepSpeed while the others wait in DeepSpeed's own barrier or all-gather, and gloo
    would abort the job. Here it is recorded instead (the partial file removed, later writes skipped),
    every rank goes through DeepSpeed's collectives in step, and save_engine raises SaveError on every
    rank alike. Also records what this rank wrote, for the step dir's manifest."""

    def __init__(self, inner, rank: int, save_index: int):
        self.inner = inner
        self.rank, self.save_index = rank, save_index
        self.errors: list[str] = []
        self.written: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path):
        if self.errors:
            return None  # the save has failed already; the rest would fail as well
        try:
            _inject_write_fault(self.rank, self.save_index, str(path))
            result = self.inner.save(state_dict, path)
            self.written.append(str(path))
            return result
        except Exception as e:  # noqa: BLE001 - every failure takes the named path (save_engine)
            self.errors.append(f"{path}: {type(e).__name__}: {e}")
            try:
                os.remove(path)
            except OSError:
                pass
            return None

    def makedirs(self, path, exist_ok=False):
        try:
            return self.inner.makedirs(path, exist_ok=exist_ok)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{path}: {type(e).__name__}: {e}")
            return None

    def guard(self, fn, what: str):
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"{what}: {type(e).__name__}: {e}")
                return None

        return guarded


_SAVES: dict[str, int] = {"count": 0}


def save_engine(engine, directory: Path, client_state: dict) -> list[tuple[str, int]]:
    """Sharded DeepSpeed checkpoint (module, optimizer, scheduler) for resume; every rank calls it. A
    LoRA policy's frozen base is left out (it is rebuilt from the run's starting point on resume).
    Returns (path, bytes) of the files this rank wrote; raises SaveError on every rank alike when a
    write failed on any (the failing ranks' errors named)."""
    from dpo_ds import adapters

    exclude_frozen = adapters.is_lora(unwrap_lm(engine))
    _SAVES["count"] += 1
    rank = torch.distributed.get_rank()
    guard = _GuardedWrites(engine.checkpoint_engine, rank, _SAVES["count"])
    engine.checkpoint_engine = guard
    engine._copy_recovery_script = guard.guard(engine._copy_recovery_script, "copying zero_to_fp32.py")
    try:
        engine.save_checkpoint(
            str(directory),
            tag=DS_TAG,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )
    except Exception as e:  # noqa: BLE001 - raised outside the guarded writes: still agreed on below
        guard.errors.append(f"{type(e).__name__}: {e}")
    finally:
        engine.checkpoint_engine = guard.inner
        del engine._copy_recovery_script  # the class's method again
    failed = all_gather_objects(guard.errors and f"rank {rank}: {'; '.join(guard.errors)}")
    if any(failed):
        raise SaveError(f"{ds_dir(directory)}: " + "; ".join(f for f in failed if f))
    return [(p, os.path.getsize(p)) for p in guard.written if os.path.exists(p)]


def _inject_write_fault(rank: int, save_index: int, path: str) -> None:
    """Tests only: DPO_DS_TEST_FAIL_WRITE=R:K:TEXT makes rank R's K-th DeepSpeed save fail, as a full
    disk does, at the first file whose path contains TEXT (e.g. optim_states)."""
    spec = os.environ.get("DPO_DS_TEST_FAIL_WRITE")
    if not spec:
        return
    r, k, text = spec.split(":", 2)
    if int(r) == rank and int(k) == save_index and text in path:
        raise RuntimeError(
            f"[Errno 28] No space left on device (injected by DPO_DS_TEST_FAIL_WRITE) writing {path}"
        )


def load_engine(engine, directory: Path) -> dict:
    if not ds_dir(directory).is_dir():
        raise ConfigError(
            f"resume_from: {directory} holds no DeepSpeed checkpoint ({ds_dir(directory)} is missing; a run "
            f"with checkpoint.save_optimizer=false saves weights only, which cannot resume a run)"
        )
    from dpo_ds.checkpoint import ArchiveError

    error = None
    try:
        from dpo_ds import adapters

        # a LoRA checkpoint holds the adapters only: the frozen base is built from the starting point
        strict = not adapters.is_lora(unwrap_lm(engine))
        path, client_state = engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=strict)
        if path is None:
            error = f"no DeepSpeed checkpoint under {ds_dir(directory)}"
    except Exception as e:  # noqa: BLE001 - a file missing or unreadable on some rank: agreed on below
        error = f"{type(e).__name__}: {e}"
    failed = all_gather_objects(error and f"rank {torch.distributed.get_rank()}: {error}")
    if any(failed):
        raise ArchiveError(f"resume_from: {directory} cannot be loaded: " + "; ".join(f for f in failed if f))
    return client_state
