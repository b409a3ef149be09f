"""Hub and hub-shaped sources: the parsers of Anthropic/hh-rlhf, stanfordnlp/SHP,
HuggingFaceH4/stack-exchange-preferences and HuggingFaceH4/ultrafeedback_binarized rows, read from
the hub or from a local copy ('kind:DIR')."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

from dpo_ds.data.sources.fields import _as_int, _at, _bad, _num_field, _require_columns, _rows, _str_field
from dpo_ds.data.sources.files import _hub_shaped_files
from dpo_ds.data.sources.formats import FLAT_COLUMNS, _parse_preference
from dpo_ds.data.sources.groups import DataError, PromptGroup, _Groups
from dpo_ds.data.sources.html import html_to_text
from dpo_ds.data.sources.readers import _read_file, _read_hub
from dpo_ds.data.sources.specs import HUB_NAMES, _hub_split

logger = logging.getLogger("dpo_ds.data")

SHP_MIN_SCORE_RATIO = 2.0  # as in the original DPO code: keep pairs with a clear preference
SE_TEST_PERCENT = 1  # percent of stack-exchange questions held out as 'test'


def _load_hub_source(kind: str, split: str, cache_dir: str | None) -> list[PromptGroup]:
    ds = _read_hub(kind, split, cache_dir)
    return _PARSERS[kind](ds, f"{HUB_NAMES[kind]} ({_hub_split(kind, split)})", split)


def _load_hub_shaped_dir(kind: str, directory: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    hub_split = _hub_split(kind, split)
    shards, path = _hub_shaped_files(kind, directory, split)
    if shards:
        # the hub repository's own layout (hf download --repo-type dataset)
        import datasets

        try:
            ds = datasets.load_dataset(
                "parquet", data_files=[str(p) for p in shards], split="train", cache_dir=cache_dir
            )
        except Exception as e:
            raise DataError(f"{shards[0].parent}: could not read {hub_split}-*.parquet: {e}") from e
        return _PARSERS[kind](ds, str(directory / "data" / f"{hub_split}-*.parquet"), split)
    return _PARSERS[kind](_read_file(path, cache_dir), str(path), split)


def _parse_hh(ds, where: str, split: str) -> list[PromptGroup]:
    """Anthropic/hh-rlhf: `chosen` and `rejected` are full transcripts sharing the prompt."""
    _require_columns(ds, where, ["chosen", "rejected"], "Anthropic/hh-rlhf rows")
    marker = "\n\nAssistant:"
    groups = _Groups("keep_end")  # the original DPO code keeps the end of long hh conversations
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, ["chosen", "rejected"], where)):
        n_rows += 1
        chosen = _str_field(row, "chosen", where, i)
        rejected = _str_field(row, "rejected", where, i)
        cut = chosen.rfind(marker)
        if cut < 0:
            dropped["chosen has no '\\n\\nAssistant:' turn"] += 1
            continue
        prompt = chosen[: cut + len(marker)]  # up to and including the last assistant marker
        if not rejected.startswith(prompt):
            dropped["rejected does not start with the chosen's prompt"] += 1
            continue
        chosen_response, rejected_response = chosen[len(prompt) :], rejected[len(prompt) :]
        if chosen_response == rejected_response:
            dropped["chosen and rejected responses identical"] += 1
            continue
        groups.add(
            prompt,
            [chosen_response, rejected_response],
            [(0, 1)],
            at=_at(where, i),
            fields=["chosen", "rejected"],
            sft_target=chosen_response,
            sft_field="chosen",
        )
    return groups.finish(where, n_rows, dropped)


def _parse_shp(ds, where: str, split: str) -> list[PromptGroup]:
    """stanfordnlp/SHP: two reddit comments per row, labels == 1 means A is preferred."""
    fields = ["history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"]
    _require_columns(ds, where, fields, "stanfordnlp/SHP rows")
    groups = _Groups("keep_start")
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, fields, where)):
        n_rows += 1
        prompt = "\n\nHuman: " + _str_field(row, "history", where, i) + "\n\nAssistant:"
        responses = [
            " " + _str_field(row, "human_ref_A", where, i),
            " " + _str_field(row, "human_ref_B", where, i),
        ]
        score_a, score_b = _num_field(row, "score_A", where, i), _num_field(row, "score_B", where, i)
        label = row["labels"]
        if _as_int(label) not in (0, 1):
            raise _bad(where, i, "labels", "0 or 1 (1 means human_ref_A is preferred)", label)
        if min(score_a, score_b) <= 0:
            dropped["non-positive score"] += 1
            continue
        if max(score_a / score_b, score_b / score_a) < SHP_MIN_SCORE_RATIO:
            dropped[f"score ratio below {SHP_MIN_SCORE_RATIO:g}"] += 1
            continue
        pair = (0, 1) if _as_int(label) == 1 else (1, 0)
        groups.add(
            prompt,
            responses,
            [pair],
            at=_at(where, i),
            fields=["human_ref_A", "human_ref_B"],
            scores=[score_a, score_b],
        )
    return groups.finish(where, n_rows, dropped)


def _se_held_out(question: str) -> bool:
    """The 'test' rule for stack-exchange: SE_TEST_PERCENT % of questions, by a hash of the raw
    question. Unlike a seeded shuffle it needs no pass over the 10M-answer dataset, and a question
    stays on its side when rows are reordered or added."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < SE_TEST_PERCENT


def _parse_se(ds, where: str, split: str) -> list[PromptGroup]:
    """HuggingFaceH4/stack-exchange-preferences: a question (HTML) and its answers with pm_score."""
    _require_columns(ds, where, ["question", "answers"], "stack-exchange-preferences rows")
    groups = _Groups("keep_start")
    dropped: Counter[str] = Counter()
    n_rows = n_other_split = 0
    for i, row in enumerate(_rows(ds, ["question", "answers"], where)):
        question = _str_field(row, "question", where, i)
        if _se_held_out(question) != (split == "test"):
            n_other_split += 1  # belongs to the other split: not filtered data, so not "dropped"
            continue
        n_rows += 1
        answers = row["answers"]
        if not isinstance(answers, list):
            raise _bad(where, i, "answers", "a list of {'text', 'pm_score'} records", answers)
        if not answers:
            dropped["question without answers"] += 1
            continue
        responses, scores = [], []
        for k, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise _bad(where, i, f"answers[{k}]", "a record with 'text' and 'pm_score'", answer)
            responses.append(" " + html_to_text(_str_field(answer, "text", where, i, f"answers[{k}].text")))
            scores.append(_num_field(answer, "pm_score", where, i, f"answers[{k}].pm_score"))
        # Every strictly better-scored answer is preferred; ties give no pair.
        pairs = []
        for a in range(len(scores)):
            for b in range(a + 1, len(scores)):
                if scores[a] > scores[b]:
                    pairs.append((a, b))
                elif scores[b] > scores[a]:
                    pairs.append((b, a))
        prompt = "\n\nHuman: " + html_to_text(question) + "\n\nAssistant:"
        fields = [f"answers[{k}].text" for k in range(len(responses))]
        groups.add(prompt, responses, pairs, at=_at(where, i), fields=fields, scores=scores)
    logger.info(
        "%s: %d of %d rows are in split %r (%d%% of questions held out as 'test' by a hash of the question)",
        where, n_rows, n_rows + n_other_split, split, SE_TEST_PERCENT,
    )  # fmt: skip
    return groups.finish(where, n_rows, dropped)


def _parse_ultrafeedback(ds, where: str, split: str) -> list[PromptGroup]:
    """HuggingFaceH4/ultrafeedback_binarized: prompt (str), chosen / rejected whole conversations."""
    _require_columns(ds, where, FLAT_COLUMNS, "ultrafeedback_binarized rows")
    return _parse_preference(ds, where)


_PARSERS = {"hh": _parse_hh, "shp": _parse_shp, "se": _parse_se, "ultrafeedback": _parse_ultrafeedback}
