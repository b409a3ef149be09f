"""The router's load-balancing loss dpo_ds computes from the router logits (model/router.py) against the
model's own `aux_loss`, and across layouts: the same pairs in padded, packed and shared-prompt
micro-batches give the same loss and the same router gradient."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ds.data.collate import collate_padded
from dpo_ds.data.packing import collate_packed
from dpo_ds.data.shared_prompt import collate_shared
from dpo_ds.data.tokenize import Tokenization
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer
from dpo_ds.model.lm import LogprobLM, sequence_logps
from dpo_ds.model.router import Routing, balance_loss, balance_sums

SMALL = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def moe_config(kind: str):
    """Tiny configs of four MoE architectures transformers builds (8 experts, top-2; random weights)."""
    import transformers as t

    if kind == "qwen3_moe":
        return t.Qwen3MoeConfig(
            **SMALL, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2
        )
    if kind == "mixtral":
        return t.MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if kind == "olmoe":
        return t.OlmoeConfig(**SMALL, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if kind == "gpt_oss":
        return t.GptOssConfig(
            **SMALL, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=1024, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    raise ValueError(kind)


KINDS = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")


def moe_lm(kind: str, attn: str = "eager", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(moe_config(kind), dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():  # routers start at zero in some architectures: give them something to route with
        for name, p in lm.named_parameters():
            if "gate" in name.split(".")[-2:] or name.endswith(("router.weight", "router.bias", "sinks")):
                p.normal_(0, 0.5)
    return lm.eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODELS["tiny"])


def pairs(tok, n: int, seed: int):
    rng = random.Random(seed)
    rules = Tokenization(tok, max_length=28, max_prompt_length=14)
    chars = "abcdefghij0123456789+="

    def text(lo, hi):
        return "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))

    return [rules.tokenize(text(2, 14), [text(1, 12), text(1, 12)], "keep_end") for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_router_loss_equals_the_models_own_aux_loss(tok, kind):
    """Padded rows: dpo_ds's loss from the router logits is the model's own aux_loss on the same rows."""
    lm = moe_lm(kind)
    batch = collate_padded(pairs(tok, 5, seed=1), tok.pad_token_id)
    assert (batch.attention_mask == 0).any()  # padding the loss must leave out
    seqs = sequence_logps(LogprobLM(lm, "naive", router=True), batch)
    own = lm(batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(seqs.aux, own.float(), rtol=0, atol=1e-6)
    routing = Routing.of(lm.config)
    assert seqs.load.shape == (lm.config.num_hidden_layers, routing.experts)
    # every real token is routed to top-k experts in every layer
    assert seqs.load.sum().item() == pytest.approx(
        routing.top_k * lm.config.num_hidden_layers * batch.attention_mask.sum().item()
    )
    plain = sequence_logps(LogprobLM(lm, "naive"), batch)  # the router changes nothing else
    torch.testing.assert_close(seqs.logps, plain.logps, rtol=0, atol=0)
    assert plain.aux is None


def _router_grads(model, batch):
    model.zero_grad()
    seqs = sequence_logps(model, batch)
    seqs.aux.backward()
    return seqs.aux.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
def test_layouts_agree_on_the_router_loss(tok, seed):
    """The same pairs padded, packed (one row and several) and with shared prompts: one loss within 1e-6,
    one gradient. A shared-prompt row counts each prompt token once per response, as the padded rows do."""
    from dpo_ds.model.attention import NAME, attention_inputs, register

    register()
    examples = pairs(tok, 6, seed)
    padded = collate_padded(examples, tok.pad_token_id)
    aux, grads = _router_grads(LogprobLM(moe_lm("qwen3_moe", seed=seed), "naive", router=True), padded)
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("gate.weight"))
    blocks = LogprobLM(moe_lm("qwen3_moe", attn=NAME, seed=seed), "naive", router=True)
    layouts = {
        "packed, one row": collate_packed(examples, tok.pad_token_id, 1 << 30),
        "packed, rows of 40": collate_packed(examples, tok.pad_token_id, 40),
        "shared_prompt, one row": collate_shared(examples, tok.pad_token_id, row_len=1 << 30),
        "shared_prompt, rows of 60": collate_shared(examples, tok.pad_token_id, row_len=60),
    }
    for name, batch in layouts.items():
        assert batch.routing_weights().sum() == padded.attention_mask.sum(), name
        other, other_grads = _router_grads(blocks, batch)
        torch.testing.assert_close(other, aux, rtol=0, atol=1e-6, msg=name)
        for key in grads:
            torch.testing.assert_close(
                other_grads[key], grads[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}"
            )
    # the weighting is what makes them agree: counting a shared prompt once gives another number
    shared = layouts["shared_prompt, one row"]
    once = (shared.seq_ids >= 0).float()
    _, extra = attention_inputs(
        blocks.attn, None, shared.block_ids, shared.branch_ids, shared.spans, torch.float32, "cpu"
    )
    with torch.no_grad():
        out = blocks.lm.get_decoder()(
            input_ids=shared.input_ids,
            position_ids=shared.position_ids,
            output_router_logits=True,
            use_cache=False,
            **extra,
        )
    unweighted = balance_loss(*balance_sums(out.router_logits, once, blocks.routing), blocks.routing)
    assert abs(unweighted.item() - aux.item()) > 1e-4


def test_sums_over_pieces_are_the_whole_rows_sums():
    """Sequence parallelism sums F, P and W over the group before the product: the pieces' sums are the
    whole row's, and the product of summed sums is the whole row's loss (a loss per piece averaged is not)."""
    torch.manual_seed(0)
    routing = Routing(experts=6, top_k=2)
    logits = [torch.randn(2 * 10, 6) for _ in range(3)]  # 3 layers, 2 rows x 10 tokens
    weights = torch.randint(0, 3, (2, 10)).float()
    whole = balance_loss(*balance_sums(logits, weights, routing), routing)
    pieces = [
        balance_sums([x.view(2, 10, 6)[:, lo:hi].reshape(-1, 6) for x in logits], weights[:, lo:hi], routing)
        for lo, hi in ((0, 5), (5, 10))
    ]
    summed = [a + b for a, b in zip(*pieces, strict=True)]
    torch.testing.assert_close(balance_loss(*summed, routing), whole, rtol=0, atol=1e-6)
    each = [balance_loss(*p, routing) for p in pieces]
    assert abs((each[0] + each[1]).item() / 2 - whole.item()) > 1e-4


def test_router_keys_refused_where_the_model_cannot_honour_them():
    """loss.router_aux_coef on a dense model, or on an MoE whose router dpo_ds does not reproduce (DeepSeek-V3
    balances without an auxiliary loss); a negative coefficient; model.freeze_router on a dense model; and
    adapters on a router's weight that freeze_router keeps fixed: each refused naming its key."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

    from dpo_ds.config import ConfigError, load_config
    from dpo_ds.model.router import check_router_keys, router_aux_coef

    dense = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    with pytest.raises(ConfigError, match=r"'loss.router_aux_coef': LlamaConfig \(llama\) is a dense model"):
        router_aux_coef(dense, 0.01)
    assert router_aux_coef(dense, None) is None and router_aux_coef(dense, 0.0) is None
    deepseek = DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2)
    with pytest.raises(
        ConfigError, match=r"DeepseekV3Config \(deepseek_v3\) \(8 experts\) returns no load-balancing"
    ):
        router_aux_coef(deepseek, 0.01)
    assert router_aux_coef(deepseek, None) is None
    qwen = moe_config("qwen3_moe")
    assert router_aux_coef(qwen, None) == 0.001 and router_aux_coef(qwen, 0.0) == 0.0
    assert router_aux_coef(qwen, 0.25) == 0.25
    with pytest.raises(ConfigError, match=r"'loss.router_aux_coef': must be >= 0 or null, got -0.1"):
        load_config(None, ["loss.router_aux_coef=-0.1"])

    frozen = load_config(None, ["model.freeze_router=true"])
    with pytest.raises(ConfigError, match=r"'model.freeze_router': LlamaConfig \(llama\) is a dense model"):
        check_router_keys(frozen, dense)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(qwen)
    check_router_keys(frozen, qwen, meta)  # an MoE whose routers transformers names: fine
    both = load_config(
        None, ["model.freeze_router=true", "model.lora.r=4", "model.lora.target_parameters=[mlp.gate.weight]"]
    )
    with pytest.raises(
        ConfigError, match=r"'model.lora.target_parameters': \['mlp.gate.weight'\] are router weights"
    ):
        check_router_keys(both, qwen, meta)
    with pytest.raises(
        ConfigError, match=r"'model.lora.dropout': must be 0 with model.lora.target_parameters"
    ):
        load_config(
            None, ["model.lora.r=4", "model.lora.dropout=0.1", "model.lora.target_parameters=[experts]"]
        )


def test_lora_parameter_targets_are_checked_against_the_model(tmp_path):
    pytest.importorskip("peft")
    from dpo_ds.config import load_config
    from dpo_ds.model.adapters import AdapterError, check_targets

    moe_config("qwen3_moe").save_pretrained(tmp_path / "moe")
    moe_lora = load_config(None, ["model.lora.r=4", "model.lora.target_parameters=[experts]"]).model.lora
    wrapped = check_targets(moe_lora, tmp_path / "moe")
    assert (
        "model.layers.1.mlp.experts.gate_up_proj" in wrapped and "model.layers.0.self_attn.q_proj" in wrapped
    )
    with pytest.raises(AdapterError, match=r"has no fused expert weights for \[experts\]"):
        check_targets(moe_lora, SHIPPED_MODELS["tiny"])
    typo = load_config(
        None, ["model.lora.r=4", "model.lora.target_parameters=[mlp.experts.gate_proj]"]
    ).model.lora
    with pytest.raises(
        AdapterError,
        match=r"'mlp.experts.gate_proj' matches no parameter .* \(its fused expert weights: mlp.experts.down_proj",
    ):
        check_targets(typo, tmp_path / "moe")


def test_a_quantized_checkpoint_is_refused_by_name(tmp_path):
    """gpt-oss's released weights are MXFP4: refused before any engine, naming the method and the way out."""
    import json

    from dpo_ds.model.files import ModelError, check_not_quantized

    moe_config("gpt_oss").save_pretrained(tmp_path)
    check_not_quantized(tmp_path)  # full precision: fine
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"its weights are quantized \(mxfp4, quantization_config in config.json\)"
    ):
        check_not_quantized(tmp_path)


def test_tiled_mlps_are_refused_for_a_router_loss():
    """ALST's tiled MLP routes each tile apart: one set of router logits a tile, not a layer."""
    from dpo_ds.cli.steps import moe_settings
    from dpo_ds.config import ConfigError, load_config

    tiled = load_config(None, ["parallel.tiled_mlp_tokens=8"])
    with pytest.raises(
        ConfigError, match=r"'parallel.tiled_mlp_tokens': qwen3_moe is a Mixture-of-Experts model"
    ):
        moe_settings(tiled, SHIPPED_MODELS["tiny_moe"], rank=0)
    assert moe_settings(tiled, SHIPPED_MODELS["tiny"], rank=0) is None  # a dense model tiles as before
    assert moe_settings(load_config(None, []), SHIPPED_MODELS["tiny_moe"], rank=0) == 0.001
