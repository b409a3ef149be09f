"""Rows -> token ids, by the tokenizer's own rules; prompt labels = -100; truncation.

Plain text (the original format, hh, shp, se, flat rows)
  prompt    tokenizer(prompt, add_special_tokens=False), preceded by what `tokenizer(text)` puts in
            front by default: Llama's <s>, nothing for GPT-2 or ChatML tokenizers. Never twice: a
            prompt whose text already starts with it (rendered by hand) keeps its own.
            `data.add_bos=true|false` overrides the tokenizer's rule.
  response  tokenizer(response, add_special_tokens=False) + eos_token, unless the text already ends
            with it. An EOS before a response's end is an error naming the row: the model would learn
            to stop and then go on.
Conversations (lists of {'role', 'content'} messages)
  prompt    apply_chat_template(prompt, add_generation_prompt=True)
  response  apply_chat_template(prompt + response) minus the prompt's ids: exactly what the template
            renders for the assistant turn, its end-of-turn token included. Checked on every row: the
            rendered prompt must be the start of the rendered conversation, or the row is an error
            naming where they differ. (One exception to "exactly": when a response's first characters
            merge with the generation prompt's last token, as an answer starting with spaces after
            the header's newline does under byte-level BPE, the prompt keeps the ids it has at
            generation and the response is tokenized on its own; counted and logged.) In a response,
            assistant turns are labelled and nothing else (SFT on multi-turn `messages` rows); a
            special token inside a message's text is an error.

Truncation, when prompt + the longest response is longer than max_length
  dpo_ds rule (data.truncation_mode = auto | keep_start | keep_end): a plain-text prompt is cut to
            max_prompt_length tokens, keeping its start or its end (keep_end keeps the BOS that
            dpo_ds put in front, never a token that merely shares the BOS's id), then every response
            is cut to the room left after the prompt.
            A conversation is cut as a conversation, never through a special token or a header:
            whole earlier exchanges go first, oldest first (the system turn stays), then the text of
            the earliest remaining user message is cut (its start for keep_end, its end for
            keep_start), then, if the system turn alone is too long, its text; the conversation is
            rendered again each time, so a truncated prompt is always what apply_chat_template makes
            of a (shorter) conversation, within max_prompt_length. Counted per how (`cuts`).
  original  (data.truncation_mode=original) eric-mitchell/direct-preference-optimization's
            tokenize_batch_element on the same rows, token for token: no BOS, a row whose text holds
            the EOS token is refused (the original asserts), the prompt is cut the same way (its BOS
            is not special there), then every response is cut to max_length - max_prompt_length,
            whatever the prompt kept. Plain-text rows only: the original has no chat templates.
  Both: a cut response can lose its EOS, as in the original. `auto` takes each source's end (hh:
  keep_end, shp/se: keep_start, local files: keep_end or the row's truncation_mode).
"""

from __future__ import annotations

import copy
import re
from collections import Counter, deque
from dataclasses import dataclass, field

from dpo_ds.data.sources.groups import DataError, Text
from dpo_ds.data.tallies import (
    BOUNDARY_SPLITS,
    CUT_RESPONSES,
    CUT_SYSTEM,
    CUT_TEXT,
    CUT_TOKENS,
    CUT_TURNS,
    IDENTICAL_IDS,
    summary_lines,
)

IGNORE = -100
TRUNCATION_MODES = ("auto", "keep_start", "keep_end", "original")
ADD_BOS = ("auto", "true", "false")


class TokenizationError(ValueError):
    """A tokenizer or template that cannot serve the data (no chat template, no BOS to add, ...)."""


def _alternation(texts) -> re.Pattern | None:
    """One regex matching any of `texts`, longest first (a token before a shorter one that is its
    prefix); None for none."""
    texts = list(texts)
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _keep_chars(messages: list[dict], at: int, k: int, side: str) -> list[dict]:
    """messages with message `at`'s text cut to its last (keep_end) or first (keep_start) k characters."""
    text = messages[at]["content"]
    kept = text[len(text) - k :] if side == "keep_end" else text[:k]
    return messages[:at] + [{**messages[at], "content": kept}] + messages[at + 1 :]


@dataclass
class TokenizedSeq:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt (and on non-assistant turns of a conversation)
    prompt_len: int = 0  # input_ids[:prompt_len] is the prompt as trained on (and as generated from)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class _Piece:
    """A response before truncation: its ids and which of them are trained on."""

    ids: list[int]
    labelled: list[bool] = field(default_factory=list)

    def cut(self, n: int) -> _Piece:
        return _Piece(self.ids[:n], self.labelled[:n])


class Tokenization:
    """The one owner of turning a row into ids: BOS/EOS rules, chat template, truncation.

    Built once per run from the tokenizer and the data config; training, eval and generation all
    ask it, so a prompt is rendered the same way everywhere."""

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int,
        max_prompt_length: int,
        truncation_mode: str = "auto",
        add_bos: str = "auto",
        chat_template: str | None = None,
    ):
        if truncation_mode not in TRUNCATION_MODES:
            raise TokenizationError(
                f"data.truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}"
            )
        add_bos = str(add_bos).lower()
        if add_bos not in ADD_BOS:
            raise TokenizationError(f"data.add_bos must be one of {ADD_BOS}, got {add_bos!r}")
        if tokenizer.eos_token_id is None:
            raise TokenizationError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
        if truncation_mode == "original" and add_bos == "true":
            raise TokenizationError(
                "data.add_bos=true contradicts data.truncation_mode=original (the original adds no BOS)"
            )
        self.tok = tokenizer
        self._backend = self._fast_backend()
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.mode = truncation_mode
        self.original = truncation_mode == "original"
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if self.original or add_bos == "false":
            self.prompt_prefix: list[int] = []
        elif add_bos == "true":
            if self.bos_id is None:
                raise TokenizationError("data.add_bos=true, but the tokenizer has no bos_token")
            self.prompt_prefix = [self.bos_id]
        else:
            self.prompt_prefix = self._default_prefix()
        specials = self._special_tokens()
        self.special_ids = set(specials.values())
        # one pass over a message's text finds any special token in it (longest first: '<|im_end|>'
        # before a shorter token that is its prefix)
        self._special_re = _alternation(specials)
        self._split_re = self._split_tokens()
        self.fast_heads = True  # responses tokenized from the prompt's last added token (_prompt_head)
        self.stop_ids = [self.eos_id] + [t for t in self._end_of_turn() if t != self.eos_id]
        self.boundary_splits = 0  # responses tokenized apart from the prompt (see _chat_response)
        self.cuts: Counter[str] = Counter()  # how many prompts were truncated, by how (CUT_* keys)
        self.response_cuts = 0  # responses cut to the room left after the prompt
        self.identical_ids = 0  # examples whose responses are the same ids once tokenized and truncated

    # ------------------------------------------------------------------ the tokenizer's rules

    def _encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _fast_backend(self):
        """A fast tokenizer's Rust tokenizer, set as `tokenizer(text, add_special_tokens=False)` sets it
        before its own call into it (no truncation, no padding, special tokens as the tokenizer treats
        them), so that calling it directly gives the same ids without the Python layer around each call
        (a tenth of the time of tokenizing a large set); None for a slow tokenizer."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None or not getattr(self.tok, "is_fast", False):
            return None
        backend = copy.deepcopy(backend)  # the tokenizer's own one is left as it was
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(self.tok, "split_special_tokens", False))
        return backend

    def _split_tokens(self):
        """A regex of the added tokens the tokenizer cuts its input at and keeps whole: not normalized,
        no `rstrip` (which would eat the text after them), no `single_word` (whose match depends on
        that text); None where there are none or the fast path is off (see _prompt_head)."""
        if self._backend is None or self._backend.encode_special_tokens:
            return None
        texts = [
            str(t)
            for t in getattr(self.tok, "added_tokens_decoder", {}).values()
            if not (t.normalized or t.rstrip or t.single_word) and str(t)
        ]
        return _alternation(texts)

    def _prompt_head(self, prompt_text: str, prompt_ids: list[int]) -> tuple[int, int] | None:
        """(characters, ids) of the prompt up to and including its last added token, where the tokenizer
        cuts its input; None when that cannot be relied on for this prompt.

        A tokenizer splits its input at its added tokens before its normalizer, pre-tokenizer and model
        run, and each piece is tokenized on its own; so a text that starts with these characters has
        these ids followed by the ids of the rest of it, and a response is tokenized from there instead
        of from the prompt's first character (the prompt is encoded once per row, not once per
        response). The prompt itself shows that the cut holds: its ids must be exactly these ids, the
        added token's, then the ids of the characters after it tokenized alone. That fails, and the
        whole text is tokenized, where the start of a text is treated apart (a pre-tokenizer that
        prepends a space only at the text's first character) or nothing follows the token."""
        if self._split_re is None:
            return None
        last = next(iter(deque(self._split_re.finditer(prompt_text), maxlen=1)), None)
        if last is None or last.end() == len(prompt_text):
            return None
        rest = self._encode(prompt_text[last.end() :])
        n = len(prompt_ids) - len(rest)
        token = self.tok.convert_tokens_to_ids(last.group())
        if n < 1 or prompt_ids[n - 1] != token or prompt_ids[n:] != rest:
            return None
        return last.end(), n

    def _default_prefix(self) -> list[int]:
        """What `tokenizer(text)` puts before the text by default (a BOS, or nothing)."""
        probe = "Hello world"
        plain = self._encode(probe)
        full = list(self.tok(probe)["input_ids"])
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return full[:k]
        raise TokenizationError(
            "cannot tell which special tokens the tokenizer adds to a text (tokenizer('Hello world') "
            "does not contain its tokens without special tokens); set data.add_bos=true or false"
        )

    def _special_tokens(self) -> dict[str, int]:
        """Every special token's text -> id: the named ones and added tokens marked special."""
        out = {}
        for text in getattr(self.tok, "all_special_tokens", []):
            tid = self.tok.convert_tokens_to_ids(text)
            if isinstance(tid, int):
                out[text] = tid
        for tid, added in getattr(self.tok, "added_tokens_decoder", {}).items():
            if getattr(added, "special", False):
                out[str(added)] = tid
        return out

    def _end_of_turn(self) -> list[int]:
        """The special token that ends an assistant turn in the chat template (ChatML's <|im_end|>,
        Llama-3's <|eot_id|>): generation stops there as well as at EOS."""
        if not self.template:
            return []
        user = [{"role": "user", "content": "ping"}]
        try:
            prompt = self._encode(self._render(user, True))
            full = self._encode(self._render(user + [{"role": "assistant", "content": "pong"}], False))
        except Exception:  # noqa: BLE001 - a template that needs more than this probe: EOS only
            return []
        return [t for t in full[len(prompt) :] if t in self.special_ids][:1]

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _render_text(self, messages: list[dict], add_generation_prompt: bool, origin: str) -> str:
        try:
            return self._render(messages, add_generation_prompt)
        except Exception as e:  # jinja's own errors ("roles must alternate ...") name no row
            raise DataError(f"{origin}: the chat template failed on this conversation: {e}") from None

    def _plain_prompt(self, text: str, origin: str) -> list[int]:
        ids = self._encode(text)
        if self.original:
            if self.eos_id in ids:
                raise DataError(
                    f"{origin}: the prompt holds the EOS token {self.tok.eos_token!r}; "
                    f"data.truncation_mode=original refuses it, as the original code's assert does"
                )
            return ids
        prefix = self.prompt_prefix
        if prefix and ids[: len(prefix)] == prefix:
            return ids  # the text already starts with the BOS: never a second one
        return prefix + ids

    def _plain_response(self, text: str, origin: str) -> _Piece:
        ids = self._encode(text)
        body = ids[:-1] if (ids and ids[-1] == self.eos_id and not self.original) else ids
        if self.eos_id in body:
            at = body.index(self.eos_id)
            raise DataError(
                f"{origin}: the text holds the EOS token {self.tok.eos_token!r} before its end (token "
                f"{at} of {len(ids)}); the model would learn to stop and then go on. dpo_ds appends the "
                f"EOS itself: remove it from the text"
            )
        ids = body + [self.eos_id]
        return _Piece(ids, [True] * len(ids))

    def _check_text(self, messages: list[dict], origin: str) -> None:
        if self._special_re is None:
            return
        for k, m in enumerate(messages):
            hit = self._special_re.search(m["content"])
            if hit:
                raise DataError(
                    f"{origin}: message {k} ({m['role']}) holds the special token {hit.group()!r} in "
                    f"its text; the chat template writes the special tokens, so text holding one would "
                    f"be read as a turn boundary. Remove or escape it"
                )

    def _chat_response(
        self,
        prompt: list[dict],
        prompt_text: str,
        prompt_ids: list[int],
        response: list[dict],
        origin: str,
        cut: tuple[int, int] | None = None,
    ) -> _Piece:
        """The ids the template adds after the prompt for these turns; assistant turns labelled.

        The template is checked on text: the prompt, and each earlier turn, must render as the start of
        the whole conversation, or the row is an error. The ids are then the whole conversation's
        ids, when every turn boundary is also a token boundary. When a response's first characters
        merge with the generation prompt's last token (an answer that starts with spaces after the
        header's newline), the prompt keeps the ids it has at generation time and each turn is
        tokenized on its own; such rows are counted in `boundary_splits`."""
        self._check_text(response, origin)
        conversation = list(prompt)
        full_text = self._render_text(conversation + response, False, origin)
        self._require_prefix(
            prompt_text, full_text, origin, "the prompt (rendered with add_generation_prompt=True)"
        )
        spans = []  # (start char, end char, trained on)
        at = len(prompt_text)
        for k, message in enumerate(response):
            if k > 0 and message["role"] == "assistant":
                # a later assistant turn: its header (the generation prompt) is not trained on
                head = self._render_text(conversation, True, origin)
                self._require_prefix(
                    head, full_text, origin, f"the conversation up to turn {len(conversation)}"
                )
                if len(head) > at:
                    spans.append((at, len(head), False))
                    at = len(head)
            conversation.append(message)
            end = len(full_text)
            if k < len(response) - 1:
                upto = self._render_text(conversation, False, origin)
                self._require_prefix(
                    upto, full_text, origin, f"the conversation up to turn {len(conversation)}"
                )
                end = len(upto)
            spans.append((at, end, message["role"] == "assistant"))
            at = end

        def encode(text: str) -> list[int]:  # a text that starts with the prompt's (see _prompt_head)
            if cut is None:
                return self._encode(text)
            return prompt_ids[: cut[1]] + self._encode(text[cut[0] :])

        full = encode(full_text)
        bounds = [len(prompt_ids)]
        for start, _, _ in spans[1:]:
            bounds.append(len(encode(full_text[:start])))
        exact = full[: len(prompt_ids)] == prompt_ids and all(
            full[:b] == encode(full_text[: s[0]]) for b, s in zip(bounds[1:], spans[1:])
        )
        ids, labelled = [], []
        if exact:
            ends = bounds[1:] + [len(full)]
            for (start, end), (_, _, trained) in zip(zip(bounds, ends), spans):
                ids += full[start:end]
                labelled += [trained] * (end - start)
        else:
            self.boundary_splits += 1
            for start, end, trained in spans:
                piece = self._encode(full_text[start:end])
                ids += piece
                labelled += [trained] * len(piece)
        return _Piece(ids, labelled)

    def _require_prefix(self, part: str, full: str, origin: str, what: str) -> None:
        if full.startswith(part):
            return
        d = next((k for k, (x, y) in enumerate(zip(part, full)) if x != y), min(len(part), len(full)))
        raise DataError(
            f"{origin}: the chat template does not render {what} as the start of the whole "
            f"conversation: they differ at character {d} ({part[d : d + 24]!r} vs {full[d : d + 24]!r}). "
            f"dpo_ds trains on what the template renders for the whole conversation and masks the "
            f"prompt, so the prompt must be its start; use a template that renders earlier turns the "
            f"same whatever follows (data.chat_template=FILE)"
        )

    def render(
        self, prompt: Text, responses: list[Text], origins: list[str] | None = None
    ) -> tuple[list[int], list[_Piece]]:
        """(prompt ids, one _Piece per response), nothing cut yet. origins: [prompt's, each response's]."""
        origins = origins or ["prompt"] + [f"response {k}" for k in range(len(responses))]
        if isinstance(prompt, str):
            for k, r in enumerate(responses):
                if not isinstance(r, str):
                    raise DataError(f"{origins[k + 1]}: a conversation answering a plain-text prompt")
            return self._plain_prompt(prompt, origins[0]), [
                self._plain_response(r, o) for r, o in zip(responses, origins[1:])
            ]
        if self.original:
            raise DataError(
                f"{origins[0]}: a conversation, but data.truncation_mode=original reproduces the original "
                f"code, which has no chat templates; use data.truncation_mode=auto"
            )
        if not self.template:
            raise TokenizationError(
                f"{origins[0]} is a conversation, but the tokenizer has no chat_template to render it; "
                f"set data.chat_template to a Jinja template file"
            )
        self._check_text(prompt, origins[0])
        prompt_text = self._render_text(prompt, True, origins[0])
        prompt_ids = self._encode(prompt_text)
        cut = self._prompt_head(prompt_text, prompt_ids) if self.fast_heads else None
        pieces = []
        for r, o in zip(responses, origins[1:]):
            if isinstance(r, str):
                raise DataError(f"{o}: plain text answering a conversational prompt")
            pieces.append(self._chat_response(prompt, prompt_text, prompt_ids, r, o, cut))
        return prompt_ids, pieces

    # ------------------------------------------------------------------ truncation

    def _overflows(self, prompt: list[int], pieces: list[_Piece]) -> bool:
        """Whether the prompt must be cut: prompt + the longest response is over max_length, and the
        prompt over max_prompt_length (else only the responses are cut)."""
        longest = max((len(p.ids) for p in pieces), default=0)
        return len(prompt) + longest > self.max_length and len(prompt) > self.max_prompt_length

    def _truncate(self, prompt: list[int], pieces: list[_Piece], side: str) -> tuple[list[int], list[_Piece]]:
        """Token-level truncation of a plain-text prompt, then of every response (a conversational
        prompt arrives here already within max_prompt_length: _shorten_conversation)."""
        longest = max((len(p.ids) for p in pieces), default=0)
        mpl, ml = self.max_prompt_length, self.max_length
        if self.original:  # token for token what tokenize_batch_element does
            if len(prompt) + longest > ml:
                if len(prompt) > mpl:
                    self.cuts[CUT_TOKENS] += 1
                prompt = prompt[:mpl] if side == "keep_start" else prompt[-mpl:]
            if len(prompt) + longest > ml:
                self.response_cuts += sum(len(p.ids) > ml - mpl for p in pieces)
                pieces = [p.cut(ml - mpl) for p in pieces]
            return prompt, pieces
        if self._overflows(prompt, pieces):
            self.cuts[CUT_TOKENS] += 1
            if side == "keep_start":
                prompt = prompt[:mpl]
            else:
                # the BOS dpo_ds put in front stays; a ChatML tokenizer's bos_token (<|im_start|>) is a
                # template marker that a plain-text prompt never got from us, so nothing is kept for it
                prefix = self.prompt_prefix
                head = prefix if prefix and prompt[: len(prefix)] == prefix else []
                keep = max(mpl - len(head), 0)  # a `prompt[-0:]` slice would keep everything
                prompt = head + (prompt[len(prompt) - keep :] if keep else [])
        room = ml - len(prompt)
        self.response_cuts += sum(len(p.ids) > room for p in pieces)
        return prompt, [p.cut(room) for p in pieces]

    def _prompt_length(self, messages: list[dict], origin: str) -> int:
        return len(self._encode(self._render_text(messages, True, origin)))

    def _shorten_conversation(self, prompt: list[dict], side: str, origin: str) -> list[dict]:
        """The longest shortening of a conversational prompt that renders within max_prompt_length,
        in this order: drop whole earlier exchanges (a user turn and what follows it up to the next
        user turn), oldest first, keeping a leading system turn and the last exchange; then cut the
        text of the earliest user message left, keeping its end (keep_end) or its start (keep_start);
        then the system turn's text. Returns the messages to render; raises DataError when even empty
        messages do not fit (max_prompt_length below the template's own tokens)."""
        mpl = self.max_prompt_length

        def fits(messages: list[dict]) -> bool:
            return self._prompt_length(messages, origin) <= mpl

        system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
        rest = prompt[len(system) :]
        turns = rest
        for s in [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]:
            if fits(system + turns):
                break
            turns = rest[s:]  # whole exchanges, oldest first; the last one always stays
        if len(turns) < len(rest):
            self.cuts[CUT_TURNS] += 1
        messages = system + turns
        if fits(messages):
            return messages
        # cut one message's text: the earliest user message left, then (if need be) the system turn
        order = [i for i, m in enumerate(messages) if m["role"] == "user"][:1] + ([0] if system else [])
        for at in order:
            if not fits(_keep_chars(messages, at, 0, side)):  # all of its text goes, the next is cut too
                self.cuts[CUT_TEXT] += 1
                messages = _keep_chars(messages, at, 0, side)
                continue
            lo, hi = 0, len(messages[at]["content"])  # the most characters kept that still fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(_keep_chars(messages, at, mid, side)):
                    lo = mid
                else:
                    hi = mid - 1
            self.cuts[CUT_SYSTEM if system and at == 0 else CUT_TEXT] += 1
            return _keep_chars(messages, at, lo, side)  # fits: lo == 0 was checked, every lo kept was too
        raise DataError(
            f"{origin}: the chat template's own tokens for this conversation, with its messages' text cut "
            f"to nothing, are {self._prompt_length(messages, origin)} tokens, more than "
            f"max_prompt_length={mpl}; raise max_prompt_length"
        )

    def describe(self, spec: str, groups) -> str:
        """One log line: how the rows of source `spec` are rendered (a mix of conversational and
        plain-text sources is legal, and each kind follows its own rules)."""
        chats = sum(not isinstance(g.prompt, str) for g in groups)
        plain = len(groups) - chats
        parts = []
        if chats:
            parts.append(f"{chats} conversations rendered by the chat template")
        if plain:
            bos = self.tok.convert_ids_to_tokens(self.prompt_prefix) if self.prompt_prefix else "nothing"
            parts.append(
                f"{plain} plain-text prompts, no chat template ({bos} in front, {self.tok.eos_token!r} after "
                f"each response)"
            )
        return f"data source {spec}: " + (" and ".join(parts) or "no rows")

    def tallies(self) -> Counter[str]:
        """Everything counted so far, by name (the CUT_* kinds, CUT_RESPONSES, IDENTICAL_IDS,
        BOUNDARY_SPLITS): what the cache sums over shards, workers and ranks into one total."""
        return Counter(
            {**self.cuts, CUT_RESPONSES: self.response_cuts, IDENTICAL_IDS: self.identical_ids,
             BOUNDARY_SPLITS: self.boundary_splits}
        )  # fmt: skip

    def reset_tallies(self) -> None:
        self.cuts.clear()
        self.response_cuts = self.identical_ids = self.boundary_splits = 0

    def summary(self, tallies: Counter[str] | None = None) -> list[str]:
        """What tokenization did beyond the plain rules, as log lines (nothing when it did nothing):
        of its own tallies, or of `tallies` (the sum over every rank's share: one total, said once)."""
        return summary_lines(
            self.tallies() if tallies is None else tallies, self.max_prompt_length, self.max_length
        )

    def tokenize(
        self,
        prompt: Text,
        responses: list[Text],
        truncation_mode: str,
        origins: list[str] | None = None,
    ) -> list[TokenizedSeq]:
        """prompt + each response (chosen, rejected; or the SFT target), truncated, prompt masked.

        truncation_mode: the source's keep_start / keep_end; data.truncation_mode other than auto wins."""
        side = truncation_mode if self.mode in ("auto", "original") else self.mode
        prompt_ids, pieces = self.render(prompt, responses, origins)
        if not isinstance(prompt, str) and self._overflows(prompt_ids, pieces):
            # a conversation is cut as messages and rendered again: never through a header
            shorter = self._shorten_conversation(prompt, side, (origins or ["prompt"])[0])
            prompt_ids, pieces = self.render(shorter, responses, origins)
        prompt_ids, pieces = self._truncate(prompt_ids, pieces, side)
        self.identical_ids += len(pieces) > 1 and all(p.ids == pieces[0].ids for p in pieces[1:])
        n = len(prompt_ids)
        return [
            TokenizedSeq(
                prompt_ids + p.ids,
                [IGNORE] * n + [t if keep else IGNORE for t, keep in zip(p.ids, p.labelled)],
                n,
            )
            for p in pieces
        ]
