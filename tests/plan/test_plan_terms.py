"""The planner's terms for what the held-out runs exposed, each against an independent count: LoRA's
adapter activations and eager attention's scores against the bytes autograd saves, a LoRA save's peak against
the tensors run/save.py gathers, the data's micro-batches against arithmetic on their lengths, the GPU's and
CPU's process terms."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpo_ds.data.layout import choose
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq
from dpo_ds.model.files import SHIPPED_MODELS
from dpo_ds.plan import estimate as est
from dpo_ds.plan.data import micro_batch_tokens


def _saved_bytes(module, ids, **kw) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(input_ids=ids, use_cache=False, **kw).last_hidden_state.sum()
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in params)


def _decoder(attn: str, layers: int = 3):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(SHIPPED_MODELS["tiny"])
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def test_lora_activations_are_what_peft_adds_to_the_saved_tensors():
    from peft import LoraConfig, get_peft_model

    config, lm = _decoder("sdpa")
    tokens = 128
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    base = _saved_bytes(lm.get_decoder(), ids)
    r, targets = 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = get_peft_model(lm, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    with_lora = _saved_bytes(wrapped.base_model.model.get_decoder(), ids)
    shape = est.Shape.from_config(config.to_dict())
    want = est.lora_activation_bytes(shape, tokens, 4, r, ["all-linear"], checkpointing=False)
    assert want == config.num_hidden_layers * 7 * r * tokens * 4  # the formula's own arithmetic
    # the base's frozen projections save less than a trained one (no input kept for a weight gradient), and
    # each adapter keeps its A(x): the full-training formula plus the adapters' term bounds what peft saves
    planned = est.activation_bytes(shape, tokens, 4, checkpointing=False) + want
    assert 0.7 < with_lora / planned <= 1.0, (with_lora, planned)  # a bound, within 30% at this tiny width
    assert with_lora > base - est.activation_bytes(shape, tokens, 4, False) / 2  # not a different model


def test_eager_attention_keeps_its_scores_and_sdpa_does_not():
    config, eager = _decoder("eager")
    _, sdpa = _decoder("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    tokens = 256
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    extra = _saved_bytes(eager.get_decoder(), ids) - _saved_bytes(sdpa.get_decoder(), ids)
    shape = est.Shape.from_config(config.to_dict())
    want = est.attention_score_bytes(shape, tokens, tokens, 4, "eager", on_cpu=True, checkpointing=False)
    assert want == config.num_hidden_layers * config.num_attention_heads * tokens * tokens * 4
    assert 0.75 < extra / want < 1.25, (extra, want)
    assert est.attention_score_bytes(shape, tokens, tokens, 4, "sdpa", on_cpu=True, checkpointing=False) == 0
    assert est.attention_score_bytes(shape, tokens, tokens, 4, "dpo_ds_blocks", True, False) == 0


def _seq(n_prompt: int, n_response: int) -> TokenizedSeq:
    ids = list(range(1, n_prompt + n_response + 1))
    return TokenizedSeq(ids, [IGNORE] * n_prompt + ids[n_prompt:], n_prompt)


def test_the_data_micro_batches_are_the_collators():
    # three pairs of known lengths; two pairs a micro-batch
    examples = [[_seq(5, 10), _seq(5, 3)], [_seq(7, 20), _seq(7, 2)], [_seq(4, 4), _seq(4, 4)]]
    padded = choose(
        "padded", max_length=64, row_tokens=0, max_tokens_per_micro_batch=0, attn="auto", on_cpu=True
    )
    got = micro_batch_tokens(examples, padded, pairs=2, pad_id=0)
    # the first micro-batch: 4 rows padded to the longest sequence, 7 + 20 = 27 tokens
    assert got.tokens == 4 * 27 and got.longest == 27 and got.micro_batches == 2 and got.examples == 3
    assert got.scored == 10 + 3 + 20 + 2
    packed = choose(
        "packed", max_length=64, row_tokens=0, max_tokens_per_micro_batch=0, attn="auto", on_cpu=True
    )
    got = micro_batch_tokens(examples, packed, pairs=2, pad_id=0)
    assert got.tokens == (15 + 8) + (27 + 9)  # one row of every sequence, no padding (per-segment attention)


def _run(on_cpu: bool, **kw) -> est.Run:
    shape = est.Shape(
        vocab=1000, hidden=64, layers=2, heads=4, kv_heads=4, head_dim=16, intermediate=128, tied=False
    )
    base = dict(shape=shape, ranks=1, stage=3, policy_bytes=4, reference_mode="none", reference_bytes=4,
                reference_stage=3, reference_offload=False, lora_r=0, lora_targets=("all-linear",),
                tokens_per_micro=256, scored_per_micro=256, checkpointing=False, logprob_impl="chunked",
                sequence_parallel=1, on_cpu=on_cpu)  # fmt: skip
    return est.Run(**{**base, **kw})


def test_gpu_process_terms_are_named_and_cpu_ones_measured():
    gpu = est.estimate(_run(False))
    allocated = sum(
        v for k, v in gpu.items() if k not in (*est.GPU_OVERHEAD_TERMS, "total", "save peak (rank 0)")
    )
    assert gpu[est.CUDA_CONTEXT] == est.CUDA_CONTEXT_GIB * est.GIB
    assert abs(gpu[est.ALLOCATOR_RESERVE] - est.ALLOCATOR_RESERVE_FRACTION * allocated) < 1
    cpu = est.estimate(_run(True, process_gib=0.7))
    assert cpu["libraries (CPU)"] == 0.7 * est.GIB and est.CUDA_CONTEXT not in cpu
    assert est.estimate(_run(True))["libraries (CPU)"] == est.CPU_PROCESS_GIB * est.GIB


def test_the_planner_measures_this_platforms_process(monkeypatch):
    from dpo_ds.plan import planner

    monkeypatch.setattr("dpo_ds.dist.memory.proc_status", lambda *keys: {"VmRSS": 3 * 2**29})
    assert planner.measured_process_gib() == 1.5 + est.CPU_RUNTIME_EXTRA_GIB


def test_sequence_parallelism_adds_its_exchange():
    one, two = est.estimate(_run(False)), est.estimate(_run(False, sequence_parallel=2))
    assert one["sequence-parallel all-to-all"] == 0
    assert two["sequence-parallel all-to-all"] == 2 * (2 * 64 + 2 * 64) * 128 * 4  # 128 tokens a rank
    assert two["activations"] < one["activations"]  # each rank holds half of every sequence


SAVE = "save peak (rank 0)"


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, "policy"), (torch.bfloat16, "policy"),
                                                  (torch.bfloat16, "float32")],
                         ids=["fp32", "bf16", "bf16-fp32-adapters"])  # fmt: skip
def test_a_lora_save_peak_is_the_adapter_tensors_the_save_gathers(
    monkeypatch, tmp_path, dtype, adapter_dtype
):
    """A LoRA step dir's weights (run/save.py save_weights) on a tiny Llama that peft wraps as training does
    (adapters.wrap): what the save gathers, recorded, is every adapter tensor peft made, in its dtype, and
    nothing of the base (no policy.pt); the plan's save term is the largest of them gathered (ZeRO-3) and
    copied, and on CPU ranks every copy rank 0 keeps besides: not the base's embedding in fp32, twice."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from dpo_ds.config import load_config
    from dpo_ds.engine import io as engine_io
    from dpo_ds.model import adapters
    from dpo_ds.run import save

    config, lm = _decoder("sdpa", layers=2)
    settings = load_config(None, ["model.lora.r=8", f"model.lora.adapter_dtype={adapter_dtype}"]).model.lora
    wrapped = adapters.wrap(lm.to(dtype), settings, 0, False, SHIPPED_MODELS["tiny"])
    seen: dict[str, int] = {}
    real = engine_io.gathered

    def recording(tensors):
        for name, t in real(tensors):
            seen[name] = t.numel() * t.element_size()
            yield name, t

    monkeypatch.setattr(engine_io, "gathered", recording)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(save, "decided_by_rank0", lambda decide, errors=(): decide())
    monkeypatch.setattr(save, "save_policy", lambda *a, **k: pytest.fail("a LoRA save wrote policy.pt"))
    save.save_weights(SimpleNamespace(module=SimpleNamespace(lm=wrapped)), tmp_path, 0, {})

    made = get_peft_model_state_dict(wrapped)  # peft's own adapter tensors
    assert sorted(seen.values()) == sorted(t.numel() * t.element_size() for t in made.values())
    assert all(".lora_" in name for name in seen)  # nothing of the base
    written = load_file(str(tmp_path / adapters.ADAPTER_WEIGHTS))
    assert sum(t.numel() * t.element_size() for t in written.values()) == sum(seen.values())
    shape = est.Shape.from_config(config.to_dict())
    p, a = (2, 2 if adapter_dtype == "policy" else 4) if dtype == torch.bfloat16 else (4, 4)
    assert {t.element_size() for t in made.values()} == {a}

    def term(**kw) -> float:
        lora = dict(
            shape=shape, policy_bytes=p, lora_r=8, adapter_bytes=4 if adapter_dtype == "float32" else 0
        )
        return est.estimate(_run(kw.pop("on_cpu", False), **{**lora, **kw}))[SAVE]

    largest, every = max(seen.values()), sum(seen.values())
    assert term(stage=3) == 2 * largest  # gathered and rank 0's clone, one tensor at a time
    assert term(stage=2) == largest  # whole already: the clone alone
    cpu = est.CPU_SAVE_EVAL_GIB * est.GIB
    assert term(stage=3, on_cpu=True) == every + largest + cpu  # rank 0's copies until written, one gathered
    assert term(stage=2, on_cpu=True) == every + cpu
    full = term(stage=3, lora_r=0)
    assert full == 2 * shape.largest_tensor * 4 and term(stage=3) < full / 4
