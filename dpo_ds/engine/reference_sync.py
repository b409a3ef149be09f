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
