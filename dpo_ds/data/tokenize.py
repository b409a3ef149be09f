"""Text -> token ids with prompt labels = -100, EOS appended, truncated like the original DPO code."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class TokenizedSeq:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate_prompt(prompt: list[int], keep: int, mode: str) -> list[int]:
    if mode == "keep_start":
        return prompt[:keep]
    if mode == "keep_end":
        return prompt[-keep:]
    raise ValueError(f"unknown truncation_mode {mode!r}; expected keep_start or keep_end")


def tokenize_example(
    tokenizer,
    prompt: str,
    responses: list[str],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
) -> list[TokenizedSeq]:
    """Tokenize prompt + each response (chosen, rejected; or just the SFT target).

    Truncation as in the original: if prompt + the longest response exceeds max_length, the prompt
    is cut to max_prompt_length (keeping its start or its end); if that is still too long, every
    response is cut to the room left. EOS is appended to each response before truncation, and BOS
    (when the tokenizer has one) starts the prompt and survives truncation.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = _ids(tokenizer, prompt)
    rs = [_ids(tokenizer, r) + [tokenizer.eos_token_id] for r in responses]
    longest = max(len(r) for r in rs)
    if len(bos) + len(p) + longest > max_length:
        p = _truncate_prompt(p, max_prompt_length - len(bos), truncation_mode)
    p = bos + p
    room = max_length - len(p)
    rs = [r[:room] for r in rs]
    return [TokenizedSeq(p + r, [IGNORE] * len(p) + r) for r in rs]
