"""The layout: how a micro-batch's sequences are laid out in rows, decided once (`choose`) and owned here.

    padded         one sequence per row, padded to the longest (the plainly-correct path)
    packed         whole sequences packed into rows without padding between them (data/packing.py)
    shared_prompt  each pair's prompt once, its responses after it (data/shared_prompt.py)

Each is registered under its name in config.LAYOUTS (the one list of layouts: validation and the planner
ask it too; a new layout is a class and a register() call). A Layout knows its collator, the tokens an
example takes in a row (what the micro-batch budget counts),
its rows' length, the attention it needs (rows holding several segments must attend per segment:
attention.py's dpo_ds_blocks on CPU, FlexAttention on a GPU; a dense mask otherwise, up to
DENSE_MASK_MAX_TOKENS), and what it contributes to fingerprints (the precomputed reference's). Every
collator returns a MicroBatch; the model wrapper (model.LogprobLM) reads its model_inputs().
"""

from __future__ import annotations

import logging

from dpo_ds.config import LAYOUTS, ConfigError
from dpo_ds.data.collate import collate_padded
from dpo_ds.data.microbatch import MicroBatch  # also imported from here (training/objectives.py)
from dpo_ds.data.packing import collate_packed
from dpo_ds.data.shared_prompt import block_length, collate_shared
from dpo_ds.data.tokenize import TokenizedSeq
from dpo_ds.model.arch import model_attention_features
from dpo_ds.model.attention import DENSE_MASK_MAX_TOKENS
from dpo_ds.model.attention import NAME as NAME_BLOCKS

log = logging.getLogger("dpo_ds.data")

PER_SEGMENT_ATTENTION = ("flex_attention", "dpo_ds_blocks")  # compute nothing across a row's segments
ONE_ROW = 1 << 30  # data.row_tokens that puts a whole micro-batch in one row (block or flex attention)
# A dense additive mask is (rows, 1, T, T): 256 MiB of fp32 per row at 8192 tokens, and attention
# computes every masked pair anyway. Longer rows need FlexAttention (model.attn_implementation).


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
        return collate_padded(examples, pad_id)

    def row_len(self) -> int:
        return self.max_length

    @classmethod
    def plan_tokens(cls, pairs: int, width: int, length: int, prompt: int, budget: int) -> int:
        """The tokens a micro-batch of `pairs` examples (`width` sequences each, of up to `length` tokens, the
        prompt `prompt` of them) takes in this layout's rows, for the planner: one row per sequence."""
        return pairs * width * length

    def describe(self) -> str:
        """What the layout contributes to fingerprints (rows of another length give other sums)."""
        rows = "one row per micro-batch" if self.row_tokens == ONE_ROW else f"rows of {self.row_len()} tokens"
        return f"{self.name}, {rows}" + (f", {self.sp_size} ranks a sequence" if self.sp_size > 1 else "")


class Packed(Layout):
    name = "packed"
    segmented = True

    def collate(self, examples, pad_id):
        return collate_packed(examples, pad_id, self.row_len())

    @classmethod
    def plan_tokens(cls, pairs, width, length, prompt, budget):
        """The token budget when there is one (rows are filled to it), else every sequence once."""
        return budget or pairs * width * length

    def row_len(self) -> int:
        return self.row_tokens or self.max_length


class SharedPrompt(Layout):
    name = "shared_prompt"
    segmented = True
    own_mask = True  # packed rows need none: transformers masks them by their restarting position ids

    def size(self, example):
        return block_length(example)

    def collate(self, examples, pad_id):
        return collate_shared(examples, pad_id, self.row_len())

    @classmethod
    def plan_tokens(cls, pairs, width, length, prompt, budget):
        """The budget, else each example's prompt once and its responses after it."""
        return budget or pairs * (length + (width - 1) * (length - min(prompt, length)))

    def row_len(self) -> int:
        return self.row_tokens or 2 * self.max_length


def attn_implementation(layout: str, requested: str, on_cpu: bool, sequence_parallel: int = 1) -> str | None:
    """model.attn_implementation with `auto` resolved: for packed and shared_prompt rows FlexAttention on
    a GPU (a block-sparse mask), dpo_ds_blocks on CPU (attention.py: per segment, no mask); for padded
    rows None, transformers' own default (sdpa). Under sequence parallelism the core attention sees the
    whole row but no mask (DeepSpeed's Ulysses drops it): padded rows run sdpa (causal is all they
    need), packed and shared-prompt rows dpo_ds_blocks (which follows the spans), on any device."""
    segmented = LAYOUTS.get(layout).segmented  # several sequences a row: attention must follow them
    if sequence_parallel > 1:
        if requested == "auto":
            return "dpo_ds_blocks" if segmented else "sdpa"
        ok = SP_ATTENTION["segmented" if segmented else "padded"]
        if requested not in ok:
            raise ConfigError(
                f"config key 'model.attn_implementation': {requested} cannot run data.layout={layout} under "
                f"parallel.sequence_parallel_size={sequence_parallel} (the sequence-parallel attention gets no "
                f"mask{', and a FlexAttention block mask is rebuilt as plain causal' if requested == 'flex_attention' else ''}); "
                f"use one of {ok} or auto"
            )
        return requested
    if LAYOUTS.get(layout).own_mask and requested in FLASH_ATTENTION:
        raise ConfigError(
            f"config key 'model.attn_implementation': {requested} cannot run data.layout={layout}: it takes no "
            f"mask, so a row's sequences would attend where its own mask forbids (in shared_prompt, a block's "
            f"rejected response to its chosen one; packed rows, whose segments it finds from the restarting "
            f"position ids, are fine); use flex_attention (GPU), dpo_ds_blocks, or auto"
        )
    if requested != "auto":
        return requested
    if not segmented:
        return None
    return "dpo_ds_blocks" if on_cpu else "flex_attention"


# causal kernels that take no mask: they tell packed segments apart by their restarting position ids
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")

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
    kind = LAYOUTS.get(name)  # a name no layout registered: the config key named
    impl = attn_implementation(name, attn, on_cpu, sequence_parallel[1])
    if on_cpu and impl == "flex_attention":
        log.warning(
            "model.attn_implementation=flex_attention on CPU: transformers' FlexAttention path through torch's "
            "eager FlexAttention (torch has no compiled backward on CPU; the scores are materialized, T x T "
            "per head): the GPU's attention checked on CPU, not a fast path (auto: dpo_ds_blocks)"
        )
    if not row_tokens and impl in PER_SEGMENT_ATTENTION and kind.segmented:
        row_tokens = max_tokens_per_micro_batch or ONE_ROW  # one row per micro-batch, no padding
    layout = kind(max_length, row_tokens, impl, sequence_parallel)
    if layout.own_mask and not layout.per_segment and layout.row_len() > DENSE_MASK_MAX_TOKENS:
        raise ConfigError(
            f"config key 'data.row_tokens': {name} rows of {layout.row_len()} tokens need a dense "
            f"{layout.row_len()}x{layout.row_len()} attention mask per row without FlexAttention; keep rows <= "
            f"{DENSE_MASK_MAX_TOKENS} tokens or set model.attn_implementation=flex_attention (GPU)"
        )
    return layout


def for_config(cfg, on_cpu: bool, sequence_parallel: tuple = (0, 1)) -> Layout:
    """choose() with a run's config keys (data.layout, max_length, data.row_tokens,
    data.max_tokens_per_micro_batch, model.attn_implementation): what the run and its plan collate with.
    The model's own attention (its sliding window, its sinks: model/arch.py) must survive the layout and
    the attention implementation chosen, or the run is refused here, before any engine."""

    def pick(attn):
        return choose(cfg.data.layout, max_length=cfg.max_length, row_tokens=cfg.data.row_tokens,
                      max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, attn=attn, on_cpu=on_cpu,
                      sequence_parallel=sequence_parallel)  # fmt: skip

    layout = pick(cfg.model.attn_implementation)
    features = model_attention_features(cfg.model.name_or_path)
    if features is None:
        return layout
    if (
        cfg.model.attn_implementation == "auto"
        and features.refusal(layout, cfg.max_length, on_cpu) is not None
    ):
        # auto's device-and-layout pick would lose the model's window or sinks (or the model cannot be built
        # with it): dpo_ds_blocks applies both itself, in every layout, on any device
        blocks = pick(NAME_BLOCKS)
        if features.refusal(blocks, cfg.max_length, on_cpu) is None:
            log.info(
                f"model.attn_implementation=auto: {NAME_BLOCKS} for {cfg.data.layout} rows, where "
                f"{layout.attn or 'the default'} would not keep {features.model_type}'s own attention (model/arch.py)"
            )
            return blocks
    features.check(layout, cfg.max_length, on_cpu)
    return layout
