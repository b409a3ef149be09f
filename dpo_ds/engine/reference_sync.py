"""TR-DPO's reference update (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"):
ref <- alpha * policy + (1 - alpha) * ref, each parameter updated where its data lives.

Under ZeRO-3 a rank's shard of a parameter is one element range of the flattened parameter: `ds_tensor`, of
`ds_tensor.ds_numel` elements starting at rank * ds_numel within the parameter's partition group, zero-padded
at the end (DeepSpeed's Init._partition_param). Two ZeRO-3 engines over the same ranks put the same range of
a parameter on each rank, whatever their dtypes or offload, so:

    policy     reference   the update
    ZeRO-3     ZeRO-3      shard by shard, locally (ds_tensor from ds_tensor)
    ZeRO-0..2  ZeRO-3      the reference's range sliced out of the whole policy parameter, locally
    ZeRO-0..2  ZeRO-0      whole parameters, locally
    ZeRO-3     ZeRO-0      the policy parameter gathered, one at a time (never the whole model)

A ZeRO-3 reference parameter whose whole data is present (persistent, below
stage3_param_persistence_threshold, which an inference-only engine gathers once and keeps) is updated whole
as well, from the whole policy parameter, so that norms and biases do not stay stale. Each update is
computed in fp32 and rounded once to the reference's dtype; alpha = 1 copies (the hard reset).

Every rank calls mix_into alike: a gather is a collective, taken parameter by parameter in one order.
"""

from __future__ import annotations

import torch

from dpo_ds.model.files import ModelError


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _whole_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if _partitioned(p) else tuple(p.shape)


def _whole_present(p: torch.Tensor) -> bool:
    """Whether a ZeRO-3 parameter holds its whole data now (persistent, or not yet released)."""
    return getattr(getattr(p, "ds_status", None), "name", None) == "AVAILABLE" and p.numel() == p.ds_numel


def pairs(
    reference: torch.nn.Module, policy: torch.nn.Module
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, reference parameter, policy parameter), paired by name and whole shape; a reference parameter
    without its policy twin is an error naming it (the two are built from one model directory)."""
    mine = dict(policy.named_parameters())
    out = []
    for name, q in reference.named_parameters():
        p = mine.get(name)
        if p is None or _whole_shape(p) != _whole_shape(q):
            got = "no such parameter" if p is None else f"shape {_whole_shape(p)}"
            raise ModelError(
                f"model.reference_sync_steps: reference parameter {name} {_whole_shape(q)} has no policy twin "
                f"({got}); TR-DPO needs the policy and the reference to be one architecture"
            )
        out.append((name, q, p))
    return out


def _lerp_(target: torch.Tensor, source: torch.Tensor, alpha: float) -> None:
    """target <- alpha * source + (1 - alpha) * target, in fp32, rounded once to target's dtype."""
    source = source.to(target.device)
    if alpha == 1.0:
        target.copy_(source)
    else:
        target.copy_(torch.lerp(target.float(), source.float(), alpha))


def _shard_range(q: torch.Tensor) -> tuple[int, int]:
    """(start, valid elements) of this rank's shard of a ZeRO-3 parameter within the flattened parameter."""
    size = q.ds_tensor.ds_numel
    start = size * torch.distributed.get_rank(group=q.ds_process_group)
    return start, max(0, min(size, q.ds_numel - start))


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> int:
    """reference <- alpha * policy + (1 - alpha) * reference, in place (see the module's table). Returns the
    number of parameters updated."""
    import deepspeed

    todo = pairs(reference, policy)
    for name, q, p in todo:
        if _partitioned(q):
            start, n = _shard_range(q)
            if _partitioned(p):
                if p.ds_tensor.ds_numel != q.ds_tensor.ds_numel:
                    raise ModelError(
                        f"model.reference_sync_steps: {name} is split into shards of {p.ds_tensor.ds_numel} "
                        f"elements in the policy and {q.ds_tensor.ds_numel} in the reference (another "
                        "partition group, e.g. MiCS); TR-DPO updates matching shards only"
                    )
                _lerp_(q.ds_tensor.narrow(0, 0, n), p.ds_tensor.narrow(0, 0, n), alpha)
            else:
                _lerp_(q.ds_tensor.narrow(0, 0, n), p.detach().reshape(-1).narrow(0, start, n), alpha)
            if not _whole_present(q):
                continue
        # a ZeRO-0 reference, or a ZeRO-3 one's persistent parameter: from the whole policy parameter, gathered
        # for the moment when it is not whole here (a persistent one is, and must not be released by the context)
        gather = [p] if _partitioned(p) and not _whole_present(p) else []
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
            _lerp_(q.data, p.detach(), alpha)
    return len(todo)


@torch.no_grad()
def local_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What this rank holds of a (moved) reference, to checkpoint: each ZeRO-3 parameter's shard, and the whole
    of every other parameter (a ZeRO-0 reference's, or a ZeRO-3 one's persistent ones), on CPU."""
    state = {}
    for name, q in reference.named_parameters():
        if _partitioned(q):
            state[f"{name}#shard"] = q.ds_tensor.detach().cpu().clone()
            if not _whole_present(q):
                continue
        state[name] = q.data.detach().cpu().clone()
    return state


@torch.no_grad()
def load_local_state(reference: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """local_state's dict back into the same reference on the same ranks; a missing or misshapen entry is an
    error naming it and `source` (the file)."""
    for name, q in reference.named_parameters():
        keys = ([f"{name}#shard"] if _partitioned(q) else []) + (
            [name] if not _partitioned(q) or _whole_present(q) else []
        )
        for key in keys:
            target = q.ds_tensor if key.endswith("#shard") else q.data
            saved = state.get(key)
            if saved is None or saved.shape != target.shape:
                got = "missing" if saved is None else f"shape {tuple(saved.shape)}"
                raise ModelError(
                    f"{source}: the moved reference's {key} is {got}, this run's is {tuple(target.shape)} (a "
                    "checkpoint of another world size or ZeRO placement cannot be resumed)"
                )
            target.copy_(saved)


@torch.no_grad()
def mix_reference_adapter(model: torch.nn.Module, alpha: float, used: int) -> int:
    """TR-DPO under LoRA, exactly: the reference is the base plus a frozen reference delta D, kept as the
    reference adapter (model.adapters.add_reference_adapter: B_ref A_ref, scaling 1). The policy is the base plus
    s B A, so the update D <- alpha s B A + (1 - alpha) D is a concatenation, not a lerp of A and B (B A is
    bilinear): the columns of B_ref in use are scaled by (1 - alpha), and the next r columns / rows take
    alpha s B and A. The rank in use grows by r a sync; alpha = 1 starts again from the first r. Each LoRA
    layer's four matrices are gathered together under ZeRO-3 (adapter-sized; the base is never touched) and
    written on rank 0, which DeepSpeed partitions again. Returns the rank in use after the update."""
    import deepspeed

    after = used
    for name, a, b, ra, rb, scale in _reference_layers(model):
        zero3 = [p for p in (a, b, ra, rb) if _partitioned(p)]
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if zero3 else None):
            r, capacity = a.shape[0], ra.shape[0]
            start = 0 if alpha == 1.0 else used
            if start + r > capacity:
                raise ModelError(
                    f"model.reference_sync_steps: {name}'s reference adapter holds rank {capacity}, and this sync "
                    f"needs {start + r}: more syncs than the run was built for"
                )
            if alpha == 1.0:  # the hard update: the policy's delta alone
                ra.zero_()
                rb.zero_()
            else:
                rb[:, :used].copy_(rb[:, :used].float() * (1.0 - alpha))
            ra[start : start + r].copy_(a)
            rb[:, start : start + r].copy_(b.float() * (alpha * scale))
        after = start + r
    return after


def _reference_layers(model):
    """(name, A, B, A_ref, B_ref, scale) of each LoRA layer that holds the reference adapter."""
    from peft.tuners.lora import LoraLayer

    from dpo_ds.model.adapters import REFERENCE_ADAPTER

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and REFERENCE_ADAPTER in module.lora_A:
            yield (
                name, module.lora_A["default"].weight, module.lora_B["default"].weight,
                module.lora_A[REFERENCE_ADAPTER].weight, module.lora_B[REFERENCE_ADAPTER].weight,
                module.scaling["default"],
            )  # fmt: skip


@torch.no_grad()
def adapter_state(model: torch.nn.Module, used: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The reference adapter's columns in use, gathered (every rank calls it alike): name -> (A_ref[:used],
    B_ref[:, :used]) on CPU. Whole and of the rank in use, so a resume may run longer (a larger capacity) or
    on other ranks."""
    import deepspeed

    out = {}
    for name, _, _, ra, rb, _ in _reference_layers(model):
        with deepspeed.zero.GatheredParameters([p for p in (ra, rb) if _partitioned(p)]):
            out[name] = (ra[:used].detach().cpu().clone(), rb[:, :used].detach().cpu().clone())
    return out


@torch.no_grad()
def load_adapter_state(model: torch.nn.Module, state: dict, used: int, source: str) -> None:
    """adapter_state's dict back into the reference adapter (the rest of its columns zero); an error naming
    `source` when a layer is missing or its capacity is smaller than the rank in use."""
    import deepspeed

    for name, _, _, ra, rb, _ in _reference_layers(model):
        saved = state.get(name)
        zero3 = [p for p in (ra, rb) if _partitioned(p)]
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if zero3 else None):
            if saved is None or saved[0].shape[1:] != ra.shape[1:] or used > ra.shape[0]:
                raise ModelError(
                    f"{source}: the moved reference adapter of {name} is "
                    f"{'missing' if saved is None else f'rank {used} of shape {tuple(saved[0].shape)}'}; this run's "
                    f"holds rank {ra.shape[0]} of shape {tuple(ra.shape)}"
                )
            ra.zero_()
            rb.zero_()
            ra[:used].copy_(saved[0])
            rb[:, :used].copy_(saved[1])
