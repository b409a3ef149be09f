"""The memory planner: every formula of dpo_ds/plan/estimate.py against an independent count (the models
transformers builds, peft's adapters, the tensors autograd saves), the published parameter counts of three
real configs, and dpo_ds.plan's report, fixes and DeepSpeed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_ds.config import load_config
from dpo_ds.model.files import SHIPPED_MODELS
from dpo_ds.plan import estimate as est
from dpo_ds.plan.planner import FIXES, describe, device_total, main, one_line, plan

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]
ZERO3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
ZERO2 = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())


@pytest.mark.parametrize(
    "name, published",
    [("llama3_8b", 8_030_261_248), ("llama3_70b", 70_553_706_496), ("qwen2_5_7b", 7_615_616_512)],
)
def test_parameter_counts_of_real_configs(name, published):
    assert est.Shape.from_dir(FIXTURES / name).params == published


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_the_models_own(tmp_path, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((SHIPPED_MODELS["tiny"] / "config.json").read_text())
    config.update(num_key_value_heads=2, tie_word_embeddings=tied)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert est.Shape.from_dir(tmp_path).params == sum(p.numel() for p in lm.parameters())


def test_lora_count_is_peft_s():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(SHIPPED_MODELS["tiny"]))
    shape = est.Shape.from_dir(SHIPPED_MODELS["tiny"])
    for targets in (["q_proj", "v_proj"], ["all-linear"]):
        peft_targets = "all-linear" if targets == ["all-linear"] else targets
        wrapped = get_peft_model(lm, LoraConfig(r=4, target_modules=peft_targets))
        want = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert est.lora_params(shape, 4, targets) == want, targets
        lm = wrapped.unload()


def test_model_states_bytes_per_parameter():
    n = 1000
    full = est.model_states(n, n, 0, 4, 8)  # no ZeRO: 4 + 4 + 12 = 20 bytes a parameter, nothing sharded
    assert (full["weights"], full["gradients"], full["optimizer"]) == (4000, 4000, 12000)
    z1 = est.model_states(n, n, 1, 2, 8)  # optimizer sharded
    assert (z1["weights"], z1["gradients"], z1["optimizer"]) == (2000, 2000, 1500)
    z2 = est.model_states(n, n, 2, 2, 8)  # + gradients
    assert (z2["weights"], z2["gradients"]) == (2000, 250)
    z3 = est.model_states(n, n, 3, 2, 8)  # + weights: bf16 mixed precision is 16 bytes / R
    assert sum(z3.values()) == 16 * n / 8
    lora = est.model_states(n, 10, 3, 2, 8)  # frozen base: only the adapters' gradients and states
    assert (lora["gradients"], lora["optimizer"]) == (10 * 2 / 8, 10 * 12 / 8)


def test_reference_and_buffers_follow_their_placement():
    args = dict(
        n=1000, p=2, ranks=4, zero={"stage3_prefetch_bucket_size": 100}, scored=3, vocab=10, impl="chunked"
    )
    assert (
        est.reference_bytes("engine", stage=3, offload=False, **args) == 1000 * 2 / 4 + 100 * 2 + 3 * 10 * 4
    )
    assert est.reference_bytes("engine", stage=0, offload=False, **args) == 1000 * 2 + 3 * 10 * 4
    assert est.reference_bytes("engine", stage=3, offload=True, **args) == 100 * 2 + 3 * 10 * 4
    for mode in ("precomputed", "adapters_off", "none"):
        assert est.reference_bytes(mode, stage=3, offload=False, **args) == 0
    assert est.buffer_bytes(ZERO3["zero_optimization"], 3, 10**9, 2) == (5e7 + 5e7) * 2  # the JSON's sizes
    assert est.buffer_bytes(ZERO3["zero_optimization"], 3, 10**6, 2) == 2 * 10**6 * 2  # at most the model
    assert est.buffer_bytes(ZERO2["zero_optimization"], 2, 10**6, 2) == 2e8 * 2  # allocated whole on a GPU
    assert est.buffer_bytes(ZERO2["zero_optimization"], 2, 10**6, 2, on_cpu=True) == 0


def test_logits_bytes():
    assert est.logits_bytes("naive", 100, 1000, 4) == 100 * 1000 * 11
    assert est.logits_bytes("chunked", 100, 1000, 2) == 100 * 1000 * 5
    assert est.logits_bytes("triton", 100, 1000, 2) == 100 * 1000 * 3
    assert est.logits_bytes("fused_linear", 10**6, 1000, 2) == est.FUSED_CHUNK_ROWS * 1000 * 4  # no logits


def test_activations_are_what_autograd_saves():
    """The per-token-per-layer formula against the bytes of every tensor autograd saves in a forward of
    a Llama (the tiny shipped shape, widened), counted with saved_tensors_hooks: within 25%."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(SHIPPED_MODELS["tiny"])
    config.num_hidden_layers = 4
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    tokens = 256
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    decoder = lm.get_decoder()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=ids, use_cache=False).last_hidden_state.sum()
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved = sum(b for ptr, b in seen.items() if ptr not in params)
    shape = est.Shape.from_config(config.to_dict())
    want = est.activation_bytes(shape, tokens, 4, checkpointing=False)
    assert 0.75 < saved / want < 1.25, (saved, want)
    ckpt = est.activation_bytes(shape, tokens, 4, checkpointing=True)
    assert ckpt < want / 1.5  # a layer's input kept, one layer recomputed


def _run(*keys, ds=ZERO3, ranks=8, model="llama3_8b", on_cpu=False, **kw):
    cfg = load_config(None, [f"model.name_or_path={FIXTURES / model}", *keys])
    return describe(cfg, ds, ranks, on_cpu, FIXTURES / model, **kw)


def test_describe_reads_the_layout_the_batch_and_sequence_parallelism():
    padded = _run("max_length=1024", "batch_size=16", "gradient_accumulation_steps=2")
    assert padded.tokens_per_micro == 2 * 1 * 1024  # 16 pairs / (8 ranks x 2) = 1 pair: chosen + rejected
    packed = _run(
        "max_length=1024", "batch_size=16", "data.layout=packed", "data.max_tokens_per_micro_batch=3000"
    )
    assert packed.tokens_per_micro == 3000
    shared = _run("max_length=1024", "max_prompt_length=512", "batch_size=8", "data.layout=shared_prompt")
    assert shared.tokens_per_micro == 1024 + 512  # the prompt once
    sp = _run("max_length=1024", "batch_size=16", "parallel.sequence_parallel_size=4")
    assert (
        sp.tokens_per_micro == 8 * 2 * 1024 and sp.sequence_parallel == 4
    )  # 2 DP ranks: 8 pairs a micro-batch
    assert est.estimate(sp)["activations"] == est.activation_bytes(sp.shape, 8 * 2 * 1024 // 4, 4, False)
    short = _run("max_length=1024", "batch_size=16", sequence_tokens=300)
    assert short.tokens_per_micro == 2 * 2 * 300  # 2 pairs a rank, each sequence at most 300 tokens
    assert _run("loss.reference_free=true").reference_mode == "none"
    assert _run("model.lora.r=8").reference_mode == "adapters_off"


def test_the_three_readme_shapes():
    """The README's "Will it fit?" rows: the 8B full DPO fits 8 x 80 GB; the 70B does not without help and
    fits with LoRA; Qwen2.5-7B on pairs of 2 x 32k tokens needs sequence parallelism on 40 GB cards."""
    bf16 = ["model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]
    full8 = _run(
        *bf16, "max_length=2048", "max_prompt_length=1024", "batch_size=64", "gradient_accumulation_steps=8"
    )
    assert device_total(full8) / est.GIB < 80
    full70 = _run(
        *bf16, "max_length=2048", "batch_size=64", "gradient_accumulation_steps=8", model="llama3_70b"
    )
    report, fixes, fitting = plan(full70, 80.0)
    assert "over 80.0 GiB" in report and fixes[0][0].startswith("LoRA") and fitting is not None
    lora70 = _run(*bf16, "max_length=2048", "batch_size=64", "gradient_accumulation_steps=8", "model.lora.r=16",
                  "model.lora.target_modules=[all-linear]", "model.gradient_checkpointing=true",
                  "model.logprob_impl=fused_linear", model="llama3_70b")  # fmt: skip
    assert device_total(lora70) / est.GIB < 80
    long = ["max_length=32768", "max_prompt_length=8192", "batch_size=8", "model.gradient_checkpointing=true",
            "model.logprob_impl=fused_linear", "data.layout=packed", "data.max_tokens_per_micro_batch=65536"]  # fmt: skip
    alone = device_total(_run(*bf16, *long, model="qwen2_5_7b")) / est.GIB
    split = (
        device_total(_run(*bf16, *long, "parallel.sequence_parallel_size=4", model="qwen2_5_7b")) / est.GIB
    )
    assert split < 40 < alone  # 8 x 40 GB (A100-40GB): only with the pair split over 4 ranks


def test_fixes_follow_the_readme_order_and_each_lowers_the_total():
    run = _run("model.policy_dtype=bfloat16", "max_length=4096", "batch_size=8", model="llama3_70b")
    names = [name.split(" (")[0] for name, _, _ in FIXES]
    assert names[:3] == ["LoRA r=16 on every linear layer", "ZeRO-3", "a precomputed reference"]
    assert names[-1].startswith("ZeRO-3 with CPU offload")
    _, fixes, _ = plan(run, 10.0)
    before = device_total(run) / est.GIB
    assert fixes and all(total <= before + 1e-9 for _, total in fixes)
    assert "memory estimate per rank (dpo_ds.plan):" in one_line(run, 80.0)


def test_the_command_prints_the_table_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "ds.json"
    rc = main(["--ds", str(ROOT / "ds_configs" / "zero2.json"), f"model.name_or_path={FIXTURES / 'llama3_70b'}",
               "model.policy_dtype=bfloat16", "batch_size=8", "--gpus", "8", "--gpu-mem", "80", "--write-ds", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "| **total** |" in text and "over 80.0 GiB" in text and "| change (alone) |" in text
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 3  # ZeRO-3 is one of the changes
    rc = main([f"model.name_or_path={FIXTURES / 'llama3_8b'}", "model.policy_dtype=bfloat16", "--gpus", "8",
               "--gpu-mem", "80"])  # fmt: skip
    assert rc == 0 and "fits in 80.0 GiB" in capsys.readouterr().out
    assert main(["model.name_or_path=/no/such/model"]) == 2
