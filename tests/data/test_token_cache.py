"""The token cache without a launcher: what it stores gives exactly the ids Tokenization.tokenize gives
(plain and conversational rows, unlabelled turns, empty prompts), the same micro-batches in every layout,
and a few bytes per token; it is found again by its fingerprint and built again when anything that
changes the ids changes; a cache cut short is never used."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
import torch

datasets = pytest.importorskip("datasets")

from dpo_ds.config import load_config  # noqa: E402
from dpo_ds.data import cache  # noqa: E402
from dpo_ds.data.batches import Batches, Example, flatten  # noqa: E402
from dpo_ds.data.layout import choose  # noqa: E402
from dpo_ds.data.sources import load_source  # noqa: E402
from dpo_ds.data.tokenize import Tokenization  # noqa: E402
from dpo_ds.demo.tokenizers import build_tokenizer  # noqa: E402
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer  # noqa: E402
from tests.data.solo import Solo  # noqa: E402


def user(t):
    return {"role": "user", "content": t}


def assistant(t):
    return {"role": "assistant", "content": t}


def mixed_examples(rng: random.Random) -> list[Example]:
    """Plain rows (one with an empty prompt), conversations, multi-turn SFT targets with user turns."""
    chars = "abcdefghij0123456789+= "

    def text(lo, hi):
        return "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))

    out = [Example("", [text(2, 6), text(1, 4)], "keep_end")]
    out += [
        Example(text(0, 30), [text(1, 25), text(1, 8)], rng.choice(["keep_start", "keep_end"]))
        for _ in range(12)
    ]
    out += [
        Example([user(text(5, 60))], [[assistant(text(2, 20))], [assistant(text(1, 5))]], "keep_end")
        for _ in range(6)
    ]
    return out


def sft_examples(rng):
    turns = [user("q1"), assistant("a1"), user("q2"), assistant("a2 long answer")]
    return [
        Example([user("hello")], [turns[1:]], "keep_end"),
        Example([user("x" * 40)], [[assistant("y")]], "keep_end"),
    ]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(build_tokenizer("chatml", tmp_path_factory.mktemp("tok") / "chatml"))
    )


def _write(store_builder_examples, tokenization, split, tmp_path):
    """The examples through a real shard file (ArrowWriter) and back (Dataset.from_file, memory-mapped)."""
    target = tmp_path / f"{split}.arrow"
    digest, tokens, _ = cache._write_shard(
        target, split, store_builder_examples, 0, len(store_builder_examples), tokenization, 0
    )
    return cache.TokenStore.from_datasets([datasets.Dataset.from_file(str(target))], split, digest), tokens


@pytest.mark.parametrize("kind", ["char", "chatml"])
def test_the_store_gives_the_ids_tokenize_gives(tmp_path, chatml, kind):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"]) if kind == "char" else chatml
    rules = Tokenization(tok, max_length=40, max_prompt_length=20)
    chat = kind == "chatml"  # conversations on the tokenizer with a template, plain rows on the other
    examples = [e for e in mixed_examples(random.Random(0)) if isinstance(e.prompt, str) != chat]
    store, tokens = _write(examples, rules, "test", tmp_path)
    assert len(store) == len(examples)
    for i, ex in enumerate(examples):
        want = rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)
        got = store.seqs(i)
        assert [(s.input_ids, s.labels, s.prompt_len) for s in got] == [
            (s.input_ids, s.labels, s.prompt_len) for s in want
        ]
        assert store.row(i)["prompt"] == ex.prompt  # the text, for eval.checker
    assert tokens == store.tokens == sum(len(s) for i in range(len(store)) for s in store.seqs(i))


def test_unlabelled_turns_of_multi_turn_sft_targets(tmp_path, chatml):
    rules = Tokenization(chatml, max_length=200, max_prompt_length=100)
    examples = sft_examples(random.Random(0))
    store, _ = _write(examples, rules, "train", tmp_path)
    for i, ex in enumerate(examples):
        (want,) = rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode)
        (got,) = store.seqs(i)
        assert got.labels == want.labels and got.input_ids == want.input_ids
    assert any(-100 in s.labels[s.prompt_len :] for s in store.seqs(0))  # the user turn is not trained on
    # labelled tokens per example, as Batches counted them from the lists before
    want = [sum(sum(1 for t in s.labels[1:] if t != -100) for s in store.seqs(i)) for i in range(len(store))]
    assert store.labelled().tolist() == want


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_every_layout_batches_the_store_as_the_examples(tmp_path, layout):
    """Batches over the store (the cache's path) and over the Examples (tokenized in memory) give equal
    micro-batches, step by step, on each of 2 ranks."""
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=40, max_prompt_length=20)
    examples = [e for e in mixed_examples(random.Random(1)) if isinstance(e.prompt, str)][:12]
    store, _ = _write(examples, rules, "train", tmp_path)
    budget = 0 if layout == "padded" else 96
    chosen = choose(
        layout, max_length=40, row_tokens=0, max_tokens_per_micro_batch=budget, attn="auto", on_cpu=True
    )
    kw = dict(global_batch=8, world=2, micro_batches_per_step=2, seed=3, layout=chosen,
              max_tokens_per_micro_batch=budget)  # fmt: skip
    for rank in (0, 1):
        a = list(Batches(store, rules, rank=rank, **kw).train_steps(2, None))
        b = list(Batches(examples, rules, rank=rank, **kw).train_steps(2, None))
        assert len(a) == len(b) == 3  # 2 epochs of 12 examples, 8 a step
        for sa, sb in zip(a, b):
            for ma, mb in zip(sa.micro_batches, sb.micro_batches):
                for k in dataclasses.fields(ma):
                    va, vb = getattr(ma, k.name), getattr(mb, k.name)
                    assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (layout, k)


def test_shards_are_read_in_place(tmp_path, chatml):
    """A store over several shards (one per rank that built it) gives each example's ids from its own
    shard's mapped values: the same ids as tokenize, and no value array concatenated into memory."""
    rules = Tokenization(chatml, max_length=40, max_prompt_length=20)
    examples = [e for e in mixed_examples(random.Random(1)) if not isinstance(e.prompt, str)] * 3
    examples += [
        Example([user("")], [[assistant("a")], [assistant("")]], "keep_end")
    ]  # empty slices at an end
    cuts = [0, 5, 5, 11, len(examples)]  # one shard empty
    parts = []
    for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        cache._write_shard(tmp_path / f"{k}.arrow", "train", examples, lo, hi, rules, 0)
        parts.append(datasets.Dataset.from_file(str(tmp_path / f"{k}.arrow")))
    store = cache.TokenStore.from_datasets(parts, "train", "")
    assert len(store) == len(examples)
    for i, ex in enumerate(examples):
        want = rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)
        assert [(s.input_ids, s.labels) for s in store.seqs(i)] == [(s.input_ids, s.labels) for s in want]
    for name in ("prompt_values", "resp_values"):
        pieces = store.c[name]
        assert len(pieces.arrays) == sum(len(d) > 0 for d in parts) == 3 and not any(
            a.flags.owndata for a in pieces.arrays
        )
        with pytest.raises(IndexError, match="cross a chunk"):
            pieces[slice(int(pieces.starts[1]) - 1, int(pieces.starts[1]) + 1)]


def test_a_few_bytes_per_token(tmp_path):
    """What a rank holds once the cache is mapped: its lengths arrays; the ids stay in the mapped file."""
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=64, max_prompt_length=32)
    examples = [Example("p" * 20, ["c" * 30, "r" * 30], "keep_end") for _ in range(2000)]
    store, tokens = _write(examples, rules, "train", tmp_path)
    held = sum(a.nbytes for a in (store.prompt_lens, store.response_lens, store.c["prompt_offsets"],
                                  store.c["resp_offsets"], store.c["resp_starts"], store.c["mask_offsets"]))  # fmt: skip
    assert held / tokens < 1.0  # the offsets and lengths: well under the 8 bytes per token allowed
    # on disk: an int32 per id stored (the prompt once per pair, not once per sequence), list offsets
    stored = int(store.prompt_lens.sum() + store.response_lens.sum())
    assert stored < 0.82 * tokens  # 83 ids stored for 2 x (21 + 31) = 104 trained on
    assert (tmp_path / "train.arrow").stat().st_size <= 4 * stored + 40 * len(store) + 4096


def _cfg(tmp_path, **over):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(20)]
    for split in ("train", "test"):
        if not (data / f"{split}.jsonl").exists():  # written once: a rewrite is a new file to the fingerprint
            (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = [
        f"datasets=[{data}]",
        "max_length=32",
        "max_prompt_length=16",
        *[f"{k}={v}" for k, v in over.items()],
    ]
    return load_config(None, keys)


class Calls:
    """The splits whose sources were read, in order: the build reads them in its worker process, so
    each read is written to a file the test reads back."""

    def __init__(self, path):
        self.path = path
        path.write_text("")

    def append(self, split):
        with open(self.path, "a") as f:
            f.write(split + "\n")

    def __eq__(self, other):
        return self.path.read_text().split() == other


def _prepare(cfg, root, calls):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    calls = calls if calls is not None else Calls(root.parent / "unread-calls")

    def load(split):
        calls.append(split)
        return flatten(load_source(cfg.datasets[0], split, None), False)

    return cache.prepare(
        cfg, rules, SHIPPED_MODELS["tiny"], root, False, rank=0, world=1, comm=Solo, load_examples=load
    )


def test_found_again_by_its_fingerprint_and_rebuilt_on_a_change(tmp_path):
    root = tmp_path / "cache"
    calls = Calls(tmp_path / "calls")
    first = _prepare(_cfg(tmp_path), root, calls)
    assert first.built and calls == ["train", "test"]
    again = _prepare(_cfg(tmp_path), root, calls)  # a relaunch: mapped, the sources not read
    assert not again.built and calls == ["train", "test"] and again.path == first.path
    assert again.stores["train"].digest == first.stores["train"].digest
    assert [again.stores["train"].seqs(i)[0].input_ids for i in range(3)] == [
        first.stores["train"].seqs(i)[0].input_ids for i in range(3)
    ]
    longer = _prepare(_cfg(tmp_path, max_prompt_length=8), root, calls)  # changes the ids: a new cache
    assert longer.built and longer.path != first.path
    data = tmp_path / "data" / "train.jsonl"
    data.write_text(data.read_text() + json.dumps({"prompt": "x=", "chosen": "1", "rejected": "2"}) + "\n")
    edited = _prepare(_cfg(tmp_path), root, calls)  # the data file changed
    assert edited.built and edited.path != first.path and len(edited.stores["train"]) == 21


def test_the_fingerprint_holds_the_sources_in_order_and_each_repeat(tmp_path):
    from dataclasses import replace

    cfg = _cfg(tmp_path)
    one = cache.fingerprint(cfg, SHIPPED_MODELS["tiny"], False)
    twice = cache.fingerprint(replace(cfg, datasets=cfg.datasets * 2), SHIPPED_MODELS["tiny"], False)
    assert cache.digest_of(one) != cache.digest_of(twice) and twice["datasets"] == ", ".join(cfg.datasets * 2)
    swapped = replace(cfg, datasets=["demo", *cfg.datasets])
    other_order = replace(cfg, datasets=[*cfg.datasets, "demo"])
    assert cache.digest_of(cache.fingerprint(swapped, SHIPPED_MODELS["tiny"], False)) != cache.digest_of(
        cache.fingerprint(other_order, SHIPPED_MODELS["tiny"], False)
    )


def test_a_cache_cut_short_is_never_used(tmp_path):
    root = tmp_path / "cache"
    first = _prepare(_cfg(tmp_path), root, None)
    (first.path / cache.MANIFEST).write_text('{"facts": ')  # a crash while writing it
    calls = Calls(tmp_path / "calls")
    again = _prepare(_cfg(tmp_path), root, calls)
    assert again.built and calls == ["train", "test"]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # no temporary directory left


def test_a_bad_row_names_its_file_and_row(tmp_path):
    from dpo_ds.data.sources import DataError

    cfg = _cfg(tmp_path)
    data = tmp_path / "data" / "train.jsonl"
    data.write_text(
        data.read_text() + json.dumps({"prompt": "x=", "chosen": "a</s>b", "rejected": "2"}) + "\n"
    )
    with pytest.raises(DataError, match=r"train.jsonl row 20 \(0-based\), field 'chosen'.*EOS"):
        _prepare(cfg, tmp_path / "cache", [])
    assert not any(p.name.startswith("tokens-") for p in (tmp_path / "cache").iterdir())


def test_forked_workers_give_the_same_shard(tmp_path):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rules = Tokenization(tok, max_length=40, max_prompt_length=20)
    examples = [e for e in mixed_examples(random.Random(2)) if isinstance(e.prompt, str)] * 5
    one = cache._write_shard(tmp_path / "a.arrow", "train", examples, 0, len(examples), rules, 0, num_proc=1)
    two = cache._write_shard(tmp_path / "b.arrow", "train", examples, 0, len(examples), rules, 0, num_proc=2)
    assert one == two and os.path.getsize(tmp_path / "a.arrow") == os.path.getsize(tmp_path / "b.arrow")


def test_the_build_runs_in_a_worker_whose_failures_reach_the_rank():
    """The share is tokenized in a forked worker (its heap goes with it): its result and its exceptions
    come back to the rank, and a worker that dies is named with its exit code, never waited for."""
    from dpo_ds.data.sources import DataError

    assert cache._in_worker(lambda: {"pid": os.getpid()})["pid"] != os.getpid()
    with pytest.raises(DataError, match="row 7"):
        cache._in_worker(lambda: (_ for _ in ()).throw(DataError("f.jsonl row 7: bad")))
    with pytest.raises(DataError, match="died with exit code 3"):
        cache._in_worker(lambda: os._exit(3))
