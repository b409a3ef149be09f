"""An MoE model is recognised, and what dpo_ds does not do for it (the router's auxiliary loss, adapters on
fused experts) is said at launch instead of passing in silence."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from dpo_ds.config import load_config
from dpo_ds.model import adapters, moe


def _qwen3_moe():
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_a_dense_model_gets_no_note():
    lm = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    assert moe.expert_count(lm.config) == 0 and moe.launch_notes(lm, lora=True) == []


def test_an_moe_model_is_told_what_is_not_done(tmp_path):
    lm = _qwen3_moe()
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in lm.parameters())
    assert moe.expert_count(lm.config) == 8 and experts == 2 * 8 * (2 * 16 * 32 + 32 * 16)
    (note,) = moe.launch_notes(lm, lora=False)
    assert "Qwen3MoeConfig: a Mixture-of-Experts model (8 experts)" in note
    assert "router_aux_loss_coef=0.001 in its config) is not added" in note

    pytest.importorskip("peft")
    # all-linear: peft reaches the fused experts too (their 3-D parameters); only the router note remains
    wrapped = adapters.wrap(lm, load_config(None, ["model.lora.r=4"]).model.lora, 0, False, tmp_path)
    assert any(".experts." in n for n, _ in wrapped.named_parameters() if "lora_" in n)
    assert moe.launch_notes(wrapped, lora=True) == [note]
    # adapters on attention alone: the experts, most of the parameters, get none, and the launch says so
    attention_only = load_config(None, ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]"])
    wrapped = adapters.wrap(_qwen3_moe(), attention_only.model.lora, 0, False, tmp_path)
    router, lora = moe.launch_notes(wrapped, lora=True)
    assert router == note
    assert lora.startswith(
        f"LoRA: no adapter reaches the experts, {experts / 1e6:.2f}M of the {total / 1e6:.2f}M"
    )


def test_the_planner_refuses_an_moe_model_instead_of_counting_it_dense(tmp_path):
    from dpo_ds.plan.estimate import Shape
    from dpo_ds.plan.planner import main as plan_main

    _qwen3_moe().config.save_pretrained(tmp_path / "moe")
    with pytest.raises(
        ValueError, match=r"moe: a Mixture-of-Experts model \(8 experts\): the planner counts dense"
    ):
        Shape.from_dir(tmp_path / "moe")
    assert plan_main([f"model.name_or_path={tmp_path / 'moe'}", "--gpus", "2", "--gpu-mem", "80"]) == 2
