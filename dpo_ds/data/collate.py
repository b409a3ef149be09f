"""Padded collator: the plainly-correct path that the packed collator is checked against.

A micro-batch is a dict of tensors that the trainer hands to the model wrapper:
  input_ids    (rows, T)  long
  labels       (rows, T)  long, IGNORE on prompt and padding
  attention_mask (rows, T) or None when rows are packed
  position_ids (rows, T) or None (the model derives them)
  seq_ids      (rows, T)  long: which sequence each token belongs to, -1 for padding
  n_seqs       int: sequences in the micro-batch; for preference data the first half are the
               chosen responses and the second half the rejected ones, pair i = (i, n_seqs/2 + i)
Chosen and rejected therefore go through the model in one concatenated forward; the model wrapper
(model.LogprobLM) reduces its per-token log-probs to per-sequence sums with `seq_ids`.
"""

from __future__ import annotations

import torch

from dpo_ds.data.tokenize import IGNORE, TokenizedSeq


def order_sequences(examples: list[list[TokenizedSeq]]) -> list[TokenizedSeq]:
    """[[chosen, rejected], ...] -> [chosen_0..chosen_n-1, rejected_0..rejected_n-1] (or SFT targets)."""
    width = len(examples[0])
    return [ex[k] for k in range(width) for ex in examples]


def collate_padded(examples: list[list[TokenizedSeq]], pad_token_id: int) -> dict:
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
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": None,
        "seq_ids": seq_ids,
        "n_seqs": rows,
    }


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
