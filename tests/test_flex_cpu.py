"""The GPU attention path run for real on CPU: the whole model's forward with
attn_implementation=flex_attention (transformers compiles it with torch.compile: inductor's CPU code) on
packed and shared-prompt rows, a FlexAttention BlockMask built from the layout's rule, gives the padded
layout's log-probs. Its backward torch refuses on CPU, so training there on flex_attention is refused at
launch; the 2-rank ZeRO-3 training run on it is bench/gpu_check.sh's."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.config import ConfigError
from dpo_ds.data.layout import KINDS, ONE_ROW, choose
from dpo_ds.model import SHIPPED_MODELS, LogprobLM, load_config, random_init_state
from tests.test_sequence_parallel import _examples

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
        want, counts = _model(None)(**KINDS["padded"](24).micro_batch(examples, pad).model_inputs())
        flex = _model("flex_attention")
        calls = []
        core = ALL_ATTENTION_FUNCTIONS["flex_attention"]
        ALL_ATTENTION_FUNCTIONS["flex_attention"] = lambda *a, **k: calls.append(1) or core(*a, **k)
        try:
            for layout in ("packed", "shared_prompt"):
                micro = KINDS[layout](24, ONE_ROW, "flex_attention").micro_batch(examples, pad)
                assert micro.input_ids.shape[0] == 1  # one row, every segment in it
                got, got_counts = flex(**micro.model_inputs())
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=layout)
                assert torch.equal(got_counts, counts)
        finally:
            ALL_ATTENTION_FUNCTIONS["flex_attention"] = core
    assert len(calls) == 2 * 2  # every layer of both forwards ran on FlexAttention


def test_flex_attention_training_on_cpu_is_refused_because_torch_refuses_its_backward():
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):  # when torch adds it, lift the refusal
        flex_attention(q, q, q)
    with pytest.raises(ConfigError, match="flex_attention cannot train on CPU"):
        choose(
            "packed",
            max_length=24,
            row_tokens=0,
            max_tokens_per_micro_batch=0,
            attn="flex_attention",
            on_cpu=True,
        )
    assert choose("packed", max_length=24, row_tokens=0, max_tokens_per_micro_batch=0, attn="flex_attention",
                  on_cpu=False).attn == "flex_attention"  # fmt: skip
