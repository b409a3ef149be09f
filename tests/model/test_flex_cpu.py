"""The GPU attention path run for real on CPU. The whole model's forward with
attn_implementation=flex_attention (transformers compiles it with torch.compile: inductor's CPU code) on
packed and shared-prompt rows, a FlexAttention BlockMask built from the layout's rule, gives the padded
layout's log-probs; and training on it (torch has no compiled FlexAttention backward on CPU: there
dpo_ds runs transformers' flex path through torch's eager FlexAttention, attention.flex_on_cpu) gives
the padded layout's log-probs and gradients. The 2-rank ZeRO-3 training run on it is in
tests/cli/test_integration.py."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.config import LAYOUTS
from dpo_ds.data.layout import ONE_ROW, choose
from dpo_ds.model.files import SHIPPED_MODELS, load_config, random_init_state
from dpo_ds.model.lm import LogprobLM
from tests.engine.test_sequence_parallel import _examples

pytest.importorskip("torch.nn.attention.flex_attention")


def _model(attn):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32, attn_implementation=attn)  # fmt: skip
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    return LogprobLM(lm.eval(), "naive")


def test_flex_attention_forward_compiled_on_cpu_equals_padded():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    examples, pad = _examples(7, seed=3)
    with torch.no_grad():
        want, counts = _model(None)(**LAYOUTS.get("padded")(24).micro_batch(examples, pad).model_inputs())
        flex = _model("flex_attention")
        calls = []
        core = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        ALL_ATTENTION_FUNCTIONS["flex_attention"] = lambda *a, **k: calls.append(1) or core(*a, **k)
        try:
            for layout in ("packed", "shared_prompt"):
                micro = LAYOUTS.get(layout)(24, ONE_ROW, "flex_attention").micro_batch(examples, pad)
                assert micro.input_ids.shape[0] == 1  # one row, every segment in it
                got, got_counts = flex(**micro.model_inputs())
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=layout)
                assert torch.equal(got_counts, counts)
        finally:
            ALL_ATTENTION_FUNCTIONS["flex_attention"] = core
    assert len(calls) == 2 * 2  # every layer of both forwards ran on FlexAttention


def test_flex_attention_trains_on_cpu_like_padded():
    """Forward and backward through transformers' flex_attention_forward and torch's FlexAttention (its
    eager forward and backward, the layout's BlockMask): per-sequence log-probs and every gradient equal
    the padded layout's (sdpa), on packed and shared-prompt rows."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dpo_ds.model.attention import flex_on_cpu

    flex_on_cpu()
    examples, pad = _examples(7, seed=5)
    padded = _model(None).train()
    want, counts = padded(**LAYOUTS.get("padded")(24).micro_batch(examples, pad).model_inputs())
    (want * torch.linspace(1, 2, want.numel())).sum().backward()  # every sequence its own weight
    grads = {n: p.grad for n, p in padded.named_parameters()}
    calls = []
    core = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    ALL_ATTENTION_FUNCTIONS["flex_attention"] = lambda *a, **k: calls.append(1) or core(*a, **k)
    try:
        for layout in ("packed", "shared_prompt"):
            flex = _model("flex_attention").train()
            micro = LAYOUTS.get(layout)(24, ONE_ROW, "flex_attention").micro_batch(examples, pad)
            got, got_counts = flex(**micro.model_inputs())
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=layout)
            assert torch.equal(got_counts, counts)
            (got * torch.linspace(1, 2, got.numel())).sum().backward()
            for n, p in flex.named_parameters():
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=f"{layout} {n}")
    finally:
        ALL_ATTENTION_FUNCTIONS["flex_attention"] = core
    assert len(calls) == 2 * 2  # every layer of both forwards ran on FlexAttention


def test_torch_still_refuses_flex_attention_backward_on_cpu():
    """attention.flex_on_cpu exists because torch refuses this; when torch adds it, the shim goes."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q)
    assert choose("packed", max_length=24, row_tokens=0, max_tokens_per_micro_batch=0, attn="flex_attention",
                  on_cpu=True).attn == "flex_attention"  # fmt: skip
