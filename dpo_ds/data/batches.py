"""Prompt groups -> examples -> per-rank micro-batches, deterministically.

Every rank sees the same shuffled stream of examples (seeded per epoch), takes its own contiguous
slice of each global batch, and splits it into micro-batches. Every rank gets the same number of
micro-batches per step: under ZeRO-3 a rank that runs one forward fewer than the others hangs the
job, so the padded path gives each rank gradient_accumulation_steps micro-batches of equal size and
the packed path agrees on a count across ranks through `sync_max`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dpo_ds.data.collate import collate_padded
from dpo_ds.data.sources import PromptGroup
from dpo_ds.data.tokenize import TokenizedSeq, tokenize_example

log = logging.getLogger("dpo_ds.data")


@dataclass
class Example:
    prompt: str
    responses: list[str]  # [chosen, rejected] for preference losses, [sft_target] for SFT
    truncation_mode: str


def flatten(groups: list[PromptGroup], sft: bool) -> list[Example]:
    """One SFT example per prompt (its sft_target), or one preference example per pair."""
    if sft:
        return [Example(g.prompt, [g.sft_target], g.truncation_mode) for g in groups]
    return [
        Example(g.prompt, [g.responses[c], g.responses[r]], g.truncation_mode)
        for g in groups
        for c, r in g.pairs
    ]


@dataclass
class Step:
    index: int  # 0-based optimizer step
    examples_after: int  # global examples seen once this step is done
    micro_batches: list[dict]
    n_local: int  # examples (pairs) on this rank in this step


class Batches:
    """Deterministic batching of one split for one rank."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        *,
        max_length: int,
        max_prompt_length: int,
        global_batch: int,
        world: int,
        rank: int,
        micro_batches_per_step: int,
        seed: int,
        packing: bool = False,
        max_tokens_per_micro_batch: int = 0,
        sync_max: Callable[[int], int] | None = None,
    ):
        if global_batch % world:
            raise ValueError(f"batch of {global_batch} cannot be split evenly over {world} ranks")
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.global_batch = global_batch
        self.world = world
        self.rank = rank
        self.per_rank = global_batch // world
        self.n_micro = micro_batches_per_step
        self.seed = seed
        self.packing = packing
        self.max_tokens = max_tokens_per_micro_batch
        self.sync_max = sync_max or (lambda n: n)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._cache: dict[int, list[TokenizedSeq]] = {}
        self._orders: dict[int, list[int]] = {}

    def tokenized(self, i: int) -> list[TokenizedSeq]:
        if i not in self._cache:
            ex = self.examples[i]
            self._cache[i] = tokenize_example(
                self.tokenizer,
                ex.prompt,
                ex.responses,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                truncation_mode=ex.truncation_mode,
            )
        return self._cache[i]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a step needs
        return self._orders[epoch]

    def _micro_batches(self, local: list[int]) -> list[dict]:
        seqs = [self.tokenized(i) for i in local]
        if self.packing:
            from dpo_ds.data.packing import pack_micro_batches

            return pack_micro_batches(
                seqs, self.max_tokens, self.n_micro, self.sync_max, self.pad_id, self.max_length
            )
        size = len(local) // self.n_micro
        return [collate_padded(seqs[k * size : (k + 1) * size], self.pad_id) for k in range(self.n_micro)]

    def n_steps(self, n_epochs: int | None, n_examples: int | None) -> int:
        total = [len(self.examples) * n_epochs] if n_epochs is not None else []
        if n_examples is not None:
            total.append(n_examples)
        return min(total) // self.global_batch

    def train_steps(
        self, n_epochs: int | None, n_examples: int | None, start_step: int = 0
    ) -> Iterator[Step]:
        """Steps start_step.. of the stream; resuming at step k gives exactly the batches of a fresh run."""
        n = len(self.examples)
        for step in range(start_step, self.n_steps(n_epochs, n_examples)):
            first = step * self.global_batch + self.rank * self.per_rank
            local = []
            for pos in range(first, first + self.per_rank):
                local.append(self._order(pos // n)[pos % n])
            yield Step(step, (step + 1) * self.global_batch, self._micro_batches(local), len(local))

    def eval_batches(self, n_eval_examples: int) -> list[tuple[list[dict], int]]:
        """Held-out examples in global batches of `global_batch`; the remainder is dropped."""
        order = self._order(0)[: min(n_eval_examples, len(self.examples))]
        n_batches = len(order) // self.global_batch
        out = []
        for b in range(n_batches):
            first = b * self.global_batch + self.rank * self.per_rank
            local = order[first : first + self.per_rank]
            out.append((self._micro_batches(local), len(local)))
        return out

    def prompts(self, n: int) -> list[Example]:
        """The first n held-out examples, the same on every rank (for samples during eval)."""
        return [self.examples[i] for i in self._order(0)[:n]]
