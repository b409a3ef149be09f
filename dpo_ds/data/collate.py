"""Padded collator: the plainly-correct path that the packed and shared-prompt layouts are checked against.

A micro-batch is a dict of tensors that the trainer hands to the model wrapper, whatever the layout:
  input_ids      (rows, T)  long
  labels         (rows, T)  long, IGNORE on prompt and padding (for inspection; the model reads targets)
  attention_mask (rows, T)  1 on tokens, or None (packed rows: transformers masks by position ids)
  position_ids   (rows, T)  or None (the model derives them)
  block_ids      (rows, T)  or None: the attention block of each token, -1 on padding (shared_prompt)
  branch_ids     (rows, T)  or None: 0 on a block's prompt, k on its k-th response (shared_prompt)
  spans          per row, (start, prompt_len, [(response_start, length), ...]) per block (a packed
                 segment: (start, length, [])), or None: what block attention computes (attention.py)
  target_pos     (M,) long  flat index (row * T + t) of the position whose hidden state predicts a
                            scored token: t - 1 in a plain row, the prompt's last position for the
                            first token of every response of a shared-prompt block
  target_ids     (M,) long  the scored tokens
  target_seq     (M,) long  which sequence each scored token belongs to
  seq_ids        (rows, T)  long: the sequence of each token, -1 for padding (token counts)
  n_seqs         int: sequences in the micro-batch; for preference data the first half are the
                 chosen responses and the second half the rejected ones, pair i = (i, n_seqs/2 + i)
  logical_tokens int: prompt + response tokens of every sequence, as a padded layout would run them
Chosen and rejected therefore go through the model in one concatenated forward; the model wrapper
(model.LogprobLM) gathers the hidden states at target_pos and sums their log-probs per sequence.
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
        "block_ids": None,
        "branch_ids": None,
        "spans": None,
        **targets_from_labels(labels, seq_ids),
        "seq_ids": seq_ids,
        "n_seqs": rows,
        "logical_tokens": sum(len(s) for s in seqs),
    }


def targets_from_labels(labels: torch.Tensor, seq_ids: torch.Tensor) -> dict:
    """Rows where position t predicts token t + 1: every labelled token of a sequence after its first."""
    t = labels.shape[1]
    nxt, seq = labels[:, 1:], seq_ids[:, 1:]  # (rows, T-1): the token position t predicts
    keep = (nxt != IGNORE) & (seq >= 0)
    row, col = keep.nonzero(as_tuple=True)
    return {"target_pos": row * t + col, "target_ids": nxt[keep], "target_seq": seq[keep]}


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
