"""Sequence parallelism through the launcher (2 CPU ranks, fp32): parallel.sequence_parallel_size=2 trains
the same steps as one rank without it on the same global batch, per-step losses and gradient norms within
1e-5, in every layout, under ZeRO-2 and ZeRO-3, with a reference engine, a precomputed reference and LoRA's
adapters-off reference; a configuration that cannot run is refused on every rank before any engine."""

from __future__ import annotations

import json

import pytest

from tests.launch import check, metrics, run_train, small_demo

pytestmark = pytest.mark.integration

COMMON = [
    "model.name_or_path=tiny", "batch_size=8", "eval_batch_size=8", "n_eval_examples=16", "max_length=16",
    "max_prompt_length=8", "lr=1e-3", "warmup_steps=0", "n_epochs=1", "do_first_eval=false",
    "eval_every=100000", "checkpoint.save_optimizer=false",
]  # fmt: skip
SEGMENTED = ["data.max_tokens_per_micro_batch=64"]
SAMPLES = ["sample_during_eval=true", "n_eval_model_samples=4", "max_new_tokens=4"]
TILED = ["parallel.tiled_mlp_tokens=8"]  # ALST's TiledMLP: a rank's 32 tokens of a row in 4 tiles


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"), 32, 16)


def _run(data, run_dir, ds, *extra, ranks=2):
    sp = [f"parallel.sequence_parallel_size={ranks}"] if ranks > 1 else []
    proc = check(run_train("--ds", f"ds_configs/{ds}", *COMMON, f"datasets=[{data}]", f"run_dir={run_dir}", *sp,
                           *extra, ranks=ranks))  # fmt: skip
    return proc, metrics(run_dir)


def _same(a, b, what):
    assert len(a) == len(b) == 4, what
    for x, y in zip(a, b):
        assert abs(x["loss/train"] - y["loss/train"]) <= 1e-5, (what, x["loss/train"], y["loss/train"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5, (what, x["grad_norm"], y["grad_norm"])


def test_sequence_parallel_trains_the_steps_of_one_rank(tmp_path, data):
    _, (base, base_eval) = _run(data, tmp_path / "one", "zero3.json", ranks=1)
    assert base[0]["loss/train"] == pytest.approx(0.6931472, abs=1e-6) and base[-1]["loss/train"] < 0.6931
    runs = {
        "padded, ZeRO-2, reference engine": ("zero2.json", []),
        "packed, ZeRO-3, precomputed reference, tiled MLP": ("zero3.json", ["data.layout=packed", *SEGMENTED,
                                                                 "model.reference_mode=precomputed", *TILED]),
        "shared_prompt, ZeRO-3, reference engine": ("zero3.json", ["data.layout=shared_prompt", *SEGMENTED,
                                                                   *SAMPLES]),
    }  # fmt: skip
    for name, (ds, extra) in runs.items():
        proc, (train, evals) = _run(data, tmp_path / name.split(",")[0], ds, *extra)
        log = proc.stdout + proc.stderr
        assert "sequence parallelism: groups of 2 ranks share each row" in log, name
        assert "memory estimate per rank (dpo_ds.plan):" in log, name  # the planner's line at launch
        assert ("MLPs run in tiles of 8 tokens" in log) == ("tiled MLP" in name), name
        _same(base, train, name)
        assert abs(evals[-1]["loss/eval"] - base_eval[-1]["loss/eval"]) <= 1e-5, name
    # samples during eval: generated with sequence parallelism paused, each rank from its own whole prompts
    rows = [
        json.loads(line) for line in (tmp_path / "shared_prompt" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(r["policy"] is not None and r["reference"] is not None for r in rows)


def test_lora_checkpointing_and_fused_linear_under_sequence_parallelism(tmp_path, data):
    """LoRA (adapters-off reference, an adapter in the MLP too) with gradient checkpointing, fused_linear
    log-probs and ALST's tiled MLP: packed rows split over 2 ranks train what one rank trains on padded
    rows without any of it."""
    lora = ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj,gate_proj]", "lr=1e-2"]
    _, (base, _) = _run(data, tmp_path / "one", "zero3.json", *lora, ranks=1)
    assert base[0]["loss/train"] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at the start
    assert abs(base[-1]["loss/train"] - base[0]["loss/train"]) > 1e-4  # the adapters train
    _, (train, _) = _run(data, tmp_path / "two", "zero3.json", "data.layout=packed", *SEGMENTED, *lora,
                         "model.gradient_checkpointing=true", "model.logprob_impl=fused_linear", *TILED)  # fmt: skip
    _same(base, train, "LoRA, adapters-off reference, packed, ZeRO-3, checkpointing, fused_linear, tiled MLP")


def test_what_cannot_run_is_refused_on_every_rank(tmp_path, data):
    proc = run_train("--ds", "ds_configs/zero3.json", *COMMON, f"datasets=[{data}]", f"run_dir={tmp_path / 'r'}",
                     "parallel.sequence_parallel_size=2", "data.layout=shared_prompt",
                     "model.attn_implementation=sdpa", timeout=120)  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "dpo_ds: error:" in line]
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr[-3000:]
    assert all("model.attn_implementation" in line and "sequence_parallel_size=2" in line for line in lines)
    assert "deepspeed.initialize" not in proc.stderr and not (tmp_path / "r" / "LATEST").exists()
