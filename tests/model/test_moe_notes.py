"""An MoE model is recognised, and what dpo_ds does not do for it (a router it does not reproduce, adapters
that miss the experts, a per-expert block under ZeRO-3) is said at launch instead of passing in silence."""

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
    """A router dpo_ds reproduces needs no note; adapters that miss the experts do. all-linear on an MoE is
    spelled out as its linear layers, so the experts take adapters only through model.lora.target_parameters
    (peft 0.21 would otherwise turn the string into expert and router parameters on its own)."""
    lm = _qwen3_moe()
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in lm.parameters())
    assert moe.expert_count(lm.config) == 8 and experts == 2 * 8 * (2 * 16 * 32 + 32 * 16)
    assert moe.launch_notes(lm, lora=False) == []

    pytest.importorskip("peft")
    wrapped = adapters.wrap(lm, load_config(None, ["model.lora.r=4"]).model.lora, 0, False, tmp_path)
    adapted = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert adapted and not any(".experts." in n or ".gate." in n for n in adapted)
    (lora,) = moe.launch_notes(wrapped, lora=True)
    assert lora.startswith(
        f"LoRA: no adapter reaches the experts, {experts / 1e6:.2f}M of the {total / 1e6:.2f}M"
    )
    experts_too = load_config(None, ["model.lora.r=4", "model.lora.target_parameters=[experts]"])
    wrapped = adapters.wrap(_qwen3_moe(), experts_too.model.lora, 0, False, tmp_path)
    assert any(".experts." in n for n, _ in wrapped.named_parameters() if "lora_" in n)
    assert moe.launch_notes(wrapped, lora=True) == []
    assert adapters.expert_parameters(_qwen3_moe()) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_an_moe_whose_router_dpo_ds_does_not_reproduce_is_named():
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, n_group=1, topk_group=1,
    )  # fmt: skip
    (note,) = moe.launch_notes(AutoModelForCausalLM.from_config(config), lora=False)
    assert (
        "DeepseekV3Config: a Mixture-of-Experts model (8 experts) whose router dpo_ds does not reproduce"
        in note
    )


def test_the_planner_counts_the_experts(tmp_path, capsys):
    """The planner counts every expert (model states) instead of refusing an MoE model or planning it as a
    dense one, and its plan says the MoE figures are estimates (tests/plan/test_plan_moe.py checks each term)."""
    from dpo_ds.plan.estimate import Shape
    from dpo_ds.plan.planner import main as plan_main

    lm = _qwen3_moe()
    lm.config.save_pretrained(tmp_path / "moe")
    shape = Shape.from_dir(tmp_path / "moe")
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    assert shape.params == sum(p.numel() for p in lm.parameters()) and shape.experts.count == 8
    assert shape.active_params == shape.params - experts * (8 - 2) // 8  # top-2 of 8 experts a token
    assert plan_main([f"model.name_or_path={tmp_path / 'moe'}", "--gpus", "2", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "MoE (qwen3_moe): these figures are estimates" in out and "no expert parallelism" in out
