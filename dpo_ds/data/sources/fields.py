"""Field checks: a row's values of the expected type, or a DataError naming the file, row and field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dpo_ds.data.sources.groups import DataError, Message


def _at(where: str, row: int) -> str:
    return f"{where} row {row} (0-based)"


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
