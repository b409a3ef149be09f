"""Packed collator: several sequences per row, no padding between them.

Position ids restart at 0 for every segment and the model is called with attention_mask=None and
use_cache=False; transformers then builds a block-diagonal causal mask from the position ids (or
flash-attention runs varlen), so a token never sees another segment. Per-sequence log-probs are
segment sums via `seq_ids`, exactly as for padded rows (model.reduce_sequences).

A pair's chosen and rejected sequences always land in the same micro-batch (the loss needs both).
Micro-batches are filled up to a token budget; ranks then agree on a count (the max) and the rank
with fewer splits its largest micro-batches, so every rank runs the same number of forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpo_ds.data.collate import order_sequences, targets_from_labels
from dpo_ds.data.microbatch import MicroBatch
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq


def split_by_budget(
    examples: list[list[TokenizedSeq]], max_tokens: int, n_micro: int, size: Callable | None = None
) -> list[list[int]]:
    """Indices of examples per micro-batch: consecutive examples up to max_tokens tokens each (an
    example's tokens counted by `size`, default all its sequences), or (max_tokens == 0) n_micro
    groups of equal count."""
    if not max_tokens:
        per = -(-len(examples) // n_micro)
        return [list(range(k, min(k + per, len(examples)))) for k in range(0, len(examples), per)]
    size = size or (lambda ex: sum(len(s) for s in ex))
    groups, current, used = [], [], 0
    for i, ex in enumerate(examples):
        n = size(ex)
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    groups.append(current)
    return groups


def equalise(groups: list[list[int]], target: int) -> list[list[int]]:
    """Split the largest groups in two until there are `target` groups (target <= examples)."""
    groups = [g for g in groups if g]
    while len(groups) < target:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups[k]
        if len(g) < 2:
            raise ValueError(f"cannot make {target} micro-batches from {sum(map(len, groups))} examples")
        groups[k : k + 1] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def pack_rows(seqs: list[TokenizedSeq], row_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence indices into rows of at most row_len tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda j: -len(seqs[j])):
        n = len(seqs[i])
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_len - n)
    return rows


def collate_packed(
    examples: list[list[TokenizedSeq]], pad_token_id: int, row_len: int | None = None
) -> MicroBatch:
    seqs = order_sequences(examples)  # chosen_0..n-1, rejected_0..n-1 (same numbering as padded)
    row_len = row_len or max(len(s) for s in seqs)
    rows = pack_rows(seqs, row_len)
    t = max(sum(len(seqs[i]) for i in row) for row in rows)
    shape = (len(rows), t)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    spans = [[] for _ in rows]  # per row: (start, length, []) per segment, for block attention
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = seqs[i]
            n = len(s)
            spans[r].append((at, n, []))
            input_ids[r, at : at + n] = torch.tensor(s.input_ids)
            labels[r, at : at + n] = torch.tensor(s.labels)
            labels[r, at] = IGNORE  # a segment's first token has no context of its own
            position_ids[r, at : at + n] = torch.arange(n)
            seq_ids[r, at : at + n] = i
            at += n
        if at < t:  # tail padding: its own segment, never labelled
            position_ids[r, at:] = torch.arange(t - at)
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        spans=spans,
        **targets_from_labels(labels, seq_ids),
        seq_ids=seq_ids,
        n_seqs=len(seqs),
        logical_tokens=sum(len(s) for s in seqs),
    )


def pack_micro_batches(
    examples: list[list[TokenizedSeq]],
    max_tokens: int,
    n_micro: int,
    sync_max: Callable[[int], int],
    collate: Callable[[list[list[TokenizedSeq]]], MicroBatch],
    size: Callable | None = None,
) -> list[tuple[list[int], MicroBatch]]:
    """(indices into `examples`, micro-batch) for each micro-batch, the same count on every rank:
    examples are grouped up to max_tokens (counted by `size`), ranks agree on the most groups any of
    them has, and `collate` (packed or shared-prompt rows) makes each group a micro-batch."""
    groups = split_by_budget(examples, max_tokens, n_micro, size)
    groups = equalise(groups, sync_max(len(groups)))
    return [(g, collate([examples[i] for i in g])) for g in groups]
