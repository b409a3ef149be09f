"""The planner on Mixture-of-Experts models, each figure against an independent count: the parameters
transformers builds (on the meta device), the active ones by hand from the config, the adapters peft makes,
the tensors autograd saves, the experts module ZeRO-3 gathers; and what it refuses by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_ds.config import load_config
from dpo_ds.plan import estimate as est
from dpo_ds.plan.planner import describe, main, params_text

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]
ZERO3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
QWEN3_30B = FIXTURES / "qwen3_30b_a3b"
COMMON = dict(vocab_size=64, hidden_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, num_experts_per_tok=2)  # fmt: skip
# each type with what sets it apart: dense layers (mlp_only_layers, decoder_sparse_step), a shared expert,
# attention biases, tied embeddings, gpt-oss's biases and sinks
TINY = {
    "qwen3_moe": dict(intermediate_size=56, moe_intermediate_size=12, num_experts=6, mlp_only_layers=[0],
                      attention_bias=True),
    "qwen2_moe": dict(intermediate_size=56, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                      num_experts=6, decoder_sparse_step=2),
    "mixtral": dict(intermediate_size=12, num_local_experts=6, tie_word_embeddings=True),
    "olmoe": dict(intermediate_size=12, num_experts=6, head_dim=10),
    "gpt_oss": dict(intermediate_size=12, num_local_experts=6, layer_types=["sliding_attention", "full_attention"] * 2),
}  # fmt: skip
KINDS = list(TINY)


def _config(kind: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(kind, **{**COMMON, **TINY[kind], **extra})


def _build(config, meta: bool = True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if not meta:
        attention = "eager" if config.model_type == "gpt_oss" else "sdpa"  # sdpa drops gpt-oss's sinks
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shape(config, tmp_path) -> est.Shape:
    config.save_pretrained(tmp_path)  # config.json as the planner reads it
    return est.Shape.from_dir(tmp_path)


def _experts_module(lm):
    return next(m for name, m in lm.named_modules() if name.endswith("mlp.experts"))


def test_qwen3_30b_a3b_total_and_active_parameters():
    """Qwen states 30.5B parameters, 3.3B activated: the total is what transformers builds, the active count
    is written out by hand from config.json."""
    from transformers import AutoConfig

    shape = est.Shape.from_dir(QWEN3_30B)
    lm = _build(AutoConfig.from_pretrained(QWEN3_30B))
    total = sum(p.numel() for p in lm.parameters())
    assert shape.params == total and round(total / 1e9, 1) == 30.5
    c = json.loads((QWEN3_30B / "config.json").read_text())
    h, d, e, k, i = (
        c["hidden_size"],
        c["head_dim"],
        c["num_experts"],
        c["num_experts_per_tok"],
        c["moe_intermediate_size"],
    )
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = 2 * h * q + 2 * h * kv + 2 * d + 2 * h  # q, o; k, v; q/k norms; the two layer norms
    experts = e * h + k * 3 * i * h  # the router, and gate, up, down of the k experts a token takes
    active = (
        2 * c["vocab_size"] * h + c["num_hidden_layers"] * (attention + experts) + h
    )  # untied; final norm
    assert shape.active_params == active and round(active / 1e9, 1) == 3.4  # Qwen: "3.3B activated"
    # ZeRO-3 gathers a layer's experts module whole; the largest tensor is its gate_up_proj
    assert shape.gathered == sum(p.numel() for p in _experts_module(lm).parameters())
    assert shape.largest_tensor == max(p.numel() for p in lm.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_counts_are_the_models_own(kind, tmp_path):
    """Total, active (all but k of every E experts' share removed), the gathered experts module and the
    largest tensor, against the module shapes transformers builds on the meta device."""
    config = _config(kind)
    shape, lm = _shape(config, tmp_path), _build(config)
    total = sum(p.numel() for p in lm.parameters())
    experts = sum(p.numel() for name, p in lm.named_parameters() if ".experts." in name)
    e, k = shape.experts.count, config.num_experts_per_tok
    assert shape.params == total
    assert shape.active_params == total - experts * (e - k) // e
    assert shape.gathered == sum(p.numel() for p in _experts_module(lm).parameters())
    assert shape.largest_tensor == max(p.numel() for p in lm.parameters())


def _launch_counts(config, targets, parameters, tmp_path):
    """(adapter values, largest adapter tensor) that a launch makes: dpo_ds's own wrap (model/adapters.py),
    peft underneath."""
    from dpo_ds.model import adapters

    settings = load_config(
        None, ["model.lora.r=4", f"model.lora.target_modules=[{','.join(targets)}]"]
    ).model.lora
    settings.target_parameters = list(parameters)  # set as an attribute: the key is read with getattr
    wrapped = adapters.wrap(_build(config, meta=False), settings, 0, False, tmp_path)
    made = [p.numel() for p in wrapped.parameters() if p.requires_grad]
    return sum(made), max(made)


FUSED = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_counts_are_the_launch_s(kind, tmp_path):
    """The adapters a launch makes through peft 0.21, as the planner counts them: all-linear (the model's
    Linear names, as dpo_ds passes it on an MoE), module names peft converts to fused experts for some types
    (rank 2r on gate_up_proj), target_parameters (named, `experts`, the router's)."""
    pytest.importorskip("peft")
    config = _config(kind)
    shape = _shape(config, tmp_path)
    router = "mlp.router.weight" if kind == "gpt_oss" else "mlp.gate.weight"
    cases = [(["all-linear"], []), (["q_proj", "v_proj"], []), (["q_proj", "gate_proj", "up_proj", "down_proj"], []),
             (["q_proj"], FUSED), (["all-linear"], ["experts", router]), (["q_proj"], ["mlp.experts.down_proj"])]  # fmt: skip
    if kind in (
        "mixtral",
        "gpt_oss",
    ):  # no Linear named gate_proj: the launch refuses a name that matches none
        cases.remove((["q_proj", "gate_proj", "up_proj", "down_proj"], []))
    for targets, parameters in cases:
        want = _launch_counts(config, targets, parameters, tmp_path)
        got = (
            est.lora_params(shape, 4, targets, parameters),
            est.lora_largest_tensor(shape, 4, targets, parameters),
        )
        assert got == want, (targets, parameters)


def test_lora_refuses_what_peft_refuses_or_cannot_count(tmp_path):
    pytest.importorskip("peft")
    config = _config("qwen3_moe")
    shape = _shape(config, tmp_path / "moe")
    with pytest.raises(ValueError):  # peft fuses gate_proj with up_proj into gate_up_proj: not one alone
        _launch_counts(config, ["gate_proj"], [], tmp_path)
    with pytest.raises(ValueError, match="gate_proj without"):
        est.lora_params(shape, 4, ["gate_proj"])
    with pytest.raises(ValueError, match=r"target_parameters': 'mlp.experts.gate_up_proj_bias'"):
        est.lora_params(shape, 4, ["q_proj"], ["mlp.experts.gate_up_proj_bias"])
    dense = est.Shape.from_dir(FIXTURES / "llama3_8b")
    with pytest.raises(ValueError, match="a dense model has no fused expert parameters"):
        est.lora_params(dense, 4, ["q_proj"], FUSED)


def _saved_bytes(module, ids) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(input_ids=ids, use_cache=False).last_hidden_state.sum()
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in params)


WIDE = dict(hidden_size=64, head_dim=16, vocab_size=128, num_hidden_layers=3)


@pytest.mark.parametrize("kind", KINDS)
def test_moe_activations_are_what_autograd_saves(kind, tmp_path):
    """Activations (k experts a token, not E) and the router's fp32 probabilities against the bytes of every
    tensor autograd saves in a forward: within 25%, as the dense formula is held."""
    extra = {"moe_intermediate_size": 48} if kind.startswith("qwen") else {"intermediate_size": 48}
    experts = {"num_local_experts": 16} if kind in ("mixtral", "gpt_oss") else {"num_experts": 16}
    layers = (
        {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
        if kind == "gpt_oss"
        else {}
    )
    config = _config(kind, **WIDE, **extra, **experts, **layers)
    shape, lm = _shape(config, tmp_path), _build(config, meta=False)
    tokens = 256
    saved = _saved_bytes(lm.get_decoder(), torch.randint(0, 128, (1, tokens)))
    want = est.activation_bytes(shape, tokens, 4, False) + est.router_bytes(shape, tokens, False)
    want += est.attention_score_bytes(shape, tokens, tokens, 4, config._attn_implementation, True, False)
    assert 0.75 < saved / want < 1.25, (saved, want)
    assert est.router_bytes(shape, tokens, False) == tokens * 16 * 4 * shape.sparse_layers


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_on_fused_parameters_keep_w_plus_ba_every_layer(kind, tmp_path):
    """peft materialises W + B A of a wrapped parameter on every forward and autograd keeps it: what adapters
    on the fused experts add to the saved tensors is, exactly, W + B A of both in every sparse layer (the
    term, less the gradient it counts for the backward) and the experts' inputs a frozen base did not keep,
    k (H + I) a token a layer (inside the activation formula, which counts a full run's)."""
    from peft import LoraConfig, get_peft_model

    layers = {"layer_types": ["full_attention"] * 2} if kind == "gpt_oss" else {}
    config = _config(kind, **{**WIDE, "num_hidden_layers": 2}, **layers)
    shape, tokens = _shape(config, tmp_path), 128
    ids = torch.randint(0, 64, (1, tokens))

    def saved(parameters):
        wrapped = get_peft_model(
            _build(config, meta=False),
            LoraConfig(r=4, target_modules=["q_proj"], target_parameters=parameters or None),
        )
        return _saved_bytes(wrapped.base_model.model.get_decoder(), ids)

    added = saved(FUSED) - saved([])
    fused = [p.numel() for name, p in _build(config).named_parameters() if name.endswith(tuple(FUSED))]
    kept = est.lora_weight_bytes(shape, 4, 4, ["q_proj"], False, FUSED) - max(fused) * 4
    assert kept == sum(fused) * 4  # both fused weights of every sparse layer, fp32
    inputs = (
        shape.sparse_layers * tokens * config.num_experts_per_tok * (shape.hidden + shape.experts.width) * 4
    )
    assert added == kept + inputs
    one_layer = est.lora_weight_bytes(shape, 4, 4, ["q_proj"], True, FUSED)
    assert one_layer == (sum(fused) // shape.sparse_layers + max(fused)) * 4  # checkpointing: one layer's
    assert est.lora_weight_bytes(shape, 4, 4, ["q_proj"], False) == 0  # adapters on Linears alone: none


def _run(*keys, model=QWEN3_30B):
    cfg = load_config(None, [f"model.name_or_path={model}", "model.policy_dtype=bfloat16",
                             "model.reference_dtype=bfloat16", "batch_size=8", *keys])  # fmt: skip
    return cfg, describe(cfg, ZERO3, 8, False, model)


def test_zero3_gathers_one_layer_s_experts_whole():
    """A 604M-value experts module is gathered whole past the 50M prefetch bucket (and the reference engine's),
    and a full run makes its gradient whole before reducing it; a LoRA run's frozen experts have none."""
    from transformers import AutoConfig

    module = sum(
        p.numel() for p in _experts_module(_build(AutoConfig.from_pretrained(QWEN3_30B))).parameters()
    )
    bucket = ZERO3["zero_optimization"]["stage3_prefetch_bucket_size"]
    assert module > 10 * bucket
    _, full = _run()
    terms = est.estimate(full)
    assert terms["buffers"] == 2 * module * 2  # gathered + gradient, bf16
    logits = full.scored_per_micro * full.shape.vocab * 4  # its no-grad fp32 logits
    assert (
        terms["reference"] == full.shape.params * 2 / 8 + module * 2 + logits
    )  # weights / 8, gathered, logits
    _, lora = _run("model.lora.r=16")
    assert est.estimate(lora)["buffers"] == module * 2 + ZERO3["zero_optimization"]["reduce_bucket_size"] * 2


def test_describe_reads_target_parameters_when_the_config_has_them():
    cfg, run = _run("model.lora.r=16", "model.lora.target_modules=[q_proj,v_proj]")
    assert run.lora_parameters == () and est.estimate(run)[est.LORA_WEIGHTS] == 0
    cfg.model.lora.target_parameters = FUSED  # the key's future home; read with getattr until it exists
    run = describe(cfg, ZERO3, 8, False, QWEN3_30B)
    assert run.lora_parameters == tuple(FUSED) and est.estimate(run)[est.LORA_WEIGHTS] > 0


def test_refused_by_name(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         n_routed_experts=4).save_pretrained(tmp_path / "mla")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"mla: .*model_type 'deepseek_v3'\) with multi-head latent attention"
    ):
        est.Shape.from_dir(tmp_path / "mla")
    AutoConfig.for_model("granitemoe", vocab_size=64, hidden_size=32).save_pretrained(tmp_path / "granite")
    with pytest.raises(
        ValueError, match=r"model_type 'granitemoe'\): the planner counts the experts of qwen3_moe"
    ):
        est.Shape.from_dir(tmp_path / "granite")
    assert main([f"model.name_or_path={tmp_path / 'mla'}", "--gpus", "8", "--gpu-mem", "80"]) == 2
    assert "multi-head latent attention" in capsys.readouterr().err


EXPERT_LORA = ["model.lora.r=16", "model.lora.target_parameters=[experts]"]


@pytest.mark.parametrize("lora", [[], ["model.lora.r=16"], EXPERT_LORA], ids=["full", "lora", "lora-experts"])
def test_the_command_labels_moe_figures_as_estimates(lora, capsys):
    """Full DPO and LoRA of Qwen3-30B-A3B on 8 x 80 GB: a verdict, the MoE figures labelled as estimates, no
    expert parallelism said; the W + BA term only where adapters reach the experts (target_parameters:
    all-linear is the model's Linear layers on an MoE)."""
    import dataclasses

    from transformers import AutoConfig

    from dpo_ds.config.schema import LoraSettings

    if lora == EXPERT_LORA and "target_parameters" not in {f.name for f in dataclasses.fields(LoraSettings)}:
        pytest.skip("model.lora.target_parameters is not a config key here")
    lm = _build(AutoConfig.from_pretrained(QWEN3_30B))
    assert main([f"model.name_or_path={QWEN3_30B}", "--gpus", "8", "--gpu-mem", "80", *lora]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dpo_ds plan: {params_text(sum(p.numel() for p in lm.parameters()))} parameters, ")
    assert "MoE (qwen3_moe): these figures are estimates" in out
    assert "dpo_ds has no expert parallelism: every rank holds all 128 experts" in out
    assert ("| LoRA expert weights (W + BA) |" in out) is (lora == EXPERT_LORA)
    assert ("MoE: LoRA adapters reach the fused experts" in out) is (lora == EXPERT_LORA)
    assert "\nestimate: " in out


PIN_CASES = [(kind, None) for kind in KINDS] + [("gpt_oss", "eager"), ("qwen3_moe", "batched_mm")]


@pytest.mark.parametrize("kind, impl", PIN_CASES)
def test_zero3_release_leaves_the_views_autograd_saved_of_every_layer_s_experts(kind, impl, tmp_path):
    """ZeRO-3 frees a module's gathered parameters after its forward by swapping each one's data for an empty
    tensor (partition_parameters' release). Released so after a forward, what the saved tensors still hold of
    the fused expert weights is, exactly, the planner's term: every sparse layer's (grouped_mm transposes an
    (E, out, in) weight, eager slices one expert; gpt-oss's grouped_mm and batched_mm save none), less what
    LoRA wraps (W + B A is saved instead); none under checkpointing or below ZeRO-3."""
    from peft import LoraConfig, get_peft_model

    layers = {"layer_types": ["full_attention"] * 2} if kind == "gpt_oss" else {}
    config = _config(
        kind,
        **{**WIDE, "num_hidden_layers": 2},
        **layers,
        **({"experts_implementation": impl} if impl else {}),
    )
    shape = _shape(config, tmp_path)
    if impl:  # save_pretrained drops the choice: the key as a user writes it
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "experts_implementation": impl}))
        shape = est.Shape.from_dir(tmp_path)

    def pinned(parameters) -> int:
        lm = _build(config, meta=False)
        if parameters is not None:
            lora = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=parameters or None)
            lm = get_peft_model(lm, lora).base_model.model
        fused = {
            p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
            for name, p in lm.named_parameters()
            if ".experts." in name and name.endswith(("gate_up_proj", "down_proj"))
        }  # peft's base_layer too
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            lm.get_decoder()(input_ids=torch.randint(0, 64, (1, 64)), use_cache=False)
        for p in lm.parameters():
            p.data = torch.empty(0)  # ZeRO-3's release
        return sum(fused[s] for s in {t.untyped_storage().data_ptr() for t in saved} & set(fused))

    def term(r, parameters=(), stage=3, checkpointing=False) -> float:
        return est.pinned_experts_bytes(shape, 4, stage, checkpointing, r, ["q_proj"], parameters)

    assert pinned(None) == pinned([]) == term(0) == term(4)
    if kind != "gpt_oss" and impl in (None, "eager"):
        fused = [p.numel() for name, p in _build(config).named_parameters() if name.endswith(tuple(FUSED))]
        assert term(0) == sum(fused) * 4  # both fused weights of every sparse layer, fp32
    assert pinned(FUSED) == term(4, FUSED) == 0
    assert pinned(["mlp.experts.down_proj"]) == term(4, ["mlp.experts.down_proj"])
    assert term(0, stage=2) == term(0, checkpointing=True) == 0
