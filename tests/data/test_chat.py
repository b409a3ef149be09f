"""Chat templates, special tokens and truncation against the tokenizers users train with.

Three tokenizers are built offline (dpo_ds/demo/tokenizers.py): ChatML byte-level BPE (bos
<|im_start|>, eos <|im_end|>, adds nothing to a text), SentencePiece Llama-2 (adds <s>; its template
writes <s> and </s>), GPT-2 style (bos = eos = <|endoftext|>). Each goes through every conversational
shape, read from local files shaped like the hub's, and through the plain-text path.
"""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from dpo_ds.data.batches import Batches, flatten  # noqa: E402
from dpo_ds.data.sources import DataError, load_source  # noqa: E402
from dpo_ds.data.tokenize import IGNORE, Tokenization, TokenizationError  # noqa: E402
from dpo_ds.demo.tokenizers import KINDS, build_tokenizer  # noqa: E402
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {k: AutoTokenizer.from_pretrained(str(build_tokenizer(k, root / k))) for k in KINDS}


def ids_of(tok, messages, **kw) -> list[int]:
    """What transformers' apply_chat_template gives: the ids the issue's parity is stated against."""
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are terse."}
# (prompt turns, chosen answer, rejected answer): single-turn, multi-turn with a system message
CONVERSATIONS = [
    ([user("What is the capital of France?")], "Paris.", "I think it is London, but I am not sure."),
    (
        [SYSTEM, user("Name a prime."), assistant("7."), user("A larger one?")],
        "101 is prime.",
        "100.",
    ),
]


def _write(path, rows):
    if path.suffix == ".parquet":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ultrafeedback_rows():
    # HuggingFaceH4/ultrafeedback_binarized's columns: chosen / rejected repeat the user turn
    rows = []
    for k, (turns, good, bad) in enumerate(CONVERSATIONS):
        last_user = [m for m in turns if m["role"] == "user"][-1]["content"]
        rows.append(
            {
                "prompt": last_user,
                "prompt_id": f"{k:064x}",
                "chosen": turns + [assistant(good)],
                "rejected": turns + [assistant(bad)],
                "messages": turns + [assistant(good)],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return rows


def trl_rows():
    return [{"prompt": t, "chosen": [assistant(g)], "rejected": [assistant(b)]} for t, g, b in CONVERSATIONS]


def trl_implicit_rows():
    return [{"chosen": t + [assistant(g)], "rejected": t + [assistant(b)]} for t, g, b in CONVERSATIONS]


@pytest.fixture
def shapes(tmp_path):
    """spec -> loaded groups, one per conversational shape, from files shaped like the hub's."""
    uf = tmp_path / "uf" / "data"
    uf.mkdir(parents=True)
    # the hub repository's layout, as `hf download --repo-type dataset` writes it
    _write(uf / "train_prefs-00000-of-00001.parquet", ultrafeedback_rows())
    out = {"ultrafeedback": load_source(f"ultrafeedback:{tmp_path / 'uf'}", "train", str(tmp_path / "c"))}
    for name, rows in (("trl", trl_rows()), ("trl_implicit", trl_implicit_rows())):
        path = _write(tmp_path / f"{name}.train.jsonl", rows)
        out[name] = load_source(str(path), "train", str(tmp_path / "c"))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_shape_renders_exactly_as_the_template(toks, shapes, kind):
    tok = toks[kind]
    rules = Tokenization(tok, max_length=4096, max_prompt_length=2048)
    for shape, groups in shapes.items():
        assert len(groups) == len(CONVERSATIONS), shape
        for g, (turns, good, bad) in zip(groups, CONVERSATIONS):
            assert g.prompt == turns, shape
            (ex,) = flatten([g], sft=False)
            chosen, rejected = rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)
            prompt_ids = ids_of(tok, turns, add_generation_prompt=True)
            for seq, answer in ((chosen, good), (rejected, bad)):
                # prompt + response ids are exactly the template's ids of the whole conversation
                assert seq.input_ids == ids_of(tok, turns + [assistant(answer)]), (shape, kind)
                assert seq.input_ids[: seq.prompt_len] == prompt_ids
                assert seq.labels[: seq.prompt_len] == [IGNORE] * len(prompt_ids)
                assert seq.labels[seq.prompt_len :] == seq.input_ids[seq.prompt_len :]
                # the response is the assistant turn with its end-of-turn token, once
                response = seq.input_ids[seq.prompt_len :]
                end = rules.stop_ids[-1]
                assert response.count(end) == 1, tok.convert_ids_to_tokens(response)
                assert answer.split()[0] in tok.decode(response)


def test_ultrafeedback_hub_name_and_splits(tmp_path):
    from dpo_ds.data import sources

    assert sources.HUB_NAMES["ultrafeedback"] == "HuggingFaceH4/ultrafeedback_binarized"
    assert sources._hub_split("ultrafeedback", "train") == "train_prefs"
    assert sources._hub_split("ultrafeedback", "test") == "test_prefs"
    # a flat copy (DIR/test_prefs.jsonl) works as well as the hub layout
    d = tmp_path / "flat"
    d.mkdir()
    _write(d / "test_prefs.jsonl", ultrafeedback_rows())
    groups = load_source(f"ultrafeedback:{d}", "test", str(tmp_path / "c"))
    assert [g.responses for g in groups] == [[[assistant(g)], [assistant(b)]] for _, g, b in CONVERSATIONS]


def test_a_plain_directory_shaped_like_ultrafeedback_says_how_to_read_it(tmp_path):
    repo = tmp_path / "uf"
    (repo / "data").mkdir(parents=True)
    _write(repo / "data" / "train_prefs-00000-of-00001.parquet", ultrafeedback_rows())
    with pytest.raises(DataError, match=rf"no 'train' file in {repo}.*read it with 'ultrafeedback:{repo}'"):
        load_source(str(repo), "train", str(tmp_path / "c"))


@pytest.mark.parametrize("kind", KINDS)
def test_sft_on_messages_labels_assistant_turns_only(toks, tmp_path, kind):
    tok = toks[kind]
    conv = [SYSTEM, user("Name a prime."), assistant("7."), user("A larger one?"), assistant("101.")]
    path = _write(tmp_path / "chats.train.jsonl", [{"messages": conv}, {"messages": conv[1:3]}])
    groups = load_source(str(path), "train", str(tmp_path / "c"))
    assert [g.prompt for g in groups] == [conv[:2], conv[1:2]] and groups[0].pairs == []
    (seq, _) = [
        Tokenization(tok, max_length=4096, max_prompt_length=2048).tokenize(
            e.prompt, e.responses, e.truncation_mode, e.origins
        )[0]
        for e in flatten(groups, sft=True)
    ]
    assert seq.input_ids == ids_of(tok, conv)
    trained = [t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE]
    # exactly the two assistant turns as the template renders them, headers and user turns not
    turn1 = ids_of(tok, conv[:3])[len(ids_of(tok, conv[:2], add_generation_prompt=True)) :]
    turn2 = ids_of(tok, conv)[len(ids_of(tok, conv[:4], add_generation_prompt=True)) :]
    assert trained == turn1 + turn2
    assert "A larger one?" not in tok.decode(trained) and "101" in tok.decode(trained)


# ----------------------------------------------------------------------------- BOS / EOS


@pytest.mark.parametrize("kind", KINDS)
def test_the_fast_encode_is_the_tokenizers_own_call(toks, kind):
    """Tokenization calls the Rust tokenizer directly (a tenth of the data phase's time): the ids must be
    exactly `tokenizer(text, add_special_tokens=False)`'s, special-token text and odd spacing included,
    and the tokenizer itself left as it was (truncation and padding still work for its other users)."""
    tok = toks[kind]
    rules = Tokenization(tok, max_length=512, max_prompt_length=256)
    assert rules._backend is not None and rules._backend is not tok.backend_tokenizer
    texts = [" leading space", "tabs\tand\nnew\n\nlines  ", "unicode: caf\u00e9 \u4f60\u597d \U0001f600", "",
             "  ", tok.eos_token + " after eos", "x" * 700, "Question:\n\nWhy?" + (tok.bos_token or "")]  # fmt: skip
    for text in texts:
        assert rules._encode(text) == list(tok(text, add_special_tokens=False)["input_ids"]), (kind, text)
    assert len(tok("x " * 600, truncation=True, max_length=8)["input_ids"]) == 8


TRICKY = ["plain words", " leading space", "    indented code\n  x = 1", "\n\nnew lines first", "tabs\tand\ttabs",
          "caf\u00e9 \u4f60\u597d \U0001f600", "trailing spaces   ", "Q: why?\nA: because.", "x" * 300]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_responses_tokenized_from_the_prompts_last_added_token(toks, kind):
    """A response is tokenized from the prompt's last added token on (the prompt is encoded once per
    row, not once per response): every id and label equals tokenizing the whole text, and the
    template's own ids, over texts that merge across boundaries, multi-turn prompts and responses."""
    import random

    tok = toks[kind]
    fast = Tokenization(tok, max_length=4096, max_prompt_length=2048)
    whole = Tokenization(tok, max_length=4096, max_prompt_length=2048)
    whole.fast_heads = False
    rng = random.Random(0)
    heads = 0
    for k in range(60):
        turns = [SYSTEM] if k % 3 == 0 else []
        for _ in range(1 + k % 2):
            turns += [user(rng.choice(TRICKY)), assistant(rng.choice(TRICKY))]
        turns = turns[:-1]
        answers = [[assistant(rng.choice(TRICKY))], [assistant(rng.choice(TRICKY))]]
        if k % 4 == 0:  # a multi-turn response (SFT's shape: its later assistant turn trained too)
            answers[0] = answers[0] + [user(rng.choice(TRICKY)), assistant(rng.choice(TRICKY))]
        prompt_text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        heads += fast._prompt_head(prompt_text, fast._encode(prompt_text)) is not None
        got = fast.tokenize(turns, answers, "keep_end")
        want = whole.tokenize(turns, answers, "keep_end")
        assert [(s.input_ids, s.labels, s.prompt_len) for s in got] == [
            (s.input_ids, s.labels, s.prompt_len) for s in want
        ], (kind, turns, answers)
        for seq, answer in zip(got, answers):
            if fast.boundary_splits == 0:
                assert seq.input_ids == ids_of(tok, turns + answer), (kind, turns, answer)
    assert fast.boundary_splits == whole.boundary_splits
    # ChatML / GPT-2: the generation prompt's header follows an added token, so every row takes the cut.
    # The Llama-2 SentencePiece tokenizer prepends its space marker at the text's first character only:
    # the text after a <s> tokenizes alone unlike inside the whole text, the prompt's own check sees
    # that and turns the cut down (without the check, this test fails there)
    assert heads == (0 if kind == "llama" else 60), heads


@pytest.mark.parametrize("kind", KINDS)
def test_plain_text_follows_the_tokenizers_bos_rule(toks, kind):
    tok = toks[kind]
    rules = Tokenization(tok, max_length=512, max_prompt_length=256)
    adds_bos = kind == "llama"  # tokenizer(text) puts <s> in front; ChatML and GPT-2 add nothing
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == adds_bos
    for prompt in ("Question: why?", tok.bos_token + "Question: why?"):
        for response in (" Because.", " Because." + tok.eos_token):
            seq, _ = rules.tokenize(prompt, [response, " No."], "keep_end")
            ids = seq.input_ids
            if tok.bos_token_id != tok.eos_token_id:
                starts = int(ids[0] == tok.bos_token_id)
                assert ids.count(tok.bos_token_id) == starts
                assert starts == (adds_bos or prompt.startswith(tok.bos_token)), (prompt, ids)
            else:  # GPT-2: <|endoftext|> is both; only the one ending the response may be there
                assert ids.count(tok.eos_token_id) == 1 + prompt.startswith(tok.bos_token)
            assert ids[-1] == tok.eos_token_id and ids[seq.prompt_len :].count(tok.eos_token_id) == 1


def test_data_add_bos_overrides(toks):
    chatml, llama = toks["chatml"], toks["llama"]
    assert (
        Tokenization(chatml, max_length=64, max_prompt_length=32, add_bos="true").render("hi", [])[0][0] == 1
    )
    assert (
        Tokenization(llama, max_length=64, max_prompt_length=32, add_bos="false").render("hi", [])[0][0] != 1
    )
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    tok.bos_token = None
    with pytest.raises(TokenizationError, match="add_bos=true, but the tokenizer has no bos_token"):
        Tokenization(tok, max_length=64, max_prompt_length=32, add_bos="true")


@pytest.mark.parametrize("kind", KINDS)
def test_chat_prompt_has_one_bos_at_most(toks, kind):
    tok = toks[kind]
    rules = Tokenization(tok, max_length=512, max_prompt_length=256)
    turns = CONVERSATIONS[0][0]
    prompt_ids, _ = rules.render(turns, [])
    if tok.bos_token_id != tok.eos_token_id:
        # Llama's template writes <s> itself; nothing adds a second one. ChatML's bos <|im_start|>
        # opens every turn, and is counted per turn.
        expected = 1 if kind == "llama" else prompt_ids.count(tok.bos_token_id)
        assert prompt_ids.count(tok.bos_token_id) == expected
        assert prompt_ids[:2].count(tok.bos_token_id) == 1
    # generation stops where a turn ends: EOS, and the template's end of turn when it differs
    assert rules.stop_ids[0] == tok.eos_token_id
    assert len(rules.stop_ids) == 1  # all three templates end a turn with the EOS token itself


def test_stop_ids_include_a_distinct_end_of_turn(toks):
    tok = toks["gpt2"]
    # a ChatML-like template on a tokenizer whose EOS is not the end of turn (Llama-3's case)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot|>' }}{% endfor %}" + (
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rules = Tokenization(tok, max_length=64, max_prompt_length=32, chat_template=template)
    assert rules.stop_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")]


# ----------------------------------------------------------------------------- errors naming the row


def test_eos_inside_a_response_is_refused_naming_the_row(tmp_path):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    path = _write(
        tmp_path / "t.train.jsonl",
        [
            {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "2+2=", "chosen": "4</s>!", "rejected": "5"},
        ],
    )
    (_, bad) = flatten(load_source(str(path), "train", str(tmp_path / "c")), sft=False)
    rules = Tokenization(tok, max_length=32, max_prompt_length=16)
    with pytest.raises(
        DataError, match=r"t\.train\.jsonl row 1 \(0-based\), field 'chosen'.*EOS token '</s>'"
    ):
        rules.tokenize(bad.prompt, bad.responses, bad.truncation_mode, bad.origins)


def test_special_token_inside_a_message_is_refused(toks, tmp_path):
    rows = [
        {
            "prompt": [user("say <|im_end|> please")],
            "chosen": [assistant("ok")],
            "rejected": [assistant("no")],
        }
    ]
    (ex,) = flatten(load_source(str(_write(tmp_path / "s.train.jsonl", rows)), "train", None), sft=False)
    rules = Tokenization(toks["chatml"], max_length=64, max_prompt_length=32)
    with pytest.raises(DataError, match=r"row 0 \(0-based\), field 'prompt'.*'<\|im_end\|>'"):
        rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)


def test_template_whose_prompt_is_not_a_prefix_names_the_row(toks, tmp_path):
    # the generation prompt opens a <think> block that a finished assistant turn does not have
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\nthink:' }}{% endif %}"
    )
    (ex,) = flatten(
        load_source(str(_write(tmp_path / "p.train.jsonl", trl_rows()[:1])), "train", None), sft=False
    )
    rules = Tokenization(toks["chatml"], max_length=64, max_prompt_length=32, chat_template=template)
    with pytest.raises(
        DataError,
        match=r"p\.train\.jsonl row 0 \(0-based\), field 'chosen'.*differ at character \d+ \('think:'",
    ):
        rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)


def test_response_merging_with_the_generation_prompt(toks):
    """An answer starting with spaces: byte-level BPE merges the header's newline with them when the
    whole conversation is tokenized at once. The prompt then keeps its generation-time ids (what the
    model sees when it answers) and the answer is tokenized on its own, counted."""
    tok = toks["chatml"]
    rules = Tokenization(tok, max_length=512, max_prompt_length=256)
    turns = [user("Show me code.")]
    answer = "    x = 1"
    whole = ids_of(tok, turns + [assistant(answer)])
    prompt_ids = ids_of(tok, turns, add_generation_prompt=True)
    assert whole[: len(prompt_ids)] != prompt_ids  # the merge this test is about does happen
    seq, _ = rules.tokenize(turns, [[assistant(answer)], [assistant("no")]], "keep_end")
    assert seq.input_ids[: seq.prompt_len] == prompt_ids
    response_text = tok.apply_chat_template(turns + [assistant(answer)], tokenize=False)[
        len(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)) :
    ]
    assert seq.input_ids[seq.prompt_len :] == tok(response_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(seq.input_ids) == tok.decode(whole)  # the same text, cut at the turn
    assert rules.boundary_splits == 1  # the rejected "no" needed no split


def test_conversations_need_a_template(tmp_path):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])  # no chat_template
    (ex,) = flatten(
        load_source(str(_write(tmp_path / "n.train.jsonl", trl_rows()[:1])), "train", None), sft=False
    )
    with pytest.raises(TokenizationError, match="no chat_template.*data.chat_template"):
        Tokenization(tok, max_length=64, max_prompt_length=32).tokenize(
            ex.prompt, ex.responses, "keep_end", ex.origins
        )


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {
                "prompt": "Q?",
                "chosen": [user("Q?"), assistant("a")],
                "rejected": [user("Other?"), assistant("b")],
            },
            "must repeat the same turns before the answer",
        ),
        (
            {
                "prompt": "Not the question",
                "chosen": [user("Q?"), assistant("a")],
                "rejected": [user("Q?"), assistant("b")],
            },
            "field 'prompt' .* is not the last user turn",
        ),
        (
            {"prompt": [user("Q?")], "chosen": [user("a")], "rejected": [assistant("b")]},
            r"field 'chosen\[0\].role' must be 'assistant'",
        ),
        (
            {
                "prompt": [user("Q?")],
                "chosen": [{"role": "assistant", "content": [{"type": "text"}]}],
                "rejected": [assistant("b")],
            },
            r"field 'chosen\[0\].content' must be a string",
        ),
        (
            {"chosen": [user("Q?"), assistant("a")], "rejected": [user("R?"), assistant("b")]},
            "share no first turn",
        ),
    ],
    ids=[
        "uf_turns_differ",
        "uf_prompt_mismatch",
        "trl_user_in_response",
        "content_parts",
        "implicit_no_prompt",
    ],
)
def test_bad_conversational_rows(tmp_path, row, match):
    path = _write(tmp_path / "bad.train.jsonl", [row])
    with pytest.raises(DataError, match=match) as err:
        load_source(str(path), "train", str(tmp_path / "c"))
    assert "row 0" in str(err.value)


def test_messages_rows_must_end_with_the_assistant(tmp_path):
    path = _write(tmp_path / "m.train.jsonl", [{"messages": [user("hi"), assistant("yo"), user("bye")]}])
    with pytest.raises(DataError, match=r"row 0 \(0-based\): field 'messages\[2\].role' must be 'assistant'"):
        load_source(str(path), "train", None)


# ----------------------------------------------------------------------------- truncation


def original_rule(tok, prompt, chosen, rejected, mode, max_length, max_prompt_length):
    """The original code's tokenize_batch_element, written out: no special tokens, EOS appended to
    both responses, the prompt cut (start or end) to max_prompt_length when prompt + the longer
    response overflows, then, if it still overflows, both responses cut to
    max_length - max_prompt_length. Returns (chosen ids, chosen labels, rejected ids, rejected labels)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r = tok(rejected, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    longer = max(len(c), len(r))
    if len(p) + longer > max_length:
        p = p[:max_prompt_length] if mode == "keep_start" else p[-max_prompt_length:]
    if len(p) + longer > max_length:
        c, r = c[: max_length - max_prompt_length], r[: max_length - max_prompt_length]
    return p + c, [IGNORE] * len(p) + c, p + r, [IGNORE] * len(p) + r


# (prompt, chosen, rejected) on a 1-token-per-character tokenizer, max_length 16, max_prompt_length 6
OVERFLOWS = [
    ("abc", "de", "f"),  # fits: nothing cut
    ("abcdefghijkl", "xy", "z"),  # the prompt alone overflows: prompt cut
    ("ab", "0123456789abcdefg", "z"),  # a short prompt, a long chosen: responses cut
    ("abcdefghijkl", "0123456789abcdefg", "0123"),  # both: prompt, then responses
    ("abcdefghij", "0", "0123456789abc"),  # the rejected is the longer one
    ("abcdef", "0123456789", "x"),  # prompt exactly max_prompt_length, sum overflows by one
    ("", "0123456789abcdefghij", "x"),  # empty prompt
]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("kind", ["char", "gpt2", "llama"])
def test_original_rule_parity(toks, kind, mode):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"]) if kind == "char" else toks[kind]
    rules = Tokenization(tok, max_length=16, max_prompt_length=6, truncation_mode="original")
    for prompt, chosen, rejected in OVERFLOWS:
        c, r = rules.tokenize(prompt, [chosen, rejected], mode)
        want = original_rule(tok, prompt, chosen, rejected, mode, 16, 6)
        assert (c.input_ids, c.labels, r.input_ids, r.labels) == want, (kind, prompt, chosen, rejected)


def test_original_rule_on_hh_rows(tmp_path):
    """The hh fixture through the hub parser, as the original code reads the same rows."""
    from pathlib import Path

    hub = Path(__file__).resolve().parents[1] / "fixtures" / "hub" / "hh"
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=48, max_prompt_length=20, truncation_mode="original")
    examples = flatten(load_source(f"hh:{hub}", "train", str(tmp_path / "c")), sft=False)
    assert examples and all(e.truncation_mode == "keep_end" for e in examples)
    overflowed = 0
    for e in examples:
        c, r = rules.tokenize(e.prompt, e.responses, e.truncation_mode)
        assert (c.input_ids, c.labels, r.input_ids, r.labels) == original_rule(
            tok, e.prompt, *e.responses, "keep_end", 48, 20
        )
        overflowed += len(tok(e.prompt)["input_ids"]) + 1 > 20
    assert overflowed  # the rows do exercise the cut


def test_original_mode_refuses_eos_and_conversations(toks, tmp_path):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=16, max_prompt_length=6, truncation_mode="original")
    with pytest.raises(DataError, match="holds the EOS token"):
        rules.tokenize("a</s>b", ["c", "d"], "keep_end")
    with pytest.raises(DataError, match="holds the EOS token"):
        rules.tokenize("ab", ["c</s>", "d"], "keep_end")  # the original refuses even a trailing one
    with pytest.raises(DataError, match="no chat templates"):
        Tokenization(toks["chatml"], max_length=16, max_prompt_length=6, truncation_mode="original").tokenize(
            [user("hi")], [[assistant("a")], [assistant("b")]], "keep_end"
        )


def test_dpo_ds_rule_and_where_it_differs():
    """The dpo_ds rule keeps BOS, and cuts responses to the room left after the prompt (the original
    cuts them to max_length - max_prompt_length even when the prompt kept fewer tokens)."""
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])  # adds <s>
    rules = Tokenization(tok, max_length=16, max_prompt_length=6)
    bos = tok.bos_token_id
    for prompt, chosen, rejected in OVERFLOWS:
        for mode in ("keep_start", "keep_end"):
            c, r = rules.tokenize(prompt, [chosen, rejected], mode)
            for seq, resp in ((c, chosen), (r, rejected)):
                assert len(seq) <= 16 and seq.input_ids[0] == bos
                assert seq.input_ids.count(bos) == 1
                p = seq.input_ids[: seq.prompt_len]
                full_prompt = [bos] + tok(prompt, add_special_tokens=False)["input_ids"]
                longest = max(len(chosen), len(rejected)) + 1
                if len(full_prompt) + longest <= 16 or len(full_prompt) <= 6:
                    assert p == full_prompt
                else:
                    assert len(p) == 6
                    assert p == (full_prompt[:6] if mode == "keep_start" else [bos] + full_prompt[-5:])
                room = 16 - len(p)
                resp_ids = tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                assert seq.input_ids[seq.prompt_len :] == resp_ids[:room]
    # the case where the two rules differ: a short prompt, a long response
    c, _ = rules.tokenize("ab", ["0123456789abcdefg", "z"], "keep_end")
    assert len(c) == 16  # original: 3 + (16 - 6) = 13 tokens, 3 of the budget unused


def test_max_prompt_length_one_keep_end_with_bos():
    """The edge bug: keep_end with room for nothing but the BOS kept the whole prompt (prompt[-0:])."""
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=8, max_prompt_length=1)
    (s,) = rules.tokenize("abcdefghij", ["xyz"], "keep_end")
    assert s.input_ids[: s.prompt_len] == [tok.bos_token_id] and len(s) == 1 + 4


def test_truncation_mode_override_wins_over_the_source():
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    start = Tokenization(tok, max_length=10, max_prompt_length=5, truncation_mode="keep_start")
    (s,) = start.tokenize("abcdefghij", ["XY"], "keep_end")
    assert tok.decode(s.input_ids[1:5]) == "abcd"


# ----------------------------------------------------------------------------- batches


def test_global_token_count_for_per_token_sft():
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    from dpo_ds.data.sources import PromptGroup

    groups = [PromptGroup(f"{i}=", [], [], "x" * (i + 1), "keep_end") for i in range(4)]
    b = Batches(
        flatten(groups, sft=True),
        Tokenization(tok, max_length=32, max_prompt_length=8),
        global_batch=4,
        world=2,
        rank=0,
        micro_batches_per_step=1,
        seed=0,
    )
    (step,) = list(b.train_steps(1, None))
    # targets of 1..4 characters + EOS: 2 + 3 + 4 + 5 trained tokens in the global batch, seen by every rank
    assert step.micro_batches[0].global_tokens == 14 and step.micro_batches[0].global_examples == 4
    assert step.n_local == 2


def test_generation_prompts_are_the_trained_prompts(toks):
    from dpo_ds.data.batches import Example

    tok = toks["chatml"]
    turns = CONVERSATIONS[1][0]
    ex = Example(turns, [[assistant("a")], [assistant("b")]], "keep_end")
    b = Batches(
        [ex],
        Tokenization(tok, max_length=512, max_prompt_length=256),
        global_batch=1,
        world=1,
        rank=0,
        micro_batches_per_step=1,
        seed=0,
    )
    (prompt,) = b.prompts(1)
    assert prompt == ids_of(tok, turns, add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- conversations too long

LONG_USER = (
    "Here is a long document pasted by the user. It goes on about many things, line after line: "
    "classes, modules, the import system, exceptions and their handling, and a final question at the end. "
)


def long_conversations():
    """Multi-turn prompts that overflow: a system turn, earlier exchanges, a long last question."""
    return [
        [SYSTEM, user("first question " * 6), assistant("first answer " * 6), user(LONG_USER * 3)],
        [user("a " * 40), assistant("b " * 40), user("c " * 40), assistant("d " * 40), user("What now?")],
        [SYSTEM, user(LONG_USER * 4)],
        [{"role": "system", "content": LONG_USER * 3}, user("short question")],
    ]


def reference_shortening(tok, prompt, side, max_prompt_length):
    """The truncation rule written out by brute force (independent of dpo_ds's search): drop whole earlier
    exchanges oldest first (the system turn stays); then keep the most characters that fit of the earliest
    user message's text (its end for keep_end, its start for keep_start), then of the system turn's.
    Returns (messages, index of the message whose text was cut or None); token counts of a text's prefix
    are not monotonic under every tokenizer, so the longest fit is found by trying every length."""

    def fits(messages):
        return len(ids_of(tok, messages, add_generation_prompt=True)) <= max_prompt_length

    system = prompt[:1] if prompt[0]["role"] == "system" else []
    rest = prompt[len(system) :]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    for s in starts:
        if fits(system + rest[s:]):
            return system + rest[s:], None
    messages = system + rest[starts[-1] :]
    order = [i for i, m in enumerate(messages) if m["role"] == "user"][:1] + ([0] if system else [])
    for at in order:
        text = messages[at]["content"]
        for k in range(len(text), -1, -1):
            kept = text[len(text) - k :] if side == "keep_end" else text[:k]
            candidate = messages[:at] + [{**messages[at], "content": kept}] + messages[at + 1 :]
            if fits(candidate):
                return candidate, at
        messages = messages[:at] + [{**messages[at], "content": ""}] + messages[at + 1 :]
    raise AssertionError("nothing fits")


def cut_text_of(seq, tok, want, at, original, side):
    """The text dpo_ds kept of message `at`: the one whose rendering with the other messages of `want`
    gives seq's prompt ids, looked for among the original text's prefixes or suffixes."""
    prompt = seq.input_ids[: seq.prompt_len]
    for k in range(len(original), -1, -1):
        kept = original[len(original) - k :] if side == "keep_end" else original[:k]
        candidate = want[:at] + [{**want[at], "content": kept}] + want[at + 1 :]
        if ids_of(tok, candidate, add_generation_prompt=True) == prompt:
            return candidate, kept
    return None, None


@pytest.mark.parametrize("side", ["keep_end", "keep_start"])
@pytest.mark.parametrize("kind", KINDS)
def test_long_conversations_are_cut_as_conversations(toks, kind, side):
    """Every truncated prompt is apply_chat_template's own rendering of a shortened conversation (the
    same whole earlier exchanges dropped as the rule written out by brute force, then one message's text
    cut to a prefix or suffix of itself), within max_prompt_length, keeping within a few characters as
    much text as the brute force finds; the responses follow it as the template renders them."""
    tok = toks[kind]
    mpl, ml = 48, 80
    rules = Tokenization(tok, max_length=ml, max_prompt_length=mpl, truncation_mode=side)
    for prompt in long_conversations():
        assert len(ids_of(tok, prompt, add_generation_prompt=True)) > mpl  # the case under test
        chosen, rejected = [assistant("yes, " * 3)], [assistant("no")]
        c, r = rules.tokenize(prompt, [chosen, rejected], "keep_end")
        want, at = reference_shortening(tok, prompt, side, mpl)
        assert c.prompt_len <= mpl and c.input_ids[: c.prompt_len] == r.input_ids[: r.prompt_len]
        if at is None:
            got = want
            assert c.input_ids[: c.prompt_len] == ids_of(tok, want, add_generation_prompt=True)
        else:
            # the system turn's text, or the last user message's (all earlier exchanges went first)
            role = want[at]["role"]
            original = (
                prompt[0]["content"]
                if role == "system"
                else [m for m in prompt if m["role"] == "user"][-1]["content"]
            )
            got, kept = cut_text_of(c, tok, want, at, original, side)
            assert got is not None, (kind, side, "the prompt is no rendering of a cut conversation")
            assert len(kept) >= len(want[at]["content"]) - 8, (
                kind,
                side,
                len(kept),
                len(want[at]["content"]),
            )
        for seq, answer in ((c, chosen), (r, rejected)):
            full = ids_of(tok, got + answer)
            assert seq.input_ids == full[:ml] or rules.boundary_splits, (kind, side)
    assert sum(rules.cuts.values()) >= len(long_conversations())
    assert any("truncated" in line for line in rules.summary())


def test_chatml_long_prompt_keeps_its_headers(toks):
    """The bug: keep_end kept '<|im_start|>' (ChatML's bos_token) and then the middle of the user's text.
    Now every <|im_start|> opens a role header and the prompt ends with the generation prompt."""
    tok = toks["chatml"]
    rules = Tokenization(tok, max_length=64, max_prompt_length=40, truncation_mode="keep_end")
    prompt = [SYSTEM, user(LONG_USER * 5)]
    (c,) = rules.tokenize(prompt, [[assistant("ok")]], "keep_end")
    text = tok.decode(c.input_ids[: c.prompt_len])
    assert c.prompt_len <= 40
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    pieces = text.split("<|im_start|>")[1:]
    assert [p.split("\n", 1)[0] for p in pieces] == ["system", "user", "assistant"]
    assert rules.cuts == {"text": 1}


def test_plain_text_on_a_chatml_tokenizer_keeps_adding_nothing(toks):
    """A plain-text prompt on a tokenizer whose bos_token is a template marker: nothing in front, and
    keep_end keeps the text's end, not a leading <|im_start|> it never had."""
    tok = toks["chatml"]
    rules = Tokenization(tok, max_length=24, max_prompt_length=10, truncation_mode="keep_end")
    text = LONG_USER
    (c,) = rules.tokenize(text, ["ok"], "keep_end")
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert c.input_ids[: c.prompt_len] == plain[-10:]
    assert tok.bos_token_id not in c.input_ids
    assert rules.cuts == {"tokens": 1}


def test_a_template_too_long_for_max_prompt_length_is_an_error(toks):
    tok = toks["chatml"]
    rules = Tokenization(tok, max_length=8, max_prompt_length=4)
    with pytest.raises(DataError, match=r"row 3.*more than max_prompt_length=4"):
        rules.tokenize(
            [SYSTEM, user(LONG_USER)], [[assistant("ok")]], "keep_end", ["f.jsonl row 3", "f.jsonl row 3"]
        )


def test_each_source_says_how_its_rows_are_rendered(toks, shapes):
    from dpo_ds.data.sources import PromptGroup

    tok = toks["llama"]
    rules = Tokenization(tok, max_length=64, max_prompt_length=32)
    line = rules.describe("ultrafeedback:/data/uf", shapes["ultrafeedback"])
    assert (
        line
        == f"data source ultrafeedback:/data/uf: {len(CONVERSATIONS)} conversations rendered by the chat template"
    )
    plain = [PromptGroup("1+1=", ["2", "3"], [(0, 1)], "2", "keep_end")]
    assert rules.describe("demo", plain) == (
        "data source demo: 1 plain-text prompts, no chat template (['<s>'] in front, '</s>' after each response)"
    )
