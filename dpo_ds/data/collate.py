"""Padded collator: the plainly-correct path that the packed and shared-prompt layouts are checked against.

Every collator returns a data.microbatch.MicroBatch (its fields documented there); the padded one has one
sequence per row, padded to the longest, with an attention mask.
"""

from __future__ import annotations

import torch

from dpo_ds.data.microbatch import MicroBatch
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq


def order_sequences(examples: list[list[TokenizedSeq]]) -> list[TokenizedSeq]:
    """[[chosen, rejected], ...] -> [chosen_0..chosen_n-1, rejected_0..rejected_n-1] (or SFT targets)."""
    width = len(examples[0])
    return [ex[k] for k in range(width) for ex in examples]


def collate_padded(examples: list[list[TokenizedSeq]], pad_token_id: int) -> MicroBatch:
    seqs = order_sequences(examples)
    t = max(len(s) for s in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, t), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, t), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((rows, t), dtype=torch.long)
    seq_ids = torch.full((rows, t), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attention_mask[i, :n] = 1
        seq_ids[i, :n] = i
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        **targets_from_labels(labels, seq_ids),
        seq_ids=seq_ids,
        n_seqs=rows,
        logical_tokens=sum(len(s) for s in seqs),
    )


def targets_from_labels(labels: torch.Tensor, seq_ids: torch.Tensor) -> dict:
    """Rows where position t predicts token t + 1: every labelled token of a sequence after its first."""
    t = labels.shape[1]
    nxt, seq = labels[:, 1:], seq_ids[:, 1:]  # (rows, T-1): the token position t predicts
    keep = (nxt != IGNORE) & (seq >= 0)
    row, col = keep.nonzero(as_tuple=True)
    return {"target_pos": row * t + col, "target_ids": nxt[keep], "target_seq": seq[keep]}
