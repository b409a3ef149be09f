"""Where the reference's log-probs come from and where the reference lives, through the real launcher
(2 CPU ranks): a precomputed reference gives the same training as a live engine; the reference's
ZeRO stage, dtype and offload are its own, whatever the policy's.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.launch import ROOT, TINY, metrics, run_many, run_train, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"), n_train=48, n_test=32)


PRE = "model.reference_mode=precomputed"
SHARED = ["data.layout=shared_prompt", "data.max_tokens_per_micro_batch=64"]
SAMPLES = ["sample_during_eval=true", "n_eval_model_samples=2", "max_new_tokens=3"]
ONE_EPOCH = ["n_epochs=1", "do_first_eval=false"]
CACHED = [PRE, "do_first_eval=false", "n_epochs=1"]  # + data.cache_dir, below
PLACEMENTS = {
    # each direction once: a whole fp32 reference beside a ZeRO-3 policy (exact), a partitioned,
    # offloaded bf16 one beside a ZeRO-2 policy
    "zero3-policy_zero0-ref": ("zero3.json", ["model.reference_zero_stage=0"], "ZeRO stage 0, float32, parameters offloaded to none", 1e-5),
    "zero2-policy_zero3-offload-bf16-ref": ("zero2.json", ["model.reference_zero_stage=3", "model.reference_offload=true", "model.reference_dtype=bfloat16"],
                                            "ZeRO stage 3, bfloat16, parameters offloaded to cpu", 0.02),
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Every run of this file that trains, in order, behind one launcher run: {name: (run_dir, log)}.
    Later key=value arguments override earlier ones."""
    root = tmp_path_factory.mktemp("runs")
    cache = f"data.cache_dir={root / 'cache'}"
    todo = {
        "engine padded": [], "precomputed padded": [PRE, *SAMPLES],
        "engine shared_prompt": SHARED, "precomputed shared_prompt": [PRE, *SAMPLES, *SHARED],
        "first": [PRE, "do_first_eval=false"],
        "resumed": [PRE, "do_first_eval=false", f"resume_from={root / 'first'}/step-48"],
        "cache a": [*CACHED, cache], "cache b": [*CACHED, cache],
        "cache c": [*CACHED, cache, "max_length=10", "max_prompt_length=6"],  # prompts cut: other ids, other file
        **{name: [f"--ds={ROOT / 'ds_configs' / ds}", *ONE_EPOCH, *extra] for name, (ds, extra, _, _) in PLACEMENTS.items()},
        "weights only": [*ONE_EPOCH, "checkpoint.save_optimizer=false"],
        "chunked": ["model.logprob_impl=chunked", *ONE_EPOCH],
        "fused_linear": ["model.logprob_impl=fused_linear", *ONE_EPOCH],
    }  # fmt: skip
    args = {
        name: ["--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", "loss.beta=0.1", f"datasets=[{data_dir}]",
               f"run_dir={root / name}", "lr=3e-3", "warmup_steps=0", "n_epochs=2", "eval_every=48", *TINY, *extra]
        for name, extra in todo.items()
    }  # fmt: skip
    logs = run_many(root / "logs", args, timeout=1500)
    return {name: (root / name, logs[name]) for name in todo} | {"cache": (root / "cache", "")}


# packed: tests/engine/test_sequence_parallel_launcher.py trains it on a precomputed reference (with SP 2) and
# compares it with one rank's padded run on a reference engine
@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_precomputed_reference_trains_exactly_like_the_engine(runs, layout):
    (engine_dir, _), (pre_dir, log) = runs[f"engine {layout}"], runs[f"precomputed {layout}"]
    assert "reference pre-pass done; its engine is destroyed" in log
    assert (pre_dir / "reference_logps.pt").is_file()
    (a_train, a_eval), (b_train, b_eval) = metrics(engine_dir), metrics(pre_dir)
    assert len(a_train) == len(b_train) == 6
    assert a_train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6)
    # the pre-pass runs training's own micro-batches: the first epoch (steps 1-3 of 48 examples in
    # batches of 16) and every eval are bit-identical; a later epoch meets its examples in other
    # batches, and the live engine's sums round differently there (within fp32 rounding)
    for k, (a, b) in enumerate(zip(a_train, b_train)):
        if k < 3:
            assert a["loss/train"] == b["loss/train"], (k, a["loss/train"], b["loss/train"])
            assert a["logps_train/ref_chosen"] == b["logps_train/ref_chosen"]
        assert abs(a["loss/train"] - b["loss/train"]) <= 1e-6, (a["loss/train"], b["loss/train"])
        assert abs(a["logps_train/ref_chosen"] - b["logps_train/ref_chosen"]) <= 1e-4
    for a, b in zip(a_eval, b_eval):
        assert a["loss/eval"] == b["loss/eval"] and a["logps_eval/ref_chosen"] == b["logps_eval/ref_chosen"]
    # the precomputed run has no reference model to sample from: policy samples only, said so
    samples = [json.loads(line) for line in (pre_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reference"] is None and s["policy"] is not None for s in samples)
    assert "samples during eval come from the policy only" in log


def test_precomputed_reference_resumes_from_its_cache(runs):
    (first, _), (resumed, log) = runs["first"], runs["resumed"]
    assert f"reference log-probs from {first / 'reference_logps.pt'}" in log
    assert "reference pre-pass done" not in log  # no reference model was built at all
    a, b = metrics(first)[0], metrics(resumed)[0]
    assert [r["loss/train"] for r in b] == pytest.approx([r["loss/train"] for r in a[3:]], abs=1e-7)


def test_precomputed_cache_in_cache_dir_is_shared_and_keyed(runs):
    found = "(fingerprint matches); no reference model is built"
    assert found in runs["cache b"][1] and found not in runs["cache c"][1]
    assert len(list(runs["cache"][0].glob("reference_logps-*.pt"))) == 2


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_reference_placement_is_independent(runs, name):
    ds, _, placement, tol = PLACEMENTS[name]
    run_dir, log = runs[name]
    assert f"reference engine: {placement}" in log
    train, _ = metrics(run_dir)
    # policy == reference at step 0: ln 2, up to the bf16 reference's rounding
    assert abs(train[0]["loss/train"] - LN2) < tol
    assert len(train) == 3 and train[-1]["loss/train"] != train[0]["loss/train"]  # the policy trained
    policy = json.loads((run_dir / "ds_config.json").read_text())
    assert policy["zero_optimization"]["stage"] == int(ds[4])  # the policy's own JSON is untouched


def test_weights_only_checkpoints(tmp_path, data_dir, runs):
    run_dir, _ = runs["weights only"]
    latest = run_dir / "LATEST"
    assert (latest / "policy.pt").is_file() and not (latest / "ds").exists()
    proc = run_train(
        "--ds", str(ROOT / "ds_configs/zero3.json"), f"datasets=[{data_dir}]", f"run_dir={tmp_path / 'again'}",
        f"resume_from={latest}", *TINY,
    )  # fmt: skip
    assert (
        proc.returncode == 2
        and "has no ds (saved with checkpoint.save_optimizer=false" in proc.stderr
        and "save_optimizer=false" in proc.stderr
    )


def test_fused_linear_trains_like_chunked_under_zero3(runs):
    """The fused head runs inside the lm_head's module call, so ZeRO-3 gathers its weight in forward
    and backward as for a plain Linear: the same losses as the logits path, policy and reference."""
    train = {impl: metrics(runs[impl][0])[0] for impl in ("chunked", "fused_linear")}
    assert len(train["chunked"]) == len(train["fused_linear"]) == 3
    assert train["fused_linear"][0]["loss/train"] == pytest.approx(LN2, abs=1e-6)
    for a, b in zip(train["chunked"], train["fused_linear"]):
        assert b["loss/train"] == pytest.approx(a["loss/train"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
