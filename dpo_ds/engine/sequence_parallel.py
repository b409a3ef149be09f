"""Sequence parallelism: DeepSpeed's Ulysses (ALST) over the model's core attention, for both engines."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_ds.config import ConfigError
from dpo_ds.model.files import load_config

log = logging.getLogger("dpo_ds")


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
        from dpo_ds.model.attention import register

        register()
    mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    group = mpu.get_sequence_parallel_group()
    text = load_config(model_dir).get_text_config()
    core = ALL_ATTENTION_FUNCTIONS[attn]
    by_rows: dict[int, UlyssesSPAttentionHF] = {}

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not _SP_ACTIVE[0]:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("s_aux") is not None:  # a sink model arch.SINK_MODEL_TYPES does not know yet
            raise ConfigError(
                f"config key 'parallel.sequence_parallel_size': {getattr(module.config, 'model_type', '?')} with "
                f"model.attn_implementation={attn}: its attention sinks (s_aux) cannot run under sequence "
                f"parallelism ({size}): each rank attends with a slice of the heads and dpo_ds does not slice "
                f"the sinks with them; use parallel.sequence_parallel_size=1"
            )
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
