"""LD-DPO's token weights (model/lm.py length_weights): the tokens of each response past its pair's shorter
response weigh ld_alpha, in every layout alike, against each sequence's own forward weighted by hand."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.data.collate import collate_padded
from dpo_ds.data.packing import collate_packed
from dpo_ds.data.shared_prompt import collate_shared
from dpo_ds.model.files import SHIPPED_MODELS, load_config, load_tokenizer, random_init_state
from dpo_ds.model.lm import LogprobLM, length_weights, sequence_logps
from tests.model.test_router_loss import pairs


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODELS["tiny"])


def _lm(attn=None):
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.attention import register

    register()
    extra = {"attn_implementation": attn} if attn else {}
    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32, **extra)
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    return lm.eval()


def test_length_weights_by_hand():
    # 2 pairs: chosen lengths 3 and 1, rejected 2 and 4; tokens listed out of order within each sequence
    target_seq = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    target_pos = torch.tensor([12, 10, 11, 30, 20, 21, 43, 40, 41, 42])
    w = length_weights(target_seq, target_pos, 4, 0.25)
    # pair 0 shares 2 tokens: the chosen response's third (position 12) weighs 0.25; pair 1 shares 1 token:
    # the rejected response's tokens at 41, 42, 43 weigh 0.25
    assert w.tolist() == [0.25, 1, 1, 1, 1, 1, 0.25, 1, 0.25, 0.25]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_every_layout_weighs_the_tokens_of_each_sequence_alone(tok, alpha):
    examples = pairs(tok, 6, seed=2)
    lm = _lm()
    # the independent computation: each sequence's own forward, its response tokens' log-probs weighted by hand
    padded = collate_padded(examples, tok.pad_token_id)
    n = padded.n_seqs // 2
    with torch.no_grad():
        logits = lm(padded.input_ids, attention_mask=padded.attention_mask).logits.log_softmax(-1)
    want = torch.zeros(padded.n_seqs, dtype=torch.float64)
    lengths = [int((padded.labels[s] != -100).sum()) for s in range(padded.n_seqs)]
    for s in range(padded.n_seqs):
        shared = min(lengths[s % n], lengths[n + s % n])
        scored = (padded.labels[s, 1:] != -100).nonzero().flatten()
        for k, t in enumerate(scored.tolist()):
            weight = 1.0 if k < shared else alpha
            want[s] += weight * float(logits[s, t, padded.labels[s, t + 1]])
    assert any(lengths[i] != lengths[n + i] for i in range(n))  # some pairs differ in length
    blocks = _lm("dpo_ds_blocks")
    for name, model, batch in (
        ("padded", lm, padded),
        ("packed", blocks, collate_packed(examples, tok.pad_token_id, 1 << 30)),
        ("shared_prompt", blocks, collate_shared(examples, tok.pad_token_id, row_len=1 << 30)),
        ("shared_prompt, rows of 60", blocks, collate_shared(examples, tok.pad_token_id, row_len=60)),
    ):
        got = sequence_logps(LogprobLM(model, "naive", ld_alpha=alpha), batch).logps
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=name)
    plain = sequence_logps(LogprobLM(lm, "naive"), padded).logps
    torch.testing.assert_close(sequence_logps(LogprobLM(lm, "naive", ld_alpha=1.0), padded).logps, plain)
    assert (plain.double() - want).abs().max() > 1e-3  # the weights matter here: the test can fail
