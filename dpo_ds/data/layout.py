"""The layout: how a micro-batch's sequences are laid out in rows, decided once (`choose`) and owned here.

    padded         one sequence per row, padded to the longest (the plainly-correct path)
    packed         whole sequences packed into rows without padding between them (data/packing.py)
    shared_prompt  each pair's prompt once, its responses after it (data/shared_prompt.py)

A Layout knows its collator, the tokens an example takes in a row (what the micro-batch budget counts),
its rows' length, the attention it needs (rows holding several segments must attend per segment:
attention.py's dpo_ds_blocks on CPU, FlexAttention on a GPU; a dense mask otherwise, up to
DENSE_MASK_MAX_TOKENS), and what it contributes to fingerprints (the precomputed reference's). Every
collator returns a MicroBatch; the model wrapper (model.LogprobLM) reads its model_inputs().
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from dpo_ds.config import LAYOUTS, ConfigError
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq

log = logging.getLogger("dpo_ds.data")

PER_SEGMENT_ATTENTION = ("flex_attention", "dpo_ds_blocks")  # compute nothing across a row's segments
ONE_ROW = 1 << 30  # data.row_tokens that puts a whole micro-batch in one row (block or flex attention)
# A dense additive mask is (rows, 1, T, T): 256 MiB of fp32 per row at 8192 tokens, and attention
# computes every masked pair anyway. Longer rows need FlexAttention (model.attn_implementation).
DENSE_MASK_MAX_TOKENS = 8192


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
    example_ids: torch.Tensor | None = None
    split: str = "train"
    global_examples: int = 0
    global_tokens: int = 0

    MODEL_INPUTS = (
        "input_ids", "attention_mask", "position_ids", "block_ids", "branch_ids", "spans",
        "target_pos", "target_ids", "target_seq", "n_seqs",
    )  # fmt: skip

    def model_inputs(self) -> dict:
        """The keyword arguments of model.LogprobLM.forward."""
        return {k: getattr(self, k) for k in self.MODEL_INPUTS}

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
            target_pos=row[mine] * local + (col[mine] - lo),
            target_ids=self.target_ids[mine],
            target_seq=self.target_seq[mine],
            logical_tokens=share,  # the group's shares sum to the row's count (throughput)
        )


class Layout:
    """Base: one sequence per row (padded). Subclasses pack rows."""

    name = "padded"
    segmented = False  # whether a row holds several segments (its attention must follow them)
    own_mask = False  # whether its attention rule is a mask built from block/branch ids (attention.py)

    def __init__(
        self, max_length: int, row_tokens: int = 0, attn: str | None = None, sequence_parallel: tuple = (0, 1)
    ):
        self.max_length = max_length
        self.row_tokens = row_tokens  # packed rows' length (0: the layout's default)
        self.attn = attn  # the transformers attention implementation the model is built with
        # (this rank's index in its sequence-parallel group, the group's size): each micro-batch this
        # rank runs is its 1/size of every row (MicroBatch.shard)
        self.sp_rank, self.sp_size = sequence_parallel

    def micro_batch(self, examples: list[list[TokenizedSeq]], pad_id: int) -> MicroBatch:
        """What this rank runs of a micro-batch of examples: the collator's rows, or its shard of them."""
        m = self.collate(examples, pad_id)
        return m.shard(self.sp_rank, self.sp_size) if self.sp_size > 1 else m

    @property
    def per_segment(self) -> bool:
        """Attention computed per segment (no dense mask between a row's segments)."""
        return self.attn in PER_SEGMENT_ATTENTION

    def size(self, example: list[TokenizedSeq]) -> int:
        """Tokens an example takes in a row of this layout (the micro-batch budget counts these)."""
        return sum(len(s) for s in example)

    def collate(self, examples: list[list[TokenizedSeq]], pad_id: int) -> MicroBatch:
        from dpo_ds.data.collate import collate_padded

        return collate_padded(examples, pad_id)

    def row_len(self) -> int:
        return self.max_length

    def describe(self) -> str:
        """What the layout contributes to fingerprints (rows of another length give other sums)."""
        rows = "one row per micro-batch" if self.row_tokens == ONE_ROW else f"rows of {self.row_len()} tokens"
        return f"{self.name}, {rows}" + (f", {self.sp_size} ranks a sequence" if self.sp_size > 1 else "")


class Packed(Layout):
    name = "packed"
    segmented = True

    def collate(self, examples, pad_id):
        from dpo_ds.data.packing import collate_packed

        return collate_packed(examples, pad_id, self.row_len())

    def row_len(self) -> int:
        return self.row_tokens or self.max_length


class SharedPrompt(Layout):
    name = "shared_prompt"
    segmented = True
    own_mask = True  # packed rows need none: transformers masks them by their restarting position ids

    def size(self, example):
        from dpo_ds.data.shared_prompt import block_length

        return block_length(example)

    def collate(self, examples, pad_id):
        from dpo_ds.data.shared_prompt import collate_shared

        return collate_shared(examples, pad_id, self.row_len())

    def row_len(self) -> int:
        return self.row_tokens or 2 * self.max_length


KINDS = {cls.name: cls for cls in (Layout, Packed, SharedPrompt)}  # config.LAYOUTS, the key's values
assert tuple(KINDS) == LAYOUTS


def attn_implementation(layout: str, requested: str, on_cpu: bool, sequence_parallel: int = 1) -> str | None:
    """model.attn_implementation with `auto` resolved: for packed and shared_prompt rows FlexAttention on
    a GPU (a block-sparse mask), dpo_ds_blocks on CPU (attention.py: per segment, no mask); for padded
    rows None, transformers' own default (sdpa). Under sequence parallelism the core attention sees the
    whole row but no mask (DeepSpeed's Ulysses drops it): padded rows run sdpa (causal is all they
    need), packed and shared-prompt rows dpo_ds_blocks (which follows the spans), on any device."""
    if sequence_parallel > 1:
        if requested == "auto":
            return "sdpa" if layout == "padded" else "dpo_ds_blocks"
        ok = SP_ATTENTION["padded" if layout == "padded" else "segmented"]
        if requested not in ok:
            raise ConfigError(
                f"config key 'model.attn_implementation': {requested} cannot run data.layout={layout} under "
                f"parallel.sequence_parallel_size={sequence_parallel} (the sequence-parallel attention gets no "
                f"mask{', and a FlexAttention block mask is rebuilt as plain causal' if requested == 'flex_attention' else ''}); "
                f"use one of {ok} or auto"
            )
        return requested
    if requested != "auto":
        return requested
    if layout == "padded":
        return None
    return "dpo_ds_blocks" if on_cpu else "flex_attention"


# what the core attention may be under sequence parallelism: it gets the whole row and no mask
SP_ATTENTION = {
    "padded": ("sdpa", "flash_attention_2", "flash_attention_3", "dpo_ds_blocks"),  # causal suffices
    "segmented": ("dpo_ds_blocks",),  # segments must be followed: only the spans say where they are
}


def choose(
    name: str, *, max_length: int, row_tokens: int, max_tokens_per_micro_batch: int, attn: str, on_cpu: bool,
    sequence_parallel: tuple = (0, 1),
) -> Layout:  # fmt: skip
    """The run's layout, decided once, with the attention implementation it runs under (`attn`:
    model.attn_implementation, `auto` resolved by attn_implementation) and this rank's place in its
    sequence-parallel group, (rank, size). Under per-segment attention one packed row fills the whole
    micro-batch budget (nothing is computed across segments, so no padding is needed); a dense mask
    costs (row x row) per row, so there rows stay near max_length unless data.row_tokens says."""
    if name not in KINDS:
        raise ConfigError(f"config key 'data.layout': must be one of {LAYOUTS}, got {name!r}")
    impl = attn_implementation(name, attn, on_cpu, sequence_parallel[1])
    if on_cpu and impl == "flex_attention":
        log.warning(
            "model.attn_implementation=flex_attention on CPU: transformers' FlexAttention path through torch's "
            "eager FlexAttention (torch has no compiled backward on CPU; the scores are materialized, T x T "
            "per head): the GPU's attention checked on CPU, not a fast path (auto: dpo_ds_blocks)"
        )
    if not row_tokens and impl in PER_SEGMENT_ATTENTION and name != "padded":
        row_tokens = max_tokens_per_micro_batch or ONE_ROW  # one row per micro-batch, no padding
    layout = KINDS[name](max_length, row_tokens, impl, sequence_parallel)
    if layout.own_mask and not layout.per_segment and layout.row_len() > DENSE_MASK_MAX_TOKENS:
        raise ConfigError(
            f"config key 'data.row_tokens': {name} rows of {layout.row_len()} tokens need a dense "
            f"{layout.row_len()}x{layout.row_len()} attention mask per row without FlexAttention; keep rows <= "
            f"{DENSE_MASK_MAX_TOKENS} tokens or set model.attn_implementation=flex_attention (GPU)"
        )
    return layout
