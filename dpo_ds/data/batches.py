"""Prompt groups -> examples -> per-rank micro-batches, deterministically.

Every rank sees the same shuffled stream of examples (seeded per epoch), takes its own contiguous
slice of each global batch, and splits it into micro-batches. Every rank gets the same number of
micro-batches per step: under ZeRO-3 a rank that runs one forward fewer than the others hangs the
job, so the padded path gives each rank gradient_accumulation_steps micro-batches of equal size and
the packed path agrees on a count across ranks through `sync_max`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dpo_ds.data.layout import Layout
from dpo_ds.data.microbatch import MicroBatch
from dpo_ds.data.sources.groups import PromptGroup, Text
from dpo_ds.data.store import TokenStore
from dpo_ds.data.tokenize import Tokenization, TokenizedSeq

log = logging.getLogger("dpo_ds.data")


@dataclass
class Example:
    prompt: Text
    responses: list[Text]  # [chosen, rejected] for preference losses, [sft_target] for SFT
    truncation_mode: str
    origins: list[str] | None = None  # [prompt's, each response's]: "FILE row I (0-based), field 'F'"
    source: str = ""  # the `datasets` spec it came from: the data report counts by source


def flatten(groups: list[PromptGroup], sft: bool, source: str = "") -> list[Example]:
    """One SFT example per prompt (its sft_target), or one preference example per pair; `source`
    names the spec they came from."""

    def origin(g: PromptGroup, k: int) -> str:
        return g.response_origins[k] if k < len(g.response_origins) else g.prompt_origin

    if sft:
        return [
            Example(
                g.prompt,
                [g.sft_target],
                g.truncation_mode,
                [g.prompt_origin, g.sft_origin or g.prompt_origin],
                source,
            )
            for g in groups
        ]
    return [
        Example(
            g.prompt,
            [g.responses[c], g.responses[r]],
            g.truncation_mode,
            [g.prompt_origin, origin(g, c), origin(g, r)],
            source,
        )
        for g in groups
        for c, r in g.pairs
    ]


@dataclass
class Step:
    index: int  # 0-based optimizer step
    examples_after: int  # global examples seen once this step is done
    micro_batches: list[MicroBatch]
    n_local: int  # examples (pairs) on this rank in this step


class Batches:
    """Deterministic batching of one split for one rank, reading its tokenized examples from a
    TokenStore (data/store.py: memory-mapped, nothing held per example but its lengths)."""

    def __init__(
        self,
        examples: TokenStore | list[Example],
        tokenization: Tokenization,
        *,
        global_batch: int,
        world: int,
        rank: int,
        micro_batches_per_step: int,
        seed: int,
        layout: Layout | None = None,
        max_tokens_per_micro_batch: int = 0,
        sync_max: Callable[[int], int] | None = None,
        split: str = "train",
    ):
        """examples: the split's TokenStore, or its Examples, tokenized here into one in memory (tests,
        tools): before any engine exists, so a row the tokenizer or chat template cannot take stops
        every rank before training starts."""
        if global_batch % world:
            raise ValueError(f"batch of {global_batch} cannot be split evenly over {world} ranks")
        self._texts = None if isinstance(examples, TokenStore) else list(examples)
        self.store = (
            examples if isinstance(examples, TokenStore) else TokenStore.build(examples, tokenization, split)
        )
        self.split = split
        self.tokenization = tokenization
        self.max_length = tokenization.max_length
        tokenizer = tokenization.tok
        self.global_batch = global_batch
        self.world = world
        self.rank = rank
        self.per_rank = global_batch // world
        self.n_micro = micro_batches_per_step
        self.seed = seed
        self.layout = layout or Layout(self.max_length)  # data/layout.py: the run's, chosen once
        self.max_tokens = max_tokens_per_micro_batch
        self.sync_max = sync_max or (lambda n: n)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._orders: dict[int, list[int]] = {}
        self._n_labelled = self.store.labelled()  # (examples,) trained-on tokens, for per-token SFT

    def __len__(self) -> int:
        return len(self.store)

    def tokenized(self, i: int) -> list[TokenizedSeq]:
        return self.store.seqs(i)  # built from the store when a batch asks, not kept

    def _labelled(self, i: int) -> int:
        """Trained-on tokens of example i (a sequence's first token is never scored)."""
        return int(self._n_labelled[i])

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self)))
            random.Random(self.seed * 100003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a step needs
        return self._orders[epoch]

    def _micro_batches(self, local: list[int], batch: list[int]) -> list[MicroBatch]:
        """local: this rank's examples; batch: the whole global batch (every rank knows it), whose
        labelled-token count each micro-batch carries for per-token loss normalisation.

        Each micro-batch also carries `example_ids` (its examples' indices in this split, in the
        order of its pairs) and `split`, which a precomputed reference looks its log-probs up by."""
        seqs = [self.tokenized(i) for i in local]
        if self.layout.segmented:
            from dpo_ds.data.packing import pack_micro_batches

            parts = pack_micro_batches(
                seqs, self.max_tokens, self.n_micro, self.sync_max,
                lambda group: self.layout.micro_batch(group, self.pad_id), self.layout.size,
            )  # fmt: skip
        else:
            size = len(local) // self.n_micro
            parts = []
            for k in range(self.n_micro):
                group = list(range(k * size, (k + 1) * size))
                parts.append((group, self.layout.micro_batch([seqs[i] for i in group], self.pad_id)))
        tokens = sum(self._labelled(i) for i in batch)
        micro = []
        for group, m in parts:
            m.example_ids = torch.tensor([local[i] for i in group], dtype=torch.long)
            m.split = self.split
            m.global_examples, m.global_tokens = len(batch), tokens
            micro.append(m)
        return micro

    def n_steps(self, n_epochs: int | None, n_examples: int | None) -> int:
        total = [len(self) * n_epochs] if n_epochs is not None else []
        if n_examples is not None:
            total.append(n_examples)
        return min(total) // self.global_batch

    def train_steps(
        self, n_epochs: int | None, n_examples: int | None, start_step: int = 0
    ) -> Iterator[Step]:
        """Steps start_step.. of the stream; resuming at step k gives exactly the batches of a fresh run."""
        n = len(self)
        for step in range(start_step, self.n_steps(n_epochs, n_examples)):
            start = step * self.global_batch
            batch = [self._order(pos // n)[pos % n] for pos in range(start, start + self.global_batch)]
            local = batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            yield Step(step, (step + 1) * self.global_batch, self._micro_batches(local, batch), len(local))

    def first_pass(self, n_epochs: int | None, n_examples: int | None) -> Iterator[MicroBatch]:
        """This rank's training micro-batches, in order, up to the step where every example the run
        trains on has been met once (the first epoch, and the step that completes it): what a
        precomputed reference runs so that its values are the ones training computes."""
        steps = self._first_pass_steps(n_epochs, n_examples)
        for step in itertools.islice(self.train_steps(n_epochs, n_examples), steps):
            yield from step.micro_batches

    def _first_pass_steps(self, n_epochs: int | None, n_examples: int | None) -> int:
        return min(self.n_steps(n_epochs, n_examples), -(-len(self) // self.global_batch))

    def first_pass_examples(self, n_epochs: int | None, n_examples: int | None) -> list[int]:
        """The examples of first_pass's micro-batches on every rank together, without building them:
        every example the run trains on (the whole split once the first epoch completes)."""
        return self._order(0)[: self._first_pass_steps(n_epochs, n_examples) * self.global_batch]

    def eval_pass(self, n_eval_examples: int) -> Iterator[MicroBatch]:
        """This rank's eval micro-batches, in order: the same at every eval."""
        for micro_batches, _ in self.eval_batches(n_eval_examples):
            yield from micro_batches

    def eval_examples(self, n_eval_examples: int) -> list[int]:
        """The held-out examples every eval runs, on every rank together, in order: the first
        n_eval_examples, less the remainder of a global batch."""
        n = min(n_eval_examples, len(self))
        return self._order(0)[: n - n % self.global_batch]

    def eval_batches(self, n_eval_examples: int) -> list[tuple[list[MicroBatch], int]]:
        """Held-out examples in global batches of `global_batch`; the remainder is dropped."""
        order = self.eval_examples(n_eval_examples)
        n_batches = len(order) // self.global_batch
        out = []
        for b in range(n_batches):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            local = batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
            out.append((self._micro_batches(local, batch), len(local)))
        return out

    def example(self, i: int) -> Example:
        """Example i as text (the test split's, kept by the store for eval.checker)."""
        if self._texts is not None:
            return self._texts[i]
        row = self.store.row(i)
        return Example(row["prompt"], row["responses"], "keep_end", row["origins"])

    def checked(self, n: int) -> list[tuple[list[int], Example]]:
        """(prompt ids, example) of the first n held-out examples: what a checker scores generations of."""
        return [(self.store.prompt(i).tolist(), self.example(i)) for i in self._order(0)[:n]]

    def prompts(self, n: int) -> list[list[int]]:
        """Prompt ids of the first n held-out examples, the same on every rank (samples during eval):
        rendered and truncated exactly as the model saw them in training and eval."""
        return [ids for ids, _ in self.checked(n)]


def rank_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous share of `items`, padded with the last item to the same length on every
    rank (a ZeRO-3 forward or generate is a collective: every rank makes the same calls); returns the
    share and how many of its items are real (the padding's results are dropped)."""
    per_rank = -(-len(items) // world)
    mine = items[rank * per_rank : (rank + 1) * per_rank]
    n_real = len(mine)
    return mine + items[-1:] * (per_rank - n_real), n_real


def data_digest(splits: list[Batches]) -> str:
    """sha256 over the token ids of every example of the splits, as their stores hashed them when
    they were written (data/cache.py): it changes with the data files, the tokenizer, its chat
    template and every truncation setting; a resume and a precomputed reference are checked against it."""
    h = hashlib.sha256()
    for data in splits:
        h.update(data.split.encode() + data.store.digest.encode())
    return h.hexdigest()


def legacy_digest(splits: list[Batches]) -> str:
    """The digest dpo_ds wrote into run_state.json before its token cache (one pass over the data):
    a checkpoint from then is still resumed when its data did not change."""
    h = hashlib.sha256()
    for data in splits:
        h.update(data.split.encode())
        for i in range(len(data)):
            h.update(i.to_bytes(8, "little"))
            for s in data.tokenized(i):
                h.update(array("q", s.input_ids).tobytes())
                h.update(array("q", s.labels).tobytes())
    return h.hexdigest()
