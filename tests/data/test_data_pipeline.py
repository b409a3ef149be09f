"""Tokenisation, truncation, batching and the padded collator on the shipped char-level tokenizer
(one token per character, and like Llama's it puts <s> in front of a text, so every expected length
below is counted by hand). Chat templates and other tokenizers: tests/data/test_chat.py."""

import pytest
import torch

from dpo_ds.data.batches import Batches, flatten, rank_share
from dpo_ds.data.collate import collate_padded
from dpo_ds.data.sources import PromptGroup
from dpo_ds.data.tokenize import IGNORE, Tokenization
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer
from dpo_ds.model.lm import reduce_sequences


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODELS["tiny"])


def tokenize_example(tok, prompt, responses, *, max_length, max_prompt_length, truncation_mode):
    rules = Tokenization(tok, max_length=max_length, max_prompt_length=max_prompt_length)
    return rules.tokenize(prompt, responses, truncation_mode)


def test_prompt_masked_eos_appended(tok):
    chosen, rejected = tokenize_example(
        tok, "12+34=", ["046", "036x"], max_length=32, max_prompt_length=16, truncation_mode="keep_start"
    )
    # BOS + 6 prompt chars, then the response and EOS
    assert chosen.input_ids[0] == tok.bos_token_id
    assert chosen.input_ids[-1] == tok.eos_token_id and rejected.input_ids[-1] == tok.eos_token_id
    assert len(chosen) == 1 + 6 + 3 + 1 and len(rejected) == 1 + 6 + 4 + 1
    assert chosen.labels[:7] == [IGNORE] * 7
    assert chosen.labels[7:] == chosen.input_ids[7:]
    assert tok.decode(chosen.input_ids[7:10]) == "046"


def test_truncation_keep_start_and_keep_end(tok):
    prompt = "abcdefghij"  # 10 chars
    kw = dict(max_length=10, max_prompt_length=5)
    (s,) = tokenize_example(tok, prompt, ["XY"], truncation_mode="keep_start", **kw)
    # too long (1 + 10 + 3 > 10): prompt cut to 5 incl. BOS -> BOS + "abcd", response "XY</s>" fits
    assert tok.decode(s.input_ids[1:5]) == "abcd" and s.input_ids[0] == tok.bos_token_id
    assert tok.decode(s.input_ids[5:7]) == "XY" and len(s) == 8
    (e,) = tokenize_example(tok, prompt, ["XY"], truncation_mode="keep_end", **kw)
    assert tok.decode(e.input_ids[1:5]) == "ghij"
    # response longer than the room left: cut to max_length, EOS may be lost (as in the original)
    (r,) = tokenize_example(tok, prompt, ["0123456789"], truncation_mode="keep_end", **kw)
    assert len(r) == 10 and tok.decode(r.input_ids[5:]) == "01234"
    assert r.labels[:5] == [IGNORE] * 5
    # short enough: nothing is cut
    (n,) = tokenize_example(tok, "ab", ["c"], truncation_mode="keep_end", **kw)
    assert len(n) == 1 + 2 + 1 + 1


def test_flatten_pairs_and_sft():
    g = [
        PromptGroup("p", ["a", "b", "c"], [(0, 1), (2, 1)], "a", "keep_end"),
        PromptGroup("q", ["x"], [], "x", "keep_start"),
    ]
    pref = flatten(g, sft=False)
    assert [(e.prompt, e.responses) for e in pref] == [("p", ["a", "b"]), ("p", ["c", "b"])]
    sft = flatten(g, sft=True)
    assert [(e.prompt, e.responses) for e in sft] == [("p", ["a"]), ("q", ["x"])]


def test_padded_collator_concatenates_chosen_then_rejected(tok):
    exs = [
        tokenize_example(tok, p, ["1", "22"], max_length=16, max_prompt_length=8, truncation_mode="keep_end")
        for p in ("a=", "bb=")
    ]
    b = collate_padded(exs, tok.pad_token_id)
    assert b.n_seqs == 4 and b.input_ids.shape == (4, 1 + 3 + 2 + 1)
    # rows: chosen_0, chosen_1, rejected_0, rejected_1
    assert b.input_ids[0].tolist()[:5] == exs[0][0].input_ids
    assert b.input_ids[2].tolist()[:6] == exs[0][1].input_ids
    assert b.attention_mask[0].tolist() == [1] * 5 + [0] * 2
    assert (b.labels[b.attention_mask == 0] == IGNORE).all()
    # per-sequence sums only count response tokens of their own sequence
    logps, counts = reduce_sequences(torch.ones(len(b.target_pos)), b.target_seq, b.n_seqs)
    assert counts.tolist() == [2, 2, 3, 3]  # "1</s>", "22</s>"
    assert logps.tolist() == [2.0, 2.0, 3.0, 3.0]


def _groups(n):
    return [PromptGroup(f"{i:02d}+", [f"{i}", f"{i}x"], [(0, 1)], f"{i}", "keep_end") for i in range(n)]


def _batches(tok, rank, world, **kw):
    args = dict(
        global_batch=8,
        world=world,
        rank=rank,
        micro_batches_per_step=2,
        seed=3,
    )
    args.update(kw)
    return Batches(
        flatten(_groups(20), sft=False), Tokenization(tok, max_length=16, max_prompt_length=8), **args
    )


def test_ranks_get_disjoint_shards_and_equal_micro_batches(tok):
    steps = [list(_batches(tok, r, 2).train_steps(n_epochs=2, n_examples=None)) for r in range(2)]
    assert len(steps[0]) == len(steps[1]) == 40 // 8  # 2 epochs of 20, remainder dropped
    for s0, s1 in zip(*steps):
        assert len(s0.micro_batches) == len(s1.micro_batches) == 2
        p0 = {tok.decode(row) for mb in s0.micro_batches for row in mb.input_ids[: mb.n_seqs // 2]}
        p1 = {tok.decode(row) for mb in s1.micro_batches for row in mb.input_ids[: mb.n_seqs // 2]}
        assert not p0 & p1
    # one rank alone sees every example of the first epoch exactly once per epoch
    alone = list(_batches(tok, 0, 1).train_steps(n_epochs=1, n_examples=None))
    assert sum(s.n_local for s in alone) == 16


def test_shuffle_is_deterministic_and_resumable(tok):
    a = [s.micro_batches[0].input_ids for s in _batches(tok, 0, 2).train_steps(2, None)]
    b = [s.micro_batches[0].input_ids for s in _batches(tok, 0, 2).train_steps(2, None)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = [s.micro_batches[0].input_ids for s in _batches(tok, 0, 2).train_steps(2, None, start_step=3)]
    assert all(torch.equal(x, y) for x, y in zip(a[3:], resumed))
    other = [s.micro_batches[0].input_ids for s in _batches(tok, 0, 2, seed=4).train_steps(2, None)]
    assert not all(torch.equal(x, y) for x, y in zip(a, other))


def test_n_examples_limits_steps(tok):
    assert _batches(tok, 0, 2).n_steps(n_epochs=None, n_examples=17) == 2
    assert _batches(tok, 0, 2).n_steps(n_epochs=1, n_examples=100) == 2


def test_eval_batches_equal_per_rank(tok):
    ev = [_batches(tok, r, 2, micro_batches_per_step=1).eval_batches(19) for r in range(2)]
    assert len(ev[0]) == len(ev[1]) == 2  # 19 -> two global batches of 8
    assert all(n == 4 for _, n in ev[0])


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (5, 3), (1, 4), (10, 4)])
def test_rank_share_gives_each_item_once_and_every_rank_the_same_count(n, world):
    items = list(range(n))
    shares = [rank_share(items, r, world) for r in range(world)]
    assert len({len(share) for share, _ in shares}) == 1  # the same number of calls on every rank
    real = [x for share, n_real in shares for x in share[:n_real]]
    assert real == items  # in order, each once
    for share, n_real in shares:
        assert all(x == items[-1] for x in share[n_real:])  # padding repeats the last item
