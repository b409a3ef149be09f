"""Expert load at eval (training/experts.py): its summary and the collapse warnings, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_ds.training.experts import collapse_warnings, summary, token_shares


def test_summary_by_hand():
    # 2 layers, 4 experts, top-2: 10 tokens a layer make 20 assignments a layer
    load = torch.tensor([[5.0, 5.0, 5.0, 5.0], [10.0, 6.0, 4.0, 0.0]])
    shares = token_shares(load, top_k=2)
    assert shares[0].tolist() == [0.5] * 4  # balanced top-2 of 4: each expert gets k / E of the tokens
    assert shares[1].tolist() == pytest.approx([1.0, 0.6, 0.4, 0.0])  # every token picks expert 0
    got = summary(load, top_k=2)
    p = [0.5, 0.3, 0.2]
    want_entropy = (1.0 + -sum(x * math.log(x) for x in p) / math.log(4)) / 2
    assert got == pytest.approx({"max_share": 1.0, "entropy": want_entropy, "unused": 1.0})


def test_collapse_warnings_name_the_layer_and_the_expert():
    reference = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]])
    assert collapse_warnings(reference, reference, top_k=2, step=3) == []
    policy = torch.tensor([[5.0, 5.0, 5.0, 5.0], [10.0, 6.0, 4.0, 0.0]])
    silenced, collapsed = collapse_warnings(policy, reference, top_k=2, step=7)
    assert silenced.startswith(
        "eval at step 7: layer 1: expert(s) 3 (50.0%) of the reference's tokens get none"
    )
    assert collapsed.startswith(
        "eval at step 7: layer 1: expert 0 receives 100.0% of the policy's tokens (the reference's largest share: 50.0%)"
    )
    # one expert taking most tokens where the reference's largest did too: no collapse said
    busy = torch.tensor([[10.0, 6.0, 4.0, 0.0]])
    assert collapse_warnings(busy, busy, top_k=2, step=1) == []
