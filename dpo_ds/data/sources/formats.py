"""Local row formats: original, flat text, conversational (UltraFeedback, TRL, TRL implicit prompt)
and messages (SFT), detected from the columns and the values' types."""

from __future__ import annotations

from collections import Counter

from dpo_ds.data.sources.fields import (
    _answers,
    _at,
    _bad,
    _messages,
    _pairs_field,
    _response_field,
    _rows,
    _short,
    _str_field,
)
from dpo_ds.data.sources.groups import DataError, PromptGroup, Text, _Groups, loaded

TRUNCATION_MODES = ("keep_start", "keep_end")
# A local prompt is most often a conversation, whose latest turns matter most when it is too long.
LOCAL_DEFAULT_TRUNCATION = "keep_end"

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
    return loaded(where, len(groups), groups, Counter())


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
    return loaded(where, len(groups), groups, Counter())
