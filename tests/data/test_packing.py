"""Packed rows must give the same per-sequence log-probs as padded rows (fp32, <= 1e-5)."""

import random

import pytest
import torch

from dpo_ds.data.batches import Batches, flatten
from dpo_ds.data.collate import collate_padded
from dpo_ds.data.layout import Packed
from dpo_ds.data.packing import collate_packed, equalise, pack_rows, split_by_budget
from dpo_ds.data.sources import PromptGroup
from dpo_ds.data.tokenize import IGNORE, Tokenization, TokenizedSeq
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer, random_init_state
from dpo_ds.model.lm import LogprobLM, sequence_logps


def _random_pairs(n, seed, vocab=100, max_len=40):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pair = []
        p = rng.randint(1, 15)
        prompt = [rng.randrange(4, vocab) for _ in range(p)]
        for _ in range(2):
            r = rng.randint(1, max_len - p)
            resp = [rng.randrange(4, vocab) for _ in range(r)]
            pair.append(TokenizedSeq(prompt + resp, [IGNORE] * p + resp))
        out.append(pair)
    return out


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.files import load_config

    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=1))
    return LogprobLM(lm.eval(), "naive")


def _logps(model, batch):
    with torch.no_grad():
        seqs = sequence_logps(model, batch)
    return seqs.logps, seqs.counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_padded(model, seed):
    pairs = _random_pairs(7, seed)
    padded, counts_a = _logps(model, collate_padded(pairs, 0))
    packed_batch = collate_packed(pairs, 0, row_len=64)
    assert packed_batch.input_ids.shape[0] < 14  # really packed: fewer rows than sequences
    packed, counts_b = _logps(model, packed_batch)
    assert torch.equal(counts_a, counts_b)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_packed_rows_layout():
    pairs = _random_pairs(5, 3)
    b = collate_packed(pairs, 0, row_len=50)
    real = b.seq_ids >= 0
    # no padding between segments: the real tokens of each row are a prefix of it
    for r in range(real.shape[0]):
        n = int(real[r].sum())
        assert real[r, :n].all() and not real[r, n:].any()
    # positions restart at 0 at the start of every segment
    for i in range(b.n_seqs):
        where = (b.seq_ids == i).nonzero()
        assert b.position_ids[where[0, 0], where[0, 1]] == 0
        assert (b.position_ids[where[:, 0], where[:, 1]] == torch.arange(len(where))).all()
    assert b.attention_mask is None
    # total real tokens equal the sum of the sequence lengths: nothing dropped, nothing padded in
    assert int(real.sum()) == sum(len(s) for p in pairs for s in p)


def test_pack_rows_respects_capacity():
    seqs = [TokenizedSeq([1] * n, [1] * n) for n in (30, 20, 20, 10, 10, 5)]
    rows = pack_rows(seqs, 40)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(len(seqs[i]) for i in r) <= 40 for r in rows)
    assert len(rows) == 3  # 95 tokens in rows of 40: first-fit-decreasing needs 3


def test_budget_split_keeps_pairs_and_equalises():
    pairs = _random_pairs(10, 4)
    groups = split_by_budget(pairs, max_tokens=120, n_micro=1)
    assert sorted(i for g in groups for i in g) == list(range(10))
    for g in groups:
        assert len(g) == 1 or sum(len(s) for i in g for s in pairs[i]) <= 120
    more = equalise(groups, len(groups) + 2)
    assert len(more) == len(groups) + 2
    assert sorted(i for g in more for i in g) == list(range(10))
    with pytest.raises(ValueError):
        equalise([[0], [1]], 3)


def test_ranks_agree_on_micro_batch_count():
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rng = random.Random(0)
    groups = [
        PromptGroup(f"{i}:", ["a" * rng.randint(1, 30), "b" * rng.randint(1, 30)], [(0, 1)], "a", "keep_end")
        for i in range(32)
    ]
    counts = {}

    def make(rank, sync):
        return Batches(
            flatten(groups, sft=False),
            Tokenization(tok, max_length=40, max_prompt_length=8),
            global_batch=16,
            world=2,
            rank=rank,
            micro_batches_per_step=1,
            seed=0,
            layout=Packed(40),
            max_tokens_per_micro_batch=90,
            sync_max=sync,
        )

    # first pass: record each rank's own count; second: sync to the max like the all-reduce does
    for rank in range(2):
        counts[rank] = [len(s.micro_batches) for s in make(rank, lambda n: n).train_steps(1, None)]
    target = [max(a, b) for a, b in zip(counts[0], counts[1])]
    for rank in range(2):
        synced = iter(target)
        steps = list(make(rank, lambda n, it=synced: next(it)).train_steps(1, None))
        assert [len(s.micro_batches) for s in steps] == target
        assert all(sum(mb.n_seqs for mb in s.micro_batches) == 2 * 8 for s in steps)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_a_maskless_flash_kernel_is_refused_for_shared_prompt_rows(attn):
    from dpo_ds.config import ConfigError
    from dpo_ds.data.layout import choose

    kw = dict(max_length=32, row_tokens=0, max_tokens_per_micro_batch=0, on_cpu=False)
    with pytest.raises(
        ConfigError, match=rf"model.attn_implementation': {attn} cannot run data.layout=shared_prompt"
    ):
        choose("shared_prompt", attn=attn, **kw)
    # one sequence a row, or packed sequences it tells apart by their restarting position ids
    assert choose("padded", attn=attn, **kw).attn == attn and choose("packed", attn=attn, **kw).attn == attn
