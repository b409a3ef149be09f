"""What every source yields (PromptGroup, Text, DataError), and rows merged into groups by prompt."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("dpo_ds.data")


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the row and the field."""


Message = dict[str, Any]  # {'role': str, 'content': str, ...}
# A prompt or response is plain text, or a conversation (a list of messages) that the tokenizer's
# chat template renders. A conversational prompt ends before an assistant turn; a conversational
# response is the assistant turn(s) that follow it.
Text = str | list[Message]


@dataclass
class PromptGroup:
    prompt: Text
    responses: list[Text]
    pairs: list[tuple[int, int]]  # (chosen_index, rejected_index) into responses
    sft_target: Text
    truncation_mode: str  # 'keep_start' | 'keep_end'
    # Where each piece came from, for errors raised later (tokenisation): "FILE row I (0-based),
    # field 'F'". Not part of equality: two groups with the same content are the same data.
    prompt_origin: str = dataclasses.field(default="", compare=False)
    response_origins: list[str] = dataclasses.field(default_factory=list, compare=False)
    sft_origin: str = dataclasses.field(default="", compare=False)


class SourceGroups(list):
    """A source's groups (a list of PromptGroup, equal to the plain list of them), and what its reading
    counted: the rows read, and the rows dropped by reason (the data report shows both)."""

    def __init__(self, groups=(), rows: int = 0, dropped: Counter[str] | None = None):
        super().__init__(groups)
        self.rows = rows
        self.dropped = Counter(dropped or {})


def prompt_key(prompt: Text) -> str | tuple:
    """Rows group by prompt; a conversational prompt groups by its exact messages (a tuple of each
    message's sorted items when every value is text, the common case and a tenth of the cost of JSON;
    JSON otherwise, which tells 1 from 1.0 and takes lists)."""
    if isinstance(prompt, str):
        return prompt
    if all(type(v) is str for m in prompt for v in m.values()):
        return tuple(tuple(sorted(m.items())) for m in prompt)
    return "\0" + json.dumps(prompt, sort_keys=True)


class _Groups:
    """Rows with the same prompt merge into one group, in order of first appearance."""

    def __init__(self, truncation_mode: str):
        self.truncation_mode = truncation_mode
        self.by_prompt: dict[str | tuple, PromptGroup] = {}
        self.scores: dict[str | tuple, list[float]] = {}

    def add(
        self,
        prompt: Text,
        responses: list[Text],
        pairs: list[tuple[int, int]],
        *,
        at: str,
        fields: list[str],
        sft_target: Text | None = None,
        sft_field: str | None = None,
        scores: list[float] | None = None,
    ) -> None:
        """`at` names the row ("FILE row I (0-based)"); fields[k] names the column of responses[k]."""
        key = prompt_key(prompt)
        group = self.by_prompt.get(key)
        if group is None:
            # sft_target given: the first row's wins; scores given: the top-scored response, at finish.
            group = PromptGroup(
                prompt,
                [],
                [],
                sft_target if sft_target is not None else "",
                self.truncation_mode,
                prompt_origin=f"{at}, field 'prompt'",
                sft_origin=f"{at}, field '{sft_field}'" if sft_field else "",
            )
            self.by_prompt[key] = group
            self.scores[key] = []
        offset = len(group.responses)
        group.responses.extend(responses)
        group.response_origins.extend(f"{at}, field '{f}'" for f in fields)
        group.pairs.extend((offset + c, offset + r) for c, r in pairs)
        if scores is not None:
            self.scores[key].extend(scores)

    def finish(self, where: str, n_rows: int, dropped: Counter[str]) -> SourceGroups:
        groups = list(self.by_prompt.values())
        for group in groups:
            scores = self.scores[prompt_key(group.prompt)]
            if scores:
                best = max(range(len(scores)), key=lambda k: scores[k])  # first of equal maxima
                group.sft_target = group.responses[best]
                group.sft_origin = group.response_origins[best]
        return loaded(where, n_rows, groups, dropped)


def loaded(where: str, n_rows: int, groups: list[PromptGroup], dropped: Counter[str]) -> SourceGroups:
    """A source's groups as read: logged (rows -> groups, pairs, what was dropped) and counted."""
    _log_summary(where, n_rows, groups, dropped)
    return SourceGroups(groups, n_rows, dropped)


def _log_summary(where: str, n_rows: int, groups: list[PromptGroup], dropped: Counter[str]) -> None:
    n_pairs = sum(len(g.pairs) for g in groups)
    logger.info("%s: %d rows -> %d prompt groups, %d pairs", where, n_rows, len(groups), n_pairs)
    if dropped:
        reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
        logger.warning("%s: dropped %d of %d rows: %s", where, sum(dropped.values()), n_rows, reasons)
    no_pairs = sum(1 for g in groups if not g.pairs)
    if no_pairs:
        logger.info("%s: %d prompt groups have no preference pair (usable for SFT only)", where, no_pairs)
