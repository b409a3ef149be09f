"""Shared-prompt layout: each pair's prompt is computed once, not once per response.

An example becomes one block [prompt | chosen | rejected] (or [prompt | target] for SFT): every
response attends causally to the prompt and to itself, never to another response of its block, and
its position ids continue from the prompt's end, exactly as if it followed the prompt alone. Several
blocks pack into a row; a token never sees another block (Wang & Hegde 2024, "Accelerating Direct
Preference Optimization with Prefix Sharing").

Scoring cannot be "position t predicts t + 1" any more: the first token of every response is
predicted by the prompt's last position. So each scored token carries the position whose hidden
state predicts it (target_pos); the model wrapper gathers by it. Sequence numbers are the padded
layout's (response k of example e is sequence k * n + e), so losses, stats and reference tables
read the same.

Attention is described by two id tensors, not a mask: block_ids (the block of each token, -1 on
padding) and branch_ids (0 on the prompt, k on response k). A query q may see key k when
    block[k] == block[q] >= 0,  k <= q,  and branch[k] in (0, branch[q])
a rule that lives with the attention (attention.allowed), which turns it into a dense additive mask or a
FlexAttention BlockMask; with dpo_ds_blocks attention reads the spans instead.
"""

from __future__ import annotations

import torch

from dpo_ds.data.microbatch import MicroBatch
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq


def block_length(example: list[TokenizedSeq]) -> int:
    """Tokens of one example's block: its prompt once, then every response."""
    p = example[0].prompt_len
    return p + sum(len(s) - p for s in example)


def pack_blocks(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of block indices into rows of at most row_len tokens
    (a block longer than row_len gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def collate_shared(
    examples: list[list[TokenizedSeq]], pad_token_id: int, row_len: int | None = None
) -> MicroBatch:
    """Blocks of examples packed into rows of row_len tokens (default: the longest block)."""
    n = len(examples)
    width = len(examples[0])
    for e, ex in enumerate(examples):
        p = ex[0].prompt_len
        if any(s.prompt_len != p or s.input_ids[:p] != ex[0].input_ids[:p] for s in ex[1:]):
            raise ValueError(f"example {e}: its responses do not share one tokenized prompt")
    lengths = [block_length(ex) for ex in examples]
    rows = pack_blocks(lengths, row_len or max(lengths))
    t = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), t)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    block_ids = torch.full(shape, -1, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    target_pos, target_ids, target_seq = [], [], []
    spans = [[] for _ in rows]  # per row: (start, prompt_len, [(response_start, length), ...]) per block
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            ex = examples[e]
            p = ex[0].prompt_len
            spans[r].append((at, p, []))
            prompt = ex[0].input_ids[:p]
            input_ids[r, at : at + p] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, at : at + p] = torch.arange(p)
            block_ids[r, at : at + p] = e
            seq_ids[r, at : at + p] = e  # the prompt's tokens count once, with the first sequence
            last_prompt = r * t + at + p - 1 if p else None  # flat position that predicts token p
            at += p
            for k, s in enumerate(ex):
                resp, lab = s.input_ids[p:], s.labels[p:]
                m = len(resp)
                seq = k * n + e
                spans[r][-1][2].append((at, m))
                input_ids[r, at : at + m] = torch.tensor(resp, dtype=torch.long)
                labels[r, at : at + m] = torch.tensor(lab, dtype=torch.long)
                position_ids[r, at : at + m] = torch.arange(p, p + m)  # continues from the prompt's end
                block_ids[r, at : at + m] = e
                branch_ids[r, at : at + m] = k + 1
                seq_ids[r, at : at + m] = seq
                for j, label in enumerate(lab):
                    source = last_prompt if j == 0 else r * t + at + j - 1
                    if label != IGNORE and source is not None:  # no prompt: the first token has no context
                        target_pos.append(source)
                        target_ids.append(label)
                        target_seq.append(seq)
                at += m
        if at < t:  # tail padding: a block of its own that nothing sees and nothing scores
            position_ids[r, at:] = torch.arange(t - at)
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        block_ids=block_ids,
        branch_ids=branch_ids,
        spans=spans,
        target_pos=torch.tensor(target_pos, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_seq=torch.tensor(target_seq, dtype=torch.long),
        seq_ids=seq_ids,
        n_seqs=n * width,
        logical_tokens=sum(len(s) for ex in examples for s in ex),
    )
