"""Reading a local file (json, JSON lines, parquet, gzip-compressed json) or a hub dataset into a
`datasets.Dataset`, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_ds.data.sources.fields import _short
from dpo_ds.data.sources.formats import ORIGINAL_COLUMNS
from dpo_ds.data.sources.groups import DataError
from dpo_ds.data.sources.specs import HUB_NAMES, _hub_split


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
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a local file reads in a second: no "Generating train split" bar per file
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as e:
        where = _json_problem(path) if builder == "json" else None
        if where:
            raise DataError(f"{path}: {where}") from None
        raise DataError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from e
    finally:
        if shown:
            datasets.enable_progress_bars()
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
