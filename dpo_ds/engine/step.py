"""The train step's surface: what the trainer calls on an engine (backward, step, norms, lr), and what it
asks of one (its ZeRO stage, whether its weights are finite, the HF model inside it)."""

from __future__ import annotations

import torch


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


def routing(engine):
    """The MoE routing the engine's LogprobLM computes a router loss for (model/router.py), or None."""
    return getattr(getattr(engine, "module", None), "routing", None)


def is_partitioned(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are ZeRO-3 partitions (a forward gathers them collectively)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())
