"""Preference data sources -> a list of PromptGroup, all read through `datasets`.

Spec forms accepted by `load_source(spec, split)`:

  hh, shp, se            Anthropic/hh-rlhf, stanfordnlp/SHP, HuggingFaceH4/stack-exchange-preferences
                         from the Hugging Face hub (or its local cache).
  hh:DIR, shp:DIR        the same parsing, from DIR/{split}.jsonl|json|parquet (optionally .gz for json)
                         with the hub's columns.
  se:DIR                 the same parsing, from DIR/train.jsonl|json|parquet, then the held-out rule.
                         stack-exchange has only a train split: 'test' is the 1% of questions whose
                         sha256(raw question HTML) falls in bucket 0 of 100, 'train' the rest.
  demo                   the bundled demo data, dpo_ds/demo/data/{split}.jsonl (original format).
  PATH.jsonl|json|parquet  a local file; the 'test' split is the sibling with 'train' replaced by
                         'test' in the file name.
  DIR                    a local directory holding {split}.jsonl|json|parquet.

Local files hold one of two row formats, detected from the columns:
  original  prompt (str), responses (list[str]), pairs (list of [chosen, rejected] indices),
            sft_target (str), optional truncation_mode ('keep_start' | 'keep_end').
            Rows are taken as they are (one group per row).
  flat      prompt, chosen, rejected (str each); rows with the same prompt are grouped,
            each row adds two responses and the pair (i, i + 1); sft_target = the first chosen.
Local truncation_mode defaults to 'keep_end' (hh: 'keep_end', shp and se: 'keep_start', as in the
original DPO code).

Row numbers in error messages are 0-based (the index `dataset[i]` would use).

The hub-shaped parsers follow eric-mitchell/direct-preference-optimization `preference_datasets.py`.
Rows they cannot use (hh rows whose chosen and rejected responses are equal, SHP rows under the
score-ratio threshold, ...) are dropped, counted and logged on the "dpo_ds.data" logger; a row with a
missing column or a value of the wrong type is a DataError naming the file, row and field.

`datasets` is imported inside functions so that this module imports in milliseconds.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

logger = logging.getLogger("dpo_ds.data")

TRUNCATION_MODES = ("keep_start", "keep_end")
# A local prompt is most often a conversation, whose latest turns matter most when it is too long.
LOCAL_DEFAULT_TRUNCATION = "keep_end"

HUB_NAMES = {
    "hh": "Anthropic/hh-rlhf",
    "shp": "stanfordnlp/SHP",
    "se": "HuggingFaceH4/stack-exchange-preferences",
}
# Suffixes tried, in this order, for {split}.* in a directory. json files may hold JSON lines.
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")

SHP_MIN_SCORE_RATIO = 2.0  # as in the original DPO code: keep pairs with a clear preference
SE_TEST_PERCENT = 1  # percent of stack-exchange questions held out as 'test'

ACCEPTED_FORMS = (
    "'hh', 'shp', 'se' (Hugging Face hub); 'hh:DIR', 'shp:DIR', 'se:DIR' (local copies shaped like "
    "the hub's rows); 'demo'; a local file ending .jsonl, .json or .parquet; or a directory holding "
    "{split}.jsonl|json|parquet"
)


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the row and the field."""


@dataclass
class PromptGroup:
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]  # (chosen_index, rejected_index) into responses
    sft_target: str
    truncation_mode: str  # 'keep_start' | 'keep_end'


# ---------------------------------------------------------------------------------------------
# public entry points


def load_source(spec: str, split: str, cache_dir: str | None = None) -> list[PromptGroup]:
    """Load one source (see the module docstring for `spec`) as a deterministic list of groups."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data source must be a non-empty string, got {spec!r}; accepted: {ACCEPTED_FORMS}")

    if spec in HUB_NAMES:
        return _load_hub_source(spec, split, cache_dir)
    kind, sep, rest = spec.partition(":")
    if sep and kind in HUB_NAMES:
        if not rest:
            raise DataError(f"data source {spec!r}: expected '{kind}:DIR' with a directory after the colon")
        return _load_hub_shaped_dir(kind, Path(rest), split, cache_dir)
    if spec == "demo":
        demo_dir = Path(__file__).resolve().parent.parent / "demo" / "data"
        return _load_local_dir(demo_dir, split, cache_dir)

    path = Path(spec)
    if path.is_dir():
        return _load_local_dir(path, split, cache_dir)
    if _local_suffix(path) is not None:
        return _load_local_file(path, split, cache_dir)
    raise DataError(
        f"unknown data source {spec!r}: not a known name and no such directory "
        f"(nor a file ending {', '.join(LOCAL_SUFFIXES)}); accepted forms: {ACCEPTED_FORMS}"
    )


def load_sources(specs: list[str], split: str, cache_dir: str | None = None) -> list[PromptGroup]:
    """Concatenate several sources, in the order given."""
    if isinstance(specs, str):  # a lone string would otherwise be iterated character by character
        specs = [specs]
    groups: list[PromptGroup] = []
    for spec in specs:
        groups.extend(load_source(spec, split, cache_dir=cache_dir))
    return groups


# ---------------------------------------------------------------------------------------------
# finding and reading files


def _local_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _find_split_file(directory: Path, split: str) -> Path:
    if not directory.is_dir():
        what = "is a file, expected a directory" if directory.exists() else "does not exist"
        raise DataError(f"data directory {directory} {what}")
    found = [directory / f"{split}{s}" for s in LOCAL_SUFFIXES if (directory / f"{split}{s}").is_file()]
    if not found:
        looked = ", ".join(f"{split}{s}" for s in LOCAL_SUFFIXES)
        raise DataError(f"no '{split}' file in {directory}: looked for {looked}")
    if len(found) > 1:
        raise DataError(
            f"several '{split}' files in {directory}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0]


def _read_file(path: Path, cache_dir: str | None):
    """One local file -> a `datasets.Dataset`."""
    import datasets

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    builder = "parquet" if path.name.lower().endswith(".parquet") else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from e


def _read_hub(kind: str, split: str, cache_dir: str | None):
    import datasets

    name = HUB_NAMES[kind]
    try:
        # stack-exchange-preferences has only a 'train' split; 'test' is held out from it.
        hub_split = "train" if kind == "se" else split
        return datasets.load_dataset(name, split=hub_split, cache_dir=cache_dir)
    except Exception as e:
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        why = " (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if offline else ""
        files = "train.*" if kind == "se" else f"{split}.jsonl|json|parquet"
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub{why}: {type(e).__name__}: {e}. "
            f"This machine may be offline and the dataset is not in the cache. To use a local copy, "
            f"pass '{kind}:DIR' where DIR holds {files} with the hub's columns."
        ) from e


def _rows(ds, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of `ds` as dicts of the given columns, in file order (batched: cheap on large data)."""
    ds = ds.select_columns(columns)
    for batch in ds.iter(batch_size=1024):
        for k in range(len(batch[columns[0]])):
            yield {c: batch[c][k] for c in columns}


def _require_columns(ds, where: str, required: list[str], what: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} for {what}; columns found {sorted(ds.column_names)}, "
            f"expected {required}"
        )


# ---------------------------------------------------------------------------------------------
# hub and hub-shaped sources


def _load_hub_source(kind: str, split: str, cache_dir: str | None) -> list[PromptGroup]:
    ds = _read_hub(kind, split, cache_dir)
    return _PARSERS[kind](ds, f"{HUB_NAMES[kind]} ({'train' if kind == 'se' else split})", split)


def _load_hub_shaped_dir(kind: str, directory: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    path = _find_split_file(directory, "train" if kind == "se" else split)
    return _PARSERS[kind](_read_file(path, cache_dir), str(path), split)


def _parse_hh(ds, where: str, split: str) -> list[PromptGroup]:
    """Anthropic/hh-rlhf: `chosen` and `rejected` are full transcripts sharing the prompt."""
    _require_columns(ds, where, ["chosen", "rejected"], "Anthropic/hh-rlhf rows")
    marker = "\n\nAssistant:"
    groups = _Groups("keep_end")  # the original DPO code keeps the end of long hh conversations
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, ["chosen", "rejected"])):
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
        groups.add(prompt, [chosen_response, rejected_response], [(0, 1)], sft_target=chosen_response)
    return groups.finish(where, n_rows, dropped)


def _parse_shp(ds, where: str, split: str) -> list[PromptGroup]:
    """stanfordnlp/SHP: two reddit comments per row, labels == 1 means A is preferred."""
    fields = ["history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"]
    _require_columns(ds, where, fields, "stanfordnlp/SHP rows")
    groups = _Groups("keep_start")
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, fields)):
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
        groups.add(prompt, responses, [pair], scores=[score_a, score_b])
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
    for i, row in enumerate(_rows(ds, ["question", "answers"])):
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
        groups.add(prompt, responses, pairs, scores=scores)
    logger.info(
        "%s: %d of %d rows are in split %r (%d%% of questions held out as 'test' by a hash of the question)",
        where, n_rows, n_rows + n_other_split, split, SE_TEST_PERCENT,
    )  # fmt: skip
    return groups.finish(where, n_rows, dropped)


_PARSERS = {"hh": _parse_hh, "shp": _parse_shp, "se": _parse_se}


# ---------------------------------------------------------------------------------------------
# local files in the original or flat format


def _load_local_dir(directory: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    path = _find_split_file(directory, split)
    return _parse_local(_read_file(path, cache_dir), str(path))


def _load_local_file(path: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if split == "test":
        if "train" not in path.name:
            raise DataError(
                f"no 'test' split for {path}: the test file is looked for as a sibling with 'train' "
                f"replaced by 'test' in the name, and {path.name!r} has no 'train' in it"
            )
        sibling = path.with_name(path.name.replace("train", "test"))
        if not sibling.is_file():
            raise DataError(f"no 'test' split for {path}: looked for {sibling}, which does not exist")
        path = sibling
    return _parse_local(_read_file(path, cache_dir), str(path))


ORIGINAL_COLUMNS = ["prompt", "responses", "pairs", "sft_target"]
FLAT_COLUMNS = ["prompt", "chosen", "rejected"]


def _parse_local(ds, where: str) -> list[PromptGroup]:
    columns = set(ds.column_names)
    if set(ORIGINAL_COLUMNS) <= columns:
        return _parse_original(ds, where)
    if set(FLAT_COLUMNS) <= columns:
        return _parse_flat(ds, where)
    raise DataError(
        f"{where}: unrecognised columns {sorted(columns)}; expected the original format "
        f"{ORIGINAL_COLUMNS} (+ optional 'truncation_mode') or the flat format {FLAT_COLUMNS}"
    )


def _parse_original(ds, where: str) -> list[PromptGroup]:
    has_mode = "truncation_mode" in ds.column_names
    columns = ORIGINAL_COLUMNS + (["truncation_mode"] if has_mode else [])
    groups = []
    for i, row in enumerate(_rows(ds, columns)):
        prompt = _str_field(row, "prompt", where, i)
        responses = row["responses"]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise _bad(where, i, "responses", "a non-empty list of strings", responses)
        pairs = _pairs_field(row["pairs"], len(responses), where, i)
        sft_target = _str_field(row, "sft_target", where, i)
        mode = row["truncation_mode"] if has_mode else None
        if mode is None:
            mode = LOCAL_DEFAULT_TRUNCATION
        elif mode not in TRUNCATION_MODES:
            raise _bad(where, i, "truncation_mode", f"one of {list(TRUNCATION_MODES)} or null", mode)
        groups.append(PromptGroup(prompt, list(responses), pairs, sft_target, mode))
    _log_summary(where, len(groups), groups, Counter())
    return groups


def _parse_flat(ds, where: str) -> list[PromptGroup]:
    groups = _Groups(LOCAL_DEFAULT_TRUNCATION)
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, FLAT_COLUMNS)):
        n_rows += 1
        prompt = _str_field(row, "prompt", where, i)
        chosen = _str_field(row, "chosen", where, i)
        rejected = _str_field(row, "rejected", where, i)
        if chosen == rejected:
            dropped["chosen and rejected identical"] += 1
            continue
        groups.add(prompt, [chosen, rejected], [(0, 1)], sft_target=chosen)
    return groups.finish(where, n_rows, dropped)


# ---------------------------------------------------------------------------------------------
# grouping, validation helpers, logging


class _Groups:
    """Rows with the same prompt merge into one group, in order of first appearance."""

    def __init__(self, truncation_mode: str):
        self.truncation_mode = truncation_mode
        self.by_prompt: dict[str, PromptGroup] = {}
        self.scores: dict[str, list[float]] = {}

    def add(
        self,
        prompt: str,
        responses: list[str],
        pairs: list[tuple[int, int]],
        sft_target: str | None = None,
        scores: list[float] | None = None,
    ) -> None:
        group = self.by_prompt.get(prompt)
        if group is None:
            # sft_target given: the first row's wins; scores given: the top-scored response, at finish.
            group = PromptGroup(prompt, [], [], sft_target or "", self.truncation_mode)
            self.by_prompt[prompt] = group
            self.scores[prompt] = []
        offset = len(group.responses)
        group.responses.extend(responses)
        group.pairs.extend((offset + c, offset + r) for c, r in pairs)
        if scores is not None:
            self.scores[prompt].extend(scores)

    def finish(self, where: str, n_rows: int, dropped: Counter[str]) -> list[PromptGroup]:
        groups = list(self.by_prompt.values())
        for group in groups:
            scores = self.scores[group.prompt]
            if scores:
                best = max(range(len(scores)), key=lambda k: scores[k])  # first of equal maxima
                group.sft_target = group.responses[best]
        _log_summary(where, n_rows, groups, dropped)
        return groups


def _log_summary(where: str, n_rows: int, groups: list[PromptGroup], dropped: Counter[str]) -> None:
    n_pairs = sum(len(g.pairs) for g in groups)
    logger.info("%s: %d rows -> %d prompt groups, %d pairs", where, n_rows, len(groups), n_pairs)
    if dropped:
        reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(dropped.items()))
        logger.warning("%s: dropped %d of %d rows: %s", where, sum(dropped.values()), n_rows, reasons)
    no_pairs = sum(1 for g in groups if not g.pairs)
    if no_pairs:
        logger.info("%s: %d prompt groups have no preference pair (usable for SFT only)", where, no_pairs)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(where: str, row: int, field: str, expected: str, got: Any) -> DataError:
    return DataError(f"{where} row {row} (0-based): field '{field}' must be {expected}, got {_short(got)}")


def _str_field(row: dict, field: str, where: str, i: int, name: str | None = None) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise _bad(where, i, name or field, "a string", value)
    return value


def _num_field(row: dict, field: str, where: str, i: int, name: str | None = None) -> float:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(where, i, name or field, "a number", value)
    return value


def _as_int(value: Any) -> int | None:
    """An index or label: ints, and integral floats (arrow turns a column of ints into floats when
    any row of it holds a float)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _pairs_field(value: Any, n_responses: int, where: str, i: int) -> list[tuple[int, int]]:
    expected = (
        f"a list of [chosen, rejected] index pairs into 'responses' ({n_responses} responses), "
        f"with chosen != rejected"
    )
    if not isinstance(value, list):
        raise _bad(where, i, "pairs", expected, value)
    pairs = []
    for pair in value:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise _bad(where, i, "pairs", expected, value)
        chosen, rejected = _as_int(pair[0]), _as_int(pair[1])
        if chosen is None or rejected is None or chosen == rejected:
            raise _bad(where, i, "pairs", expected, value)
        if not (0 <= chosen < n_responses and 0 <= rejected < n_responses):
            raise _bad(where, i, "pairs", expected, value)
        pairs.append((chosen, rejected))
    return pairs


# ---------------------------------------------------------------------------------------------
# HTML -> text for stack-exchange questions and answers


class _HTMLToText(HTMLParser):
    """Block elements become paragraphs separated by a blank line; <pre> becomes a ``` fence with its
    text kept verbatim; inline <code> becomes `code`; <li> becomes '- item'; entities are decoded."""

    BLOCKS = {
        "p", "div", "blockquote", "ul", "ol", "table", "tr", "hr", "section", "article",
        "h1", "h2", "h3", "h4", "h5", "h6", "dl", "dt", "dd",
    }  # fmt: skip
    SKIP = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, bool]] = []  # (text, is a list item)
        self.current: list[str] = []
        self.in_li = False
        self.pre_depth = 0
        self.skip_depth = 0

    def flush(self) -> None:
        text = "".join(self.current)
        self.current = []
        if self.pre_depth:
            return
        lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
        text = "\n".join(lines).strip()
        if text:
            self.blocks.append((text, self.in_li))
        self.in_li = False

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag == "pre":
            if not self.pre_depth:
                self.flush()
            self.pre_depth += 1
        elif self.pre_depth:
            pass  # <code> inside <pre>: the fence already marks it
        elif tag in self.BLOCKS:
            self.flush()
        elif tag == "li":
            self.flush()
            self.current.append("- ")
            self.in_li = True
        elif tag == "br":
            self.current.append("\n")
        elif tag == "code":
            self.current.append("`")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            if self.pre_depth:
                self.pre_depth -= 1
                if not self.pre_depth:
                    code = "".join(self.current).strip("\n")
                    self.current = []
                    if code.strip():
                        self.blocks.append(("```\n" + code + "\n```", False))
        elif self.pre_depth:
            pass
        elif tag in self.BLOCKS or tag == "li":
            self.flush()
        elif tag == "code":
            self.current.append("`")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.pre_depth:
            data = re.sub(r"\s+", " ", data)  # source newlines are not line breaks outside <pre>
        self.current.append(data)

    def text(self) -> str:
        self.close()
        if self.pre_depth:  # unclosed <pre>: keep its text
            self.pre_depth = 0
            code = "".join(self.current).strip("\n")
            self.current = []
            if code.strip():
                self.blocks.append(("```\n" + code + "\n```", False))
        self.flush()
        out = []
        for k, (text, is_li) in enumerate(self.blocks):
            if k:
                out.append("\n" if is_li and self.blocks[k - 1][1] else "\n\n")  # list items: one per line
            out.append(text)
        return "".join(out)


def html_to_text(html: str) -> str:
    """Stack-exchange HTML -> plain text with code kept (see _HTMLToText)."""
    parser = _HTMLToText()
    parser.feed(html)
    return parser.text()
