"""A ZeRO-3 model gathered for generation (or left sharded when it does not fit), sequence parallelism
paused while it generates."""

from __future__ import annotations

import os
from contextlib import contextmanager

from dpo_ds.dist.comm import any_rank_flagged
from dpo_ds.dist.memory import free_memory_bytes
from dpo_ds.engine.sequence_parallel import sequence_parallel_paused
from dpo_ds.engine.step import is_partitioned, unwrap_lm

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
    (short_somewhere,) = any_rank_flagged(not fits)  # one collective, so every rank decides alike
    fits_everywhere = not short_somewhere
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
