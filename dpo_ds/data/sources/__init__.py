"""Preference data sources -> a list of PromptGroup, all read through `datasets`.

Spec forms accepted by `load_source(spec, split)`:

  hh, shp, se            Anthropic/hh-rlhf, stanfordnlp/SHP, HuggingFaceH4/stack-exchange-preferences
                         from the Hugging Face hub (or its local cache).
  ultrafeedback          HuggingFaceH4/ultrafeedback_binarized, splits train_prefs / test_prefs
                         (conversations: rendered later with the model's chat template).
  hh:DIR, shp:DIR        the same parsing, from DIR/{split}.jsonl|json|parquet (optionally .gz for json)
                         with the hub's columns.
  ultrafeedback:DIR      DIR/{train_prefs|test_prefs}.jsonl|json|parquet, or the hub repository's own
                         layout DIR/data/{split}-NNNNN-of-NNNNN.parquet (as `hf download`
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

`datasets` is imported inside functions so that this package imports in milliseconds.

The package, by job: specs (the known names, splits and suffixes), files (finding a source's
files), readers (a file or a hub dataset -> a `datasets.Dataset`), hub (the hub-shaped parsers),
formats (the local row formats), fields (checks of a row's values), groups (PromptGroup, DataError,
rows merged by prompt), html (stack-exchange HTML -> text). The entry points are here.
"""

from __future__ import annotations

from pathlib import Path

from dpo_ds.data.sources.files import (
    _find_split_file,
    _hub_shaped_files,
    _local_suffix,
    _split_file_of,
    file_identity,
)
from dpo_ds.data.sources.formats import (
    FLAT_COLUMNS,
    LOCAL_DEFAULT_TRUNCATION,
    MESSAGES_COLUMNS,
    ORIGINAL_COLUMNS,
    PREFERENCE_COLUMNS,
    TRUNCATION_MODES,
    _parse_local,
)
from dpo_ds.data.sources.groups import DataError, Message, PromptGroup, SourceGroups, Text, prompt_key
from dpo_ds.data.sources.html import html_to_text
from dpo_ds.data.sources.hub import (
    SE_TEST_PERCENT,
    SHP_MIN_SCORE_RATIO,
    _load_hub_shaped_dir,
    _load_hub_source,
    _se_held_out,
)
from dpo_ds.data.sources.readers import _read_file, _read_hub
from dpo_ds.data.sources.specs import (
    ACCEPTED_FORMS,
    DEMO_DIR,
    HUB_NAMES,
    HUB_SPLITS,
    LOCAL_SUFFIXES,
    _hub_split,
    closest_name,
    known_names,
)

__all__ = [
    "ACCEPTED_FORMS",
    "DEMO_DIR",
    "DataError",
    "FLAT_COLUMNS",
    "HUB_NAMES",
    "HUB_SPLITS",
    "LOCAL_DEFAULT_TRUNCATION",
    "LOCAL_SUFFIXES",
    "MESSAGES_COLUMNS",
    "Message",
    "ORIGINAL_COLUMNS",
    "PREFERENCE_COLUMNS",
    "PromptGroup",
    "SourceGroups",
    "SE_TEST_PERCENT",
    "SHP_MIN_SCORE_RATIO",
    "TRUNCATION_MODES",
    "Text",
    "_hub_split",
    "_read_hub",
    "_se_held_out",
    "file_identity",
    "html_to_text",
    "load_source",
    "load_sources",
    "prompt_key",
    "resolve_spec",
    "source_files",
]


def resolve_spec(spec: str) -> tuple[str, Path | None]:
    """What a source spec names, decided in one place for loading and fingerprinting alike:
    (hub name, None), (hub name, DIR) for 'name:DIR', ('dir', DIR) for 'demo' or a directory, or
    ('file', PATH). Known names are matched before the filesystem is asked, so a mistyped name is
    told the names it could have meant, not that no such file exists."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data source must be a non-empty string, got {spec!r}; accepted: {ACCEPTED_FORMS}")
    if spec in HUB_NAMES:
        return spec, None
    kind, sep, rest = spec.partition(":")
    if sep and kind in HUB_NAMES:
        if not rest:
            raise DataError(f"data source {spec!r}: expected '{kind}:DIR' with a directory after the colon")
        return kind, Path(rest)
    if spec == "demo":
        return "dir", DEMO_DIR
    path = Path(spec)
    if path.is_dir():
        return "dir", path
    if path.is_file():
        if _local_suffix(path) is None:
            raise DataError(
                f"data source {spec!r}: the file {path} exists, but a data file ends "
                f"{', '.join(LOCAL_SUFFIXES)}; accepted forms: {ACCEPTED_FORMS}"
            )
        return "file", path
    raise DataError(_unknown_spec(spec, path))


def _unknown_spec(spec: str, path: Path) -> str:
    """The error for a spec that is no known name and no existing path: the known names, the closest
    one, and where a local path was looked for."""
    close = closest_name(spec)
    if "," in spec:  # datasets=hh,shp: one spec holding two names
        near = f"; several sources are a list: datasets=[{spec}]"
    else:
        near = f"; did you mean {close!r}?" if close else ""
    return (
        f"unknown data source {spec!r}: not a known name ({', '.join(known_names())}{near}), and no local "
        f"file or directory {path.absolute()} exists either. Accepted forms: {ACCEPTED_FORMS}"
    )


def load_source(spec: str, split: str, cache_dir: str | None = None) -> SourceGroups:
    """Load one source (see the module docstring for `spec`) as a deterministic list of groups, with
    the rows read and dropped (SourceGroups)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kind, path = resolve_spec(spec)
    if kind in HUB_NAMES:
        return (
            _load_hub_source(kind, split, cache_dir)
            if path is None
            else _load_hub_shaped_dir(kind, path, split, cache_dir)
        )
    if kind == "dir":
        return _load_local_dir(path, split, cache_dir)
    return _load_local_file(path, split, cache_dir)


def source_files(spec: str, split: str) -> list[Path] | None:
    """The files `load_source(spec, split)` reads, found the same way and without reading them (for a
    fingerprint of the data); None for a hub name, which `datasets` resolves through its own cache."""
    kind, path = resolve_spec(spec)
    if kind in HUB_NAMES:
        if path is None:
            return None
        shards, found = _hub_shaped_files(kind, path, split)
        return shards or [found]
    if kind == "dir":
        return [_find_split_file(path, split)]
    return [_split_file_of(path, split)]


def load_sources(specs: list[str], split: str, cache_dir: str | None = None) -> list[PromptGroup]:
    """Concatenate several sources, in the order given."""
    if isinstance(specs, str):  # a lone string would otherwise be iterated character by character
        specs = [specs]
    groups: list[PromptGroup] = []
    for spec in specs:
        groups.extend(load_source(spec, split, cache_dir=cache_dir))
    return groups


def _load_local_dir(directory: Path, split: str, cache_dir: str | None) -> SourceGroups:
    path = _find_split_file(directory, split)
    return _parse_local(_read_file(path, cache_dir), str(path))


def _load_local_file(path: Path, split: str, cache_dir: str | None) -> SourceGroups:
    path = _split_file_of(path, split)
    return _parse_local(_read_file(path, cache_dir), str(path))
