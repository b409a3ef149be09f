"""Preference data sources -> a list of PromptGroup, all read through `datasets`.

Spec forms accepted by `load_source(spec, split)`:

  hh, shp, se            Anthropic/hh-rlhf, stanfordnlp/SHP, HuggingFaceH4/stack-exchange-preferences
                         from the Hugging Face hub (or its local cache).
  ultrafeedback          HuggingFaceH4/ultrafeedback_binarized, splits train_prefs / test_prefs
                         (conversations: rendered later with the model's chat template).
  hh:DIR, shp:DIR        the same parsing, from DIR/{split}.jsonl|json|parquet (optionally .gz for json)
                         with the hub's columns.
  ultrafeedback:DIR      DIR/{train_prefs|test_prefs}.jsonl|json|parquet, or the hub repository's own
                         layout DIR/data/{split}-NNNNN-of-NNNNN.parquet (as `huggingface-cli download`
                         writes it).
  se:DIR                 the same parsing, from DIR/train.jsonl|json|parquet, then the held-out rule.
                         stack-exchange has only a train split: 'test' is the 1% of questions whose
                         sha256(raw question HTML) falls in bucket 0 of 100, 'train' the rest.
  demo                   the bundled demo data, dpo_ds/demo/data/{split}.jsonl (original format).
  PATH.jsonl|json|parquet  a local file; the 'test' split is the sibling with 'train' replaced by
                         'test' in the file name.
  DIR                    a local directory holding {split}.jsonl|json|parquet.

Local files hold one of these row formats, detected from the columns and the values' types:
  original  prompt (str), responses (list[str]), pairs (list of [chosen, rejected] indices),
            sft_target (str), optional truncation_mode ('keep_start' | 'keep_end').
            Rows are taken as they are (one group per row).
  flat      prompt, chosen, rejected (str each); rows with the same prompt are grouped,
            each row adds two responses and the pair (i, i + 1); sft_target = the first chosen.
  conversational, each message a {'role', 'content'} record:
    ultrafeedback  prompt (str) + chosen / rejected: whole conversations (the user turns repeated,
                   the assistant's answer last); the prompt is the turns before the last.
    trl            prompt: a message list (system and earlier turns allowed); chosen / rejected:
                   lists of assistant messages (TRL's conversational preference shape).
    trl implicit   chosen / rejected whole conversations and no prompt column: the prompt is the
                   turns they share.
    messages       one conversation per row (SFT only): the prompt is everything before the first
                   assistant turn; every assistant turn after it is trained on, nothing else.
  Conversational prompts and responses stay message lists here; data/tokenize.py renders them with
  the tokenizer's chat template.
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

import dataclasses
import hashlib
import json
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
    "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
}
# The hub split each dpo_ds split reads. stack-exchange has only 'train' (its 'test' is held out
# from it); ultrafeedback_binarized names its preference splits train_prefs / test_prefs.
HUB_SPLITS = {
    "se": {"train": "train", "test": "train"},
    "ultrafeedback": {"train": "train_prefs", "test": "test_prefs"},
}
# Suffixes tried, in this order, for {split}.* in a directory. json files may hold JSON lines.
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")

SHP_MIN_SCORE_RATIO = 2.0  # as in the original DPO code: keep pairs with a clear preference
SE_TEST_PERCENT = 1  # percent of stack-exchange questions held out as 'test'

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "data"
ACCEPTED_FORMS = (
    "'hh', 'shp', 'se', 'ultrafeedback' (Hugging Face hub); 'hh:DIR', 'shp:DIR', 'se:DIR', "
    "'ultrafeedback:DIR' (local copies shaped like the hub's rows); 'demo'; a local file ending "
    ".jsonl, .json or .parquet; or a directory holding {split}.jsonl|json|parquet"
)


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
        return _load_local_dir(DEMO_DIR, split, cache_dir)

    path = Path(spec)
    if path.is_dir():
        return _load_local_dir(path, split, cache_dir)
    if _local_suffix(path) is not None:
        return _load_local_file(path, split, cache_dir)
    raise DataError(
        f"unknown data source {spec!r}: not a known name and no such directory "
        f"(nor a file ending {', '.join(LOCAL_SUFFIXES)}); accepted forms: {ACCEPTED_FORMS}"
    )


def source_files(spec: str, split: str) -> list[Path] | None:
    """The files `load_source(spec, split)` reads, found the same way and without reading them (for a
    fingerprint of the data); None for a hub name, which `datasets` resolves through its own cache."""
    if spec in HUB_NAMES:
        return None
    kind, sep, rest = spec.partition(":")
    if sep and kind in HUB_NAMES:
        shards, path = _hub_shaped_files(kind, Path(rest), split)
        return shards or [path]
    if spec == "demo":
        return [_find_split_file(DEMO_DIR, split)]
    path = Path(spec)
    if path.is_dir():
        return [_find_split_file(path, split)]
    return [_split_file_of(path, split)]


def file_identity(path: Path) -> str:
    """Path, size, mtime and a hash of the first and last MiB: what changes when the file does."""
    import hashlib

    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read(1 << 20))
    return f"{path.resolve()} {st.st_size} bytes mtime {st.st_mtime_ns} {h.hexdigest()[:16]}"


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
        raise DataError(f"no '{split}' file in {directory}: looked for {looked}{_hub_layout_hint(directory)}")
    if len(found) > 1:
        raise DataError(
            f"several '{split}' files in {directory}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0]


def _hub_layout_hint(directory: Path) -> str:
    """What to write instead when a plain directory is a hub repository's download (DIR/data/*.parquet)."""
    shards = sorted(p.name for p in directory.glob("data/*.parquet"))
    if not shards:
        return ""
    for kind, splits in HUB_SPLITS.items():
        if any(name.startswith(f"{hub}-") for hub in set(splits.values()) - {"train"} for name in shards):
            return (
                f". {directory} is shaped like the hub repository {HUB_NAMES[kind]} "
                f"({directory / 'data' / shards[0]}, ...): read it with '{kind}:{directory}'"
            )
    return (
        f". {directory} holds a hub repository's data/*.parquet ({shards[0]}, ...): read it with the hub "
        f"parser of its rows, as 'hh:DIR', 'shp:DIR', 'se:DIR' or 'ultrafeedback:DIR'"
    )


def _read_file(path: Path, cache_dir: str | None):
    """One local file -> a `datasets.Dataset`. JSON files that `datasets` cannot read get an error
    naming the line; a JSON object keyed by prompt (the original code's in-memory shape) is read as
    rows of the original format; an empty file is an error that says so."""
    import datasets

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    builder = "parquet" if path.name.lower().endswith(".parquet") else "json"
    if builder == "json":
        kind = _json_kind(path)
        if kind == "empty":
            raise DataError(f"{path} is empty: no rows")
        if kind == "object":
            return datasets.Dataset.from_list(_prompt_keyed_rows(path))
        # arrow accepts invalid UTF-8 and fails later, row by row, naming no file: check it all here
        with _open_text(path) as f:
            try:
                f.read().decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}: {_json_problem(path)}") from None
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        where = _json_problem(path) if builder == "json" else None
        if where:
            raise DataError(f"{path}: {where}") from None
        raise DataError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"{path} is empty: no rows")
    return ds


def _open_text(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _json_kind(path: Path) -> str:
    """'empty', 'lines' (JSON lines, or an array: what `datasets` reads) or 'object' (one JSON object
    for the whole file). Reads the first line only, unless the file is one object."""
    with _open_text(path) as f:
        first = f.readline()
        while first and not first.strip():
            first = f.readline()
        if not first:
            return "empty"
        if not first.lstrip().startswith(b"{"):
            return "lines"
        try:
            value = json.loads(first)
        except ValueError:
            return "object"  # an object spread over lines (json.dump with indent)
        rest = f.read(1 << 16).strip()
    # one line holding the whole file: a row, unless every value is a dict (the prompt-keyed shape)
    keyed = isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values())
    return "object" if keyed and not rest else "lines"


def _prompt_keyed_rows(path: Path) -> list[dict]:
    """{prompt: {responses, pairs, sft_target}}: the dict the original code's get_dataset returns,
    saved with json.dump. One row per prompt in the original format."""
    where = str(path)
    try:
        with _open_text(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {_json_problem(path) or e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(
            f"{path} holds one JSON object that is not keyed by prompt; expected JSON lines, a JSON array of "
            f"rows, or the original code's {{prompt: {{'responses', 'pairs', 'sft_target'}}}}"
        )
    rows = []
    for i, (prompt, value) in enumerate(data.items()):
        missing = [k for k in ORIGINAL_COLUMNS[1:] if k not in value]
        if missing:
            raise DataError(f"{where} entry {i} (prompt {_short(prompt)}): missing {missing}")
        rows.append({"prompt": prompt, **{k: value[k] for k in ORIGINAL_COLUMNS[1:]}})
    if not rows:
        raise DataError(f"{path} is empty: an object with no prompts")
    return rows


def _json_problem(path: Path) -> str | None:
    """The first line that is not UTF-8 or not JSON, said as 'line L (row R, 0-based): ...'."""
    with _open_text(path) as f:
        raw = f.read()
    row = -1
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"line {n} (row {row}, 0-based) is not valid UTF-8 (byte {e.start}: {line[e.start : e.start + 6]!r})"
        if raw.lstrip().startswith(b"["):
            continue  # one JSON array: the whole document is checked below
        try:
            json.loads(text)
        except ValueError as e:
            return f"line {n} (row {row}, 0-based) is not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})"
    try:
        json.loads(raw.decode("utf-8")) if raw.lstrip().startswith(b"[") else None
    except ValueError as e:
        return f"line {getattr(e, 'lineno', '?')} is not valid JSON ({getattr(e, 'msg', e)})"
    return None


def _hub_split(kind: str, split: str) -> str:
    return HUB_SPLITS.get(kind, {}).get(split, split)


def _read_hub(kind: str, split: str, cache_dir: str | None):
    import datasets

    name = HUB_NAMES[kind]
    hub_split = _hub_split(kind, split)
    try:
        return datasets.load_dataset(name, split=hub_split, cache_dir=cache_dir)
    except Exception as e:
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
        why = " (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if offline else ""
        files = f"{hub_split}.jsonl|json|parquet"
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub{why}: {type(e).__name__}: {e}. "
            f"This machine may be offline and the dataset is not in the cache. To use a local copy, "
            f"pass '{kind}:DIR' where DIR holds {files} with the hub's columns."
        ) from e


def _rows(ds, columns: list[str], where: str) -> Iterator[dict[str, Any]]:
    """Rows of `ds` as dicts of the given columns, in file order (batched: cheap on large data)."""
    ds = ds.select_columns(columns)
    i = 0
    for batch in ds.iter(batch_size=1024):
        for k in range(len(batch[columns[0]])):
            row = {c: batch[c][k] for c in columns}
            if all(v is None for v in row.values()):
                raise DataError(
                    f"{_at(where, i)} is null: its line holds `null` (or {{}}), not a row with "
                    f"{', '.join(repr(c) for c in columns)}; remove it"
                )
            yield row
            i += 1


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
    return _PARSERS[kind](ds, f"{HUB_NAMES[kind]} ({_hub_split(kind, split)})", split)


def _hub_shaped_files(kind: str, directory: Path, split: str) -> tuple[list[Path], Path | None]:
    """(the hub repository layout's parquet shards, or [] and the split file) of a 'kind:DIR' source."""
    hub_split = _hub_split(kind, split)
    shards = sorted(directory.glob(f"data/{hub_split}-*.parquet")) if directory.is_dir() else []
    if shards and not any((directory / f"{hub_split}{s}").is_file() for s in LOCAL_SUFFIXES):
        return shards, None
    return [], _find_split_file(directory, hub_split)


def _load_hub_shaped_dir(kind: str, directory: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    hub_split = _hub_split(kind, split)
    shards, path = _hub_shaped_files(kind, directory, split)
    if shards:
        # the hub repository's own layout (huggingface-cli download --repo-type dataset)
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


# ---------------------------------------------------------------------------------------------
# local files: original, flat text, conversational


def _load_local_dir(directory: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    path = _find_split_file(directory, split)
    return _parse_local(_read_file(path, cache_dir), str(path))


def _split_file_of(path: Path, split: str) -> Path:
    """A local file source's file of `split`: itself for train, its sibling with 'test' for 'train'."""
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
    return path


def _load_local_file(path: Path, split: str, cache_dir: str | None) -> list[PromptGroup]:
    path = _split_file_of(path, split)
    return _parse_local(_read_file(path, cache_dir), str(path))


ORIGINAL_COLUMNS = ["prompt", "responses", "pairs", "sft_target"]
FLAT_COLUMNS = ["prompt", "chosen", "rejected"]
PREFERENCE_COLUMNS = ["chosen", "rejected"]  # + 'prompt', except for TRL's implicit-prompt rows
MESSAGES_COLUMNS = ["messages"]


def _parse_local(ds, where: str) -> list[PromptGroup]:
    columns = set(ds.column_names)
    if set(ORIGINAL_COLUMNS) <= columns:
        return _parse_original(ds, where)
    if set(PREFERENCE_COLUMNS) <= columns:
        return _parse_preference(ds, where)
    if set(MESSAGES_COLUMNS) <= columns:
        return _parse_messages(ds, where)
    raise DataError(
        f"{where}: unrecognised columns {sorted(columns)}; expected the original format "
        f"{ORIGINAL_COLUMNS} (+ optional 'truncation_mode'), preference rows {FLAT_COLUMNS} (text, or "
        f"conversations as lists of {{'role', 'content'}} messages; 'prompt' may be left out when "
        f"chosen and rejected are whole conversations), or conversations for SFT {MESSAGES_COLUMNS}"
    )


def _parse_original(ds, where: str) -> list[PromptGroup]:
    has_mode = "truncation_mode" in ds.column_names
    columns = ORIGINAL_COLUMNS + (["truncation_mode"] if has_mode else [])
    groups = []
    for i, row in enumerate(_rows(ds, columns, where)):
        prompt = _str_field(row, "prompt", where, i)
        responses = row["responses"]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise _bad(where, i, "responses", "a non-empty list of strings", responses)
        for k in range(len(responses)):
            _response_field({"r": responses[k]}, "r", where, i, f"responses[{k}]")
        pairs = _pairs_field(row["pairs"], len(responses), where, i)
        sft_target = _str_field(row, "sft_target", where, i)
        mode = row["truncation_mode"] if has_mode else None
        if mode is None:
            mode = LOCAL_DEFAULT_TRUNCATION
        elif mode not in TRUNCATION_MODES:
            raise _bad(where, i, "truncation_mode", f"one of {list(TRUNCATION_MODES)} or null", mode)
        at = _at(where, i)
        groups.append(
            PromptGroup(
                prompt,
                list(responses),
                pairs,
                sft_target,
                mode,
                prompt_origin=f"{at}, field 'prompt'",
                response_origins=[f"{at}, field 'responses[{k}]'" for k in range(len(responses))],
                sft_origin=f"{at}, field 'sft_target'",
            )
        )
    _log_summary(where, len(groups), groups, Counter())
    return groups


def _parse_preference(ds, where: str) -> list[PromptGroup]:
    """Preference rows, text or conversational; the shape is read from each row's value types."""
    has_prompt = "prompt" in ds.column_names
    groups = _Groups(LOCAL_DEFAULT_TRUNCATION)
    dropped: Counter[str] = Counter()
    n_rows = 0
    for i, row in enumerate(_rows(ds, (["prompt"] if has_prompt else []) + PREFERENCE_COLUMNS, where)):
        n_rows += 1
        prompt, chosen, rejected = _preference_row(row, where, i, has_prompt)
        if chosen == rejected:
            dropped["chosen and rejected identical"] += 1
            continue
        groups.add(
            prompt,
            [chosen, rejected],
            [(0, 1)],
            at=_at(where, i),
            fields=["chosen", "rejected"],
            sft_target=chosen,
            sft_field="chosen",
        )
    return groups.finish(where, n_rows, dropped)


def _preference_row(row: dict, where: str, i: int, has_prompt: bool) -> tuple[Text, Text, Text]:
    """(prompt, chosen, rejected) of one row in any of the preference shapes."""
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row["prompt"] if has_prompt else None
    if isinstance(chosen, str) or isinstance(rejected, str):  # flat text
        if not has_prompt:
            raise DataError(
                f"{_at(where, i)}: text 'chosen' / 'rejected' need a 'prompt' column (only whole "
                f"conversations, lists of messages, can leave the prompt out)"
            )
        return (
            _str_field(row, "prompt", where, i),
            _response_field(row, "chosen", where, i),
            _response_field(row, "rejected", where, i),
        )
    chosen = _messages(chosen, where, i, "chosen")
    rejected = _messages(rejected, where, i, "rejected")
    if chosen == rejected:
        return prompt, chosen, rejected  # the caller drops it and counts it
    if isinstance(prompt, list):  # TRL: the prompt's turns, then assistant-only responses
        prompt = _messages(prompt, where, i, "prompt")
        _answers(chosen, where, i, "chosen")
        _answers(rejected, where, i, "rejected")
        return prompt, chosen, rejected
    if prompt is not None and not isinstance(prompt, str):
        raise _bad(where, i, "prompt", "a string or a list of {'role', 'content'} messages", prompt)
    # UltraFeedback (prompt: str) and TRL's implicit prompt (no prompt): chosen and rejected are whole
    # conversations that share their first turns; the shared turns are the prompt.
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if prompt is not None:
        shared = min(shared, len(chosen) - 1, len(rejected) - 1)  # UltraFeedback: the answer is the last turn
        if chosen[:-1] != rejected[:-1]:
            raise DataError(
                f"{_at(where, i)}: 'chosen' and 'rejected' must repeat the same turns before the "
                f"answer; they differ at message {shared}"
            )
    if shared == 0:
        raise DataError(
            f"{_at(where, i)}: 'chosen' and 'rejected' share no first turn, so there is no prompt; "
            f"give the prompt's messages in a 'prompt' column"
        )
    turns = chosen[:shared]
    if isinstance(prompt, str):
        users = [m["content"] for m in turns if m["role"] == "user"]
        if not users or users[-1] != prompt:
            raise DataError(
                f"{_at(where, i)}: field 'prompt' {_short(prompt)} is not the last user turn of 'chosen' "
                f"({_short(users[-1]) if users else 'no user turn'}); the conversation in 'chosen' is "
                f"what is trained on, so the two must agree"
            )
    _answers(chosen[shared:], where, i, "chosen", offset=shared)
    _answers(rejected[shared:], where, i, "rejected", offset=shared)
    return turns, chosen[shared:], rejected[shared:]


def _parse_messages(ds, where: str) -> list[PromptGroup]:
    """One conversation per row, for SFT: the prompt is everything before the first assistant turn,
    the target everything from there (its non-assistant turns are rendered but not trained on).
    Rows are not grouped by prompt: two chats that open alike are still two examples."""
    groups = []
    for i, row in enumerate(_rows(ds, MESSAGES_COLUMNS, where)):
        messages = _messages(row["messages"], where, i, "messages")
        first = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None or first == 0:
            raise _bad(
                where,
                i,
                "messages",
                "a conversation with at least one turn (the prompt) before an assistant turn",
                messages,
            )
        if messages[-1]["role"] != "assistant":
            raise _bad(
                where,
                i,
                f"messages[{len(messages) - 1}].role",
                "'assistant': a conversation for SFT ends with the assistant's turn",
                messages[-1]["role"],
            )
        at = _at(where, i)
        groups.append(
            PromptGroup(
                messages[:first],
                [],
                [],
                messages[first:],
                LOCAL_DEFAULT_TRUNCATION,
                prompt_origin=f"{at}, field 'messages'",
                sft_origin=f"{at}, field 'messages'",
            )
        )
    _log_summary(where, len(groups), groups, Counter())
    return groups


def _messages(value: Any, where: str, i: int, name: str) -> list[Message]:
    """A non-empty list of {'role': str, 'content': str} records. Keys whose value is null are
    dropped: arrow gives every struct in a column the same keys, filling the absent ones with null."""
    expected = "a non-empty list of {'role', 'content'} messages"
    if not isinstance(value, list) or not value:
        raise _bad(where, i, name, expected, value)
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(where, i, f"{name}[{k}]", "a {'role', 'content'} record", m)
        m = {key: v for key, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise _bad(where, i, f"{name}[{k}].role", "a non-empty string", m.get("role"))
        if not isinstance(m.get("content"), str):
            raise _bad(
                where,
                i,
                f"{name}[{k}].content",
                "a string (content given as a list of parts is not supported)",
                m.get("content"),
            )
        out.append(m)
    return out


def _answers(messages: list[Message], where: str, i: int, name: str, offset: int = 0) -> None:
    if not messages:
        raise _bad(where, i, name, "at least one assistant message after the prompt", messages)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            raise _bad(
                where,
                i,
                f"{name}[{offset + k}].role",
                "'assistant': a response holds the assistant's turn(s) only",
                m["role"],
            )
        _response_field(m, "content", where, i, f"{name}[{offset + k}].content")


# ---------------------------------------------------------------------------------------------
# grouping, validation helpers, logging


def _at(where: str, row: int) -> str:
    return f"{where} row {row} (0-based)"


def _key(prompt: Text) -> str | tuple:
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
        key = _key(prompt)
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

    def finish(self, where: str, n_rows: int, dropped: Counter[str]) -> list[PromptGroup]:
        groups = list(self.by_prompt.values())
        for group in groups:
            scores = self.scores[_key(group.prompt)]
            if scores:
                best = max(range(len(scores)), key=lambda k: scores[k])  # first of equal maxima
                group.sft_target = group.responses[best]
                group.sft_origin = group.response_origins[best]
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


def _response_field(row: dict, field: str, where: str, i: int, name: str | None = None) -> str:
    """A response's text: a string with more than whitespace in it. An empty answer would be trained on
    as "stop at once" (its whole target is the EOS), silently."""
    value = _str_field(row, field, where, i, name)
    if not value.strip():
        raise _bad(
            where,
            i,
            name or field,
            "a non-empty response (an empty one trains the model to stop at once)",
            value,
        )
    return value


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
