"""Sequence parallelism through the launcher (2 CPU ranks, fp32): parallel.sequence_parallel_size=2 trains
the same steps as one rank without it on the same global batch, per-step losses and gradient norms within
1e-5, in every layout, under ZeRO-2 and ZeRO-3, with a reference engine, a precomputed reference and LoRA's
adapters-off reference; a configuration that cannot run is refused on every rank before any engine."""

from __future__ import annotations

import json

import pytest

from tests.launch import metrics, run_many, run_train, small_demo

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


LORA = ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj,gate_proj]", "lr=1e-2"]
# name: (DeepSpeed JSON, extra arguments); the names ending in "one rank" run as a world of one, the rest
# with parallel.sequence_parallel_size=2 on both ranks
RUNS = {
    "one rank": ("zero3.json", []),
    "padded, ZeRO-2, reference engine": ("zero2.json", []),
    "packed, ZeRO-3, precomputed reference, tiled MLP": ("zero3.json", ["data.layout=packed", *SEGMENTED,
                                                         "model.reference_mode=precomputed", *TILED]),
    "shared_prompt, ZeRO-3, reference engine": ("zero3.json", ["data.layout=shared_prompt", *SEGMENTED, *SAMPLES]),
    # every layout with the other reference mode too, under the other ZeRO stage
    "padded, ZeRO-3, precomputed reference": ("zero3.json", ["model.reference_mode=precomputed"]),
    "packed, ZeRO-2, reference engine": ("zero2.json", ["data.layout=packed", *SEGMENTED]),
    "shared_prompt, ZeRO-2, precomputed reference": ("zero2.json", ["data.layout=shared_prompt", *SEGMENTED,
                                                     "model.reference_mode=precomputed"]),
    "LoRA, one rank": ("zero3.json", LORA),
    "LoRA, adapters-off reference, packed, ZeRO-3, checkpointing, fused_linear, tiled MLP": (
        "zero3.json", ["data.layout=packed", *SEGMENTED, *LORA, "model.gradient_checkpointing=true",
                       "model.logprob_impl=fused_linear", *TILED]),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every run of the parity tests behind one launcher run: {name: (run_dir, log)}."""
    root = tmp_path_factory.mktemp("runs")
    args = {}
    for i, (name, (ds, extra)) in enumerate(RUNS.items()):
        sp = [] if name.endswith("one rank") else ["parallel.sequence_parallel_size=2"]
        args[name] = ["--ds", f"ds_configs/{ds}", *COMMON, f"datasets=[{data}]", f"run_dir={root / str(i)}", *sp,
                      *extra]  # fmt: skip
    logs = run_many(root / "logs", args, one_rank=[n for n in RUNS if n.endswith("one rank")], timeout=1200)
    return {name: (root / str(i), logs[name]) for i, name in enumerate(RUNS)}


def _same(a, b, what):
    assert len(a) == len(b) == 4, what
    for x, y in zip(a, b):
        assert abs(x["loss/train"] - y["loss/train"]) <= 1e-5, (what, x["loss/train"], y["loss/train"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5, (what, x["grad_norm"], y["grad_norm"])


def test_sequence_parallel_trains_the_steps_of_one_rank(runs):
    base, base_eval = metrics(runs["one rank"][0])
    assert "world 1 on cpu" in runs["one rank"][1]
    assert base[0]["loss/train"] == pytest.approx(0.6931472, abs=1e-6) and base[-1]["loss/train"] < 0.6931
    layouts = [n for n in RUNS if not n.endswith("one rank") and not n.startswith("LoRA")]
    assert len(layouts) == 6  # padded, packed and shared_prompt, each with a reference engine and precomputed
    for name in layouts:
        run_dir, log = runs[name]
        train, evals = metrics(run_dir)
        assert "world 2 on cpu" in log, name
        assert "sequence parallelism: groups of 2 ranks share each row" in log, name
        assert "memory estimate per rank (dpo_ds.plan):" in log, name  # the planner's line at launch
        assert ("MLPs run in tiles of 8 tokens" in log) == ("tiled MLP" in name), name
        _same(base, train, name)
        assert abs(evals[-1]["loss/eval"] - base_eval[-1]["loss/eval"]) <= 1e-5, name
    # samples during eval: generated with sequence parallelism paused, each rank from its own whole prompts
    samples = runs["shared_prompt, ZeRO-3, reference engine"][0] / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 4 and all(r["policy"] is not None and r["reference"] is not None for r in rows)


def test_lora_checkpointing_and_fused_linear_under_sequence_parallelism(runs):
    """LoRA (adapters-off reference, an adapter in the MLP too) with gradient checkpointing, fused_linear
    log-probs and ALST's tiled MLP: packed rows split over 2 ranks train what one rank trains on padded
    rows without any of it."""
    base, _ = metrics(runs["LoRA, one rank"][0])
    assert base[0]["loss/train"] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at the start
    assert abs(base[-1]["loss/train"] - base[0]["loss/train"]) > 1e-4  # the adapters train
    (name,) = [n for n in RUNS if n.startswith("LoRA") and not n.endswith("one rank")]
    assert "sequence parallelism: groups of 2 ranks share each row" in runs[name][1]
    _same(base, metrics(runs[name][0])[0], name)


def test_what_cannot_run_is_refused_on_every_rank(tmp_path, data):
    proc = run_train("--ds", "ds_configs/zero3.json", *COMMON, f"datasets=[{data}]", f"run_dir={tmp_path / 'r'}",
                     "parallel.sequence_parallel_size=2", "data.layout=shared_prompt",
                     "model.attn_implementation=sdpa", timeout=120)  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "dpo_ds: error:" in line]
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr[-3000:]
    assert all("model.attn_implementation" in line and "sequence_parallel_size=2" in line for line in lines)
    assert "deepspeed.initialize" not in proc.stderr and not (tmp_path / "r" / "LATEST").exists()
