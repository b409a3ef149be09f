"""One micro-batch as the model runs it, whatever the layout (data/layout.py): what every collator
(data/collate.py, data/packing.py, data/shared_prompt.py) returns and model.LogprobLM reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dpo_ds.data.tokenize import IGNORE


@dataclass
class MicroBatch:
    """One micro-batch, whatever the layout. Tensors (rows, T) unless said otherwise.

    input_ids       long
    labels          long, IGNORE on prompt and padding (for inspection; the model reads the targets)
    target_pos      (M,) flat index (row * T + t) of the position whose hidden state predicts a scored
                    token: t - 1 in a plain row, the prompt's last position for the first token of every
                    response of a shared-prompt block
    target_ids      (M,) the scored tokens
    target_seq      (M,) which sequence each scored token belongs to
    seq_ids         the sequence of each token, -1 for padding (token counts)
    n_seqs          sequences in the micro-batch; for preference data the first half are the chosen
                    responses and the second half the rejected ones, pair i = (i, n_seqs/2 + i)
    logical_tokens  prompt + response tokens of every sequence, as a padded layout would run them
    attention_mask  1 on tokens (padded), or None (packed rows: the layout's attention rule)
    position_ids    or None (the model derives them)
    block_ids       or None: the attention block of each token, -1 on padding (shared_prompt)
    branch_ids      or None: 0 on a block's prompt, k on its k-th response (shared_prompt)
    spans           per row, (start, prompt_len, [(response_start, length), ...]) per block (a packed
                    segment: (start, length, [])), or None: what block attention computes (attention.py)
    token_weights   or None: set by shard() of a shared-prompt row, its whole row's routing_weights() sliced
    Set by Batches (data/batches.py) for the step that runs it:
    example_ids     (pairs,) its examples' indices in the split, in the order of its pairs
    split           the split they come from (a precomputed reference looks them up by both)
    global_examples, global_tokens: the whole global batch's examples and labelled tokens
    Chosen and rejected go through the model in one concatenated forward.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    seq_ids: torch.Tensor
    n_seqs: int
    logical_tokens: int
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    branch_ids: torch.Tensor | None = None
    spans: list | None = None
    token_weights: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None
    split: str = "train"
    global_examples: int = 0
    global_tokens: int = 0

    MODEL_INPUTS = (
        "input_ids", "attention_mask", "position_ids", "block_ids", "branch_ids", "spans",
        "target_pos", "target_ids", "target_seq", "n_seqs",
    )  # fmt: skip

    def model_inputs(self, routing: bool = False) -> dict:
        """The keyword arguments of model.LogprobLM.forward; with the tokens' routing weights for a model that
        computes a router loss (they are built only then: a dense model's forward never reads them)."""
        inputs = {k: getattr(self, k) for k in self.MODEL_INPUTS}
        return {**inputs, "token_weights": self.routing_weights()} if routing else inputs

    def routing_weights(self) -> torch.Tensor:
        """(rows, T) float: how many sequences each token belongs to, as a padded batch of whole sequences
        counts it: 1 on a sequence's token, 0 on padding, and on a shared-prompt block's prompt the number of
        its responses. The router's load-balancing loss weighs tokens by it (model/router.py)."""
        if self.token_weights is not None:
            return self.token_weights
        weights = (self.seq_ids >= 0).float()
        if (
            self.branch_ids is not None and self.spans is not None
        ):  # shared_prompt: a prompt serves k responses
            for r, blocks in enumerate(self.spans):
                for start, prompt_len, responses in blocks:
                    if responses:
                        weights[r, start : start + prompt_len] = len(responses)
        return weights

    def to(self, device) -> MicroBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return MicroBatch(**moved)

    @property
    def computed_tokens(self) -> int:
        return int((self.seq_ids >= 0).sum())

    def shard(self, rank: int, n: int) -> MicroBatch:
        """This rank's 1/n of every row, for sequence parallelism (engines: DeepSpeed Ulysses). Rows are
        padded on the right to a multiple of n (never scored, never attended to by a real token) and cut
        into n equal pieces: a boundary may fall anywhere, inside a prompt or between two responses. The
        ids, positions and labels are sliced; the scored tokens are the ones whose predicting position
        falls in this piece, their positions renumbered into it; spans stay in whole-row coordinates,
        since attention runs on the whole row (1/n of the heads each). No mask: the core attention is
        causal (padded rows) or follows the spans (packed and shared-prompt rows, dpo_ds_blocks). The
        per-sequence sums are summed over the group by the model wrapper."""
        rows, t = self.input_ids.shape
        local = -(-t // n)
        full = local * n

        def pad(x, value):
            return torch.nn.functional.pad(x, (0, full - t), value=value) if full > t else x

        positions = self.position_ids
        if positions is None:  # padded rows: 0.. per row (transformers derives these when unsharded)
            positions = torch.arange(t, device=self.input_ids.device).expand(rows, t)
        if full > t:  # the tail continues its row's last segment's numbering
            tail = positions[:, -1:] + torch.arange(1, full - t + 1, device=positions.device)
            positions = torch.cat([positions, tail], dim=1)
        lo, hi = rank * local, (rank + 1) * local
        row, col = self.target_pos // t, self.target_pos % t
        mine = (col >= lo) & (col < hi)
        share = self.logical_tokens // n + (1 if rank < self.logical_tokens % n else 0)
        return dataclasses.replace(
            self,
            input_ids=pad(self.input_ids, 0)[:, lo:hi],
            labels=pad(self.labels, IGNORE)[:, lo:hi],
            seq_ids=pad(self.seq_ids, -1)[:, lo:hi],
            position_ids=positions[:, lo:hi].contiguous(),
            attention_mask=None,
            block_ids=None,
            branch_ids=None,
            # a shared prompt's weight comes from its block, which the piece no longer knows; elsewhere the
            # piece's own seq_ids give it (routing_weights)
            token_weights=pad(self.routing_weights(), 0.0)[:, lo:hi] if self.branch_ids is not None else None,
            target_pos=row[mine] * local + (col[mine] - lo),
            target_ids=self.target_ids[mine],
            target_seq=self.target_seq[mine],
            logical_tokens=share,  # the group's shares sum to the row's count (throughput)
        )
