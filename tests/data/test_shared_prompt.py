"""Shared-prompt layout: the same per-sequence log-probs and gradients as the padded layout.

On a tiny random Llama in fp32, for random prompt and response lengths (empty prompts, one-token
responses, rows truncated by max_length), several pairs packed per row.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ds.data.collate import collate_padded
from dpo_ds.data.shared_prompt import block_length, collate_shared
from dpo_ds.data.tokenize import IGNORE, Tokenization
from dpo_ds.model.attention import allowed, block_mask
from dpo_ds.model.files import SHIPPED_MODELS, load_config, load_tokenizer, random_init_state
from dpo_ds.model.lm import LogprobLM, sequence_logps


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODELS["tiny"])


def _model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    return LogprobLM(lm.eval(), "naive")


def _examples(tok, n: int, seed: int, add_bos: str = "auto", max_length: int = 24):
    """Random pairs of random lengths; max_length cuts some prompts and responses."""
    rng = random.Random(seed)
    rules = Tokenization(tok, max_length=max_length, max_prompt_length=max_length // 2, add_bos=add_bos)
    chars = "abcdefghij0123456789+="

    def text(lo, hi):
        return "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))

    # the edge cases every set holds: an empty prompt, an EOS-only response, a row max_length cuts
    rows = [
        ("", text(1, 5), text(0, 3)),
        (text(3, 8), text(2, 6), ""),
        (text(20, 30), text(20, 30), text(1, 4)),
    ]
    rows += [(text(0, 20), text(0, 25), text(0, 1)) for _ in range(n - len(rows))]
    return [rules.tokenize(p, [c, r], rng.choice(["keep_start", "keep_end"])) for p, c, r in rows]


def _grads(model, batch, weights):
    model.zero_grad()
    seqs = sequence_logps(model, batch)
    (seqs.logps * weights).sum().backward()
    return seqs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed, add_bos", [(0, "auto"), (1, "auto"), (2, "false"), (3, "false")])
def test_shared_prompt_equals_padded(tok, seed, add_bos):
    model = _model()
    examples = _examples(tok, 7, seed, add_bos)
    assert examples[0][0].prompt_len == (
        1 if add_bos == "auto" else 0
    )  # an empty prompt (BOS only, or nothing)
    assert len(examples[1][1]) - examples[1][1].prompt_len == 1  # a one-token response (EOS only)
    assert len(examples[2][0]) == 24  # cut to max_length
    padded = collate_padded(examples, tok.pad_token_id)
    shared = collate_shared(examples, tok.pad_token_id, row_len=40)  # several blocks per row
    assert shared.input_ids.shape[0] < padded.input_ids.shape[0]
    # the scored tokens are the same ones, sequence by sequence
    assert sorted(zip(shared.target_seq.tolist(), shared.target_ids.tolist())) == sorted(
        zip(padded.target_seq.tolist(), padded.target_ids.tolist())
    )
    weights = torch.randn(padded.n_seqs, generator=torch.Generator().manual_seed(seed))
    a, grads_a = _grads(model, padded, weights)
    b, grads_b = _grads(model, shared, weights)
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(b.logps, a.logps, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_block_structure(tok):
    """[prompt | chosen | rejected]: positions continue from the prompt for both responses; the first
    token of each response is scored from the prompt's last position."""
    rules = Tokenization(tok, max_length=32, max_prompt_length=16)
    ex = rules.tokenize("12+3=", ["15", "105"], "keep_end")  # <s> 1 2 + 3 = | 1 5 </s> | 1 0 5 </s>
    b = collate_shared([ex], tok.pad_token_id)
    p = 6
    assert b.input_ids.shape == (1, p + 3 + 4) == (1, block_length(ex))
    assert b.position_ids[0].tolist() == list(range(p)) + list(range(p, p + 3)) + list(range(p, p + 4))
    assert b.branch_ids[0].tolist() == [0] * p + [1] * 3 + [2] * 4
    firsts = [pos for pos, seq in zip(b.target_pos.tolist(), b.target_seq.tolist()) if pos == p - 1]
    assert len(firsts) == 2  # both responses' first tokens read the last prompt position
    assert b.logical_tokens == len(ex[0]) + len(ex[1]) == 9 + 10
    # rejected never sees chosen; both see the prompt; nothing sees padding or another block
    blk, br = b.block_ids[0], b.branch_ids[0]
    pos = torch.arange(blk.shape[0])
    ok = allowed(blk[:, None], br[:, None], pos[:, None], blk[None, :], br[None, :], pos[None, :])
    assert ok[p + 3 + 2, p + 1].item() is False  # a rejected token, a chosen key
    assert ok[p + 3 + 2, p - 1].item() is True and ok[p + 1, p + 2].item() is False  # prompt yes; no future


def test_flex_block_mask_matches_the_dense_one(tok):
    """FlexAttention's BlockMask is built from the same rule; its mask_mod, evaluated on every
    (query, key), is the dense mask (the kernel itself runs on the GPU check)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    b = collate_shared(_examples(tok, 4, 5), tok.pad_token_id, row_len=48)
    dense = block_mask(b.block_ids, b.branch_ids, False, torch.float32)[:, 0] == 0  # (rows, T, T) allowed
    bm = block_mask(b.block_ids, b.branch_ids, True, torch.float32)
    rows, t = b.block_ids.shape
    q = torch.arange(t)[:, None].expand(t, t)
    k = torch.arange(t)[None, :].expand(t, t)
    for r in range(rows):
        got = bm.mask_mod(torch.tensor(r), torch.tensor(0), q, k)
        assert torch.equal(got, dense[r])


def test_shared_prompt_sft_and_dense_limit(tok):
    from dpo_ds.data.layout import DENSE_MASK_MAX_TOKENS

    rules = Tokenization(tok, max_length=32, max_prompt_length=16)
    exs = [rules.tokenize(p, [r], "keep_end") for p, r in (("1+1=", "2"), ("", "abc"))]  # SFT: one response
    b = collate_shared(exs, tok.pad_token_id)
    assert b.n_seqs == 2 and (b.labels[b.block_ids < 0] == IGNORE).all()
    with pytest.raises(ValueError, match="flex_attention"):
        block_mask(
            torch.zeros(1, DENSE_MASK_MAX_TOKENS + 1, dtype=torch.long),
            torch.zeros(1, DENSE_MASK_MAX_TOKENS + 1, dtype=torch.long),
            False,
            torch.float32,
        )


def _blocks_model():
    """The same random Llama with attn_implementation=dpo_ds_blocks (attention per segment)."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.attention import NAME, register

    register()
    lm = AutoModelForCausalLM.from_config(
        load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32, attn_implementation=NAME
    )
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    model = LogprobLM(lm.eval(), "naive")
    assert model.attn == NAME
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_block_attention_equals_padded(tok, seed):
    """Packed and shared-prompt micro-batches as ONE row each (no padding), attention computed per
    segment: the padded layout's log-probs and gradients."""
    from dpo_ds.data.packing import collate_packed

    examples = _examples(tok, 7, seed)
    weights = torch.randn(2 * len(examples), generator=torch.Generator().manual_seed(seed))
    a, grads_a = _grads(_model(), collate_padded(examples, tok.pad_token_id), weights)
    blocks = _blocks_model()
    for batch in (
        collate_shared(examples, tok.pad_token_id, row_len=1 << 30),
        collate_packed(examples, tok.pad_token_id, 1 << 30),
    ):
        assert batch.input_ids.shape[0] == 1 and (batch.seq_ids >= 0).all()  # one row, no padding
        b, grads_b = _grads(blocks, batch, weights)
        torch.testing.assert_close(b.logps, a.logps, rtol=0, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5, msg=name)
    # several rows with tail padding work too (the precomputed pass and a token budget make them)
    b, _ = _grads(blocks, collate_shared(examples, tok.pad_token_id, row_len=40), weights)
    torch.testing.assert_close(b.logps, a.logps, rtol=0, atol=1e-5)


def test_block_attention_model_generates_like_sdpa(tok):
    """Generation gives no spans: block attention is then plain SDPA with transformers' mask, left
    padding included, so eval samples under a packed layout are the sdpa model's."""
    blocks = _blocks_model()
    plain = _model()
    prompts = [[1, 5, 6, 7], [1, 9]]
    width = 4
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    outs = [
        m.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for m in (blocks, plain)
    ]
    assert torch.equal(outs[0], outs[1])
