"""What the run's own data makes of a micro-batch, for the planner: the collator's rows, not a bound.

Without data the planner takes every sequence at max_length (a bound that a packed row of real pairs rarely
meets). With it, the examples are tokenized as training tokenizes them (data.prepare.tokenization_of) and
collated by the run's layout in micro-batches of the planned size; the largest micro-batch (its tokens and
its scored tokens) is what the activations and logits terms are planned at. Two sources:

    sample_examples   the config's train data read and tokenized now (`dpo-ds plan --data-sample N`)
    a run's Batches   the token cache a launch just built or mapped (cli/steps.py logs that plan at launch)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataTokens:
    tokens: int  # the largest micro-batch's tokens (rows x row length, padding included)
    scored: int  # its scored (response) tokens
    longest: int  # the longest sequence seen
    micro_batches: int  # how many micro-batches were collated
    examples: int

    def describe(self) -> str:
        return (f"the data's largest of {self.micro_batches} micro-batches ({self.examples} examples): "
                f"{self.tokens} tokens, {self.scored} scored; longest sequence {self.longest}")  # fmt: skip


def sample_examples(cfg, model_dir, sft: bool, n: int) -> list:
    """The first n train examples of the config's data, tokenized as training tokenizes them."""
    from dpo_ds.data.batches import flatten
    from dpo_ds.data.prepare import tokenization_of
    from dpo_ds.data.sources import load_source
    from dpo_ds.model.files import load_tokenizer

    tokenization = tokenization_of(cfg, load_tokenizer(model_dir))
    examples = []
    for spec in cfg.datasets:
        examples += flatten(load_source(spec, "train", cfg.data.cache_dir), sft, spec)
        if len(examples) >= n:
            break
    return [tokenization.tokenize(e.prompt, e.responses, e.truncation_mode, e.origins) for e in examples[:n]]


def micro_batch_tokens(examples: list, layout, pairs: int, pad_id: int) -> DataTokens:
    """Collate consecutive groups of `pairs` examples as the layout does (whole rows, before any sequence
    sharding) and keep the largest."""
    tokens = scored = 0
    groups = [examples[k : k + pairs] for k in range(0, len(examples), pairs)]
    for group in groups:
        m = layout.collate(group, pad_id)
        if m.input_ids.numel() > tokens:
            tokens, scored = m.input_ids.numel(), int(m.target_ids.numel())
    longest = max((len(s) for ex in examples for s in ex), default=0)
    return DataTokens(tokens, scored, longest, len(groups), len(examples))
