"""SFT then DPO through the real `deepspeed` launcher, 2 CPU ranks, on the tiny shipped Llama.

Every run of the file (the SFT stage, then each DPO run from its archive) goes behind one launcher run
(tests/multirun.py): a run alone takes ~25 s on 2 cores, ~12 s of it the launcher and two processes
importing deepspeed + transformers, paid once here.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.launch import ROOT, TINY, metrics, run_many, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
COMMON = [*TINY, "warmup_steps=0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


# every DPO run of this file, from the SFT archive, by name: (DeepSpeed JSON, extra key=value arguments)
FLEX = ["model.attn_implementation=flex_attention"]
SEGMENTED = ["data.max_tokens_per_micro_batch=64"]
LAYOUT_RUN = ["n_epochs=2", "do_first_eval=false"]
DPO_RUNS = {
    "zero3": ("zero3.json", ["sample_during_eval=true", "n_eval_model_samples=3", "max_new_tokens=4"]),
    "zero2": ("zero2.json", []),
    "reference_bf16": ("zero3.json", ["model.reference_dtype=bfloat16"]),
    "ipo": ("zero3.json", ["n_epochs=3", "do_first_eval=false", "loss=ipo", "loss.beta=0.5", "lr=1e-4"]),
    "reference_free": ("zero3.json", ["n_epochs=3", "do_first_eval=false", "loss.reference_free=true"]),
    "padded": ("zero3.json", [*LAYOUT_RUN, "gradient_accumulation_steps=2"]),
    "packed": ("zero3.json", [*LAYOUT_RUN, "data.layout=packed", *SEGMENTED]),
    "packed_flex": ("zero3.json", [*LAYOUT_RUN, "data.layout=packed", *SEGMENTED, *FLEX]),
    "shared_prompt_flex": ("zero3.json", [*LAYOUT_RUN, "data.layout=shared_prompt", *SEGMENTED, *FLEX]),
}


@pytest.fixture(scope="module")
def launch(tmp_path_factory, data_dir):
    """The SFT run, then every DPO run from its archive (later key=value arguments override earlier
    ones), behind one launcher run: {name: (run_dir, log)} and the archive."""
    root = tmp_path_factory.mktemp("runs")
    archive = root / "sft" / "LATEST" / "policy.pt"
    runs = {
        "sft": ["--ds", str(ROOT / "ds_configs/zero3.json"), "loss=sft", "exp_name=sft", f"datasets=[{data_dir}]",
                f"run_dir={root / 'sft'}", "lr=3e-3", "n_epochs=10", "do_first_eval=false", *COMMON],
    }  # fmt: skip
    for name, (ds, extra) in DPO_RUNS.items():
        runs[name] = [
            "--ds", str(ROOT / "ds_configs" / ds), "loss=dpo", "loss.beta=0.1", "exp_name=dpo",
            f"datasets=[{data_dir}]", f"run_dir={root / name}", f"model.archive={archive}", "lr=1e-3",
            "n_epochs=6", "eval_every=160", *COMMON, *extra,
        ]  # fmt: skip
    logs = run_many(root / "logs", runs, timeout=1500)
    return {name: (root / name, logs[name]) for name in runs}, archive


@pytest.fixture(scope="module")
def sft_archive(launch):
    runs, archive = launch
    train, _ = metrics(runs["sft"][0])
    assert train[-1]["loss/train"] < train[0]["loss/train"] * 0.7, "SFT did not learn"
    return archive


def _check_dpo_run(run_dir, archive, first_loss_tol):
    train, evals = metrics(run_dir)
    # policy == reference before the first update: every pair has h = 0, the loss is exactly ln 2
    assert abs(evals[0]["loss/eval"] - LN2) < first_loss_tol
    assert abs(train[0]["loss/train"] - LN2) < first_loss_tol
    # the training loss falls over the run
    last = sum(r["loss/train"] for r in train[-3:]) / 3
    assert last < LN2 - 0.05, [r["loss/train"] for r in train]
    assert train[-1]["rewards_train/accuracies"] > 0.5  # on the pairs it trains on
    # the reference never changes: its log-probs on the held-out set are identical at every eval
    for r in evals[1:]:
        assert r["logps_eval/ref_chosen"] == pytest.approx(evals[0]["logps_eval/ref_chosen"], abs=1e-6)
        assert r["logps_eval/ref_rejected"] == pytest.approx(evals[0]["logps_eval/ref_rejected"], abs=1e-6)
    # checkpoints: a step dir per eval, LATEST -> the last one, policy.pt loads into a fresh model
    assert os.readlink(run_dir / "LATEST") == f"step-{train[-1]['counters/examples']}"
    assert len(list(run_dir.glob("step-*"))) == 2
    saved = torch.load(run_dir / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)
    assert set(saved) == {"step_idx", "state", "metrics"}
    assert saved["step_idx"] == train[-1]["counters/examples"]
    from transformers import AutoConfig, AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "dpo_ds/demo/tiny"))
    fresh.load_state_dict(saved["state"], strict=True)
    sft_state = torch.load(archive, map_location="cpu", weights_only=True)["state"]
    changed = [
        k for k in sft_state if not torch.equal(sft_state[k], saved["state"][k].to(sft_state[k].dtype))
    ]
    assert changed, "DPO did not change the policy"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "LATEST" / "ds").is_dir()


def test_sft_then_dpo_zero3(launch, sft_archive):
    run_dir, _ = launch[0]["zero3"]
    _check_dpo_run(run_dir, sft_archive, first_loss_tol=1e-5)
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 3  # 3 prompts at each of 3 evals (first, mid-run, end)


def test_sft_then_dpo_zero2(launch, sft_archive):
    _check_dpo_run(launch[0]["zero2"][0], sft_archive, first_loss_tol=1e-5)


def test_dpo_reference_bf16(launch, sft_archive):
    run_dir, _ = launch[0]["reference_bf16"]
    # a bf16 reference rounds its log-probs, so the first loss is only near ln 2
    _check_dpo_run(run_dir, sft_archive, first_loss_tol=0.02)
    ds = (run_dir / "ds_config.json").read_text()
    assert '"stage": 3' in ds


@pytest.mark.parametrize(
    "name, first_loss",
    [
        # (cDPO is one loss argument away from DPO: tests/training/test_losses*.py check it against the original)
        ("ipo", (1 / (2 * 0.5)) ** 2),  # IPO at h = 0: (0 - 1/(2 beta))^2
        ("reference_free", None),
    ],
    ids=["ipo", "reference_free"],
)
def test_loss_variants(launch, sft_archive, name, first_loss):
    run_dir, _ = launch[0][name]
    train, evals = metrics(run_dir)
    if first_loss is not None:
        assert train[0]["loss/train"] == pytest.approx(first_loss, rel=1e-5)
    else:
        # no reference: h = log pi(y_w) - log pi(y_l) of the SFT model, rewards = beta log pi
        assert train[0]["logps_train/ref_chosen"] == 0.0
        assert train[0]["rewards_train/chosen"] == pytest.approx(
            0.1 * train[0]["logps_train/chosen"], rel=1e-5
        )
    assert sum(r["loss/train"] for r in train[-3:]) / 3 < train[0]["loss/train"]
    assert (run_dir / "LATEST" / "policy.pt").is_file()


def test_packed_and_shared_prompt_runs_match_padded(launch, sft_archive):
    """Same data, same steps: only the layout differs, so the losses and gradient norms agree step by
    step (<= 1e-5). Packed on dpo_ds_blocks (CPU's default), then packed and shared_prompt rows on
    FlexAttention, the GPU's default (on CPU through torch's eager FlexAttention, attention.flex_on_cpu):
    the BlockMask, transformers' flex path and FlexAttention's backward, trained under ZeRO-3."""
    runs = {}
    for name in ("padded", "packed", "packed_flex", "shared_prompt_flex"):
        run_dir, log = launch[0][name]
        runs[name] = metrics(run_dir)[0]
        assert ("torch's eager FlexAttention" in log) == ("flex" in name)
    padded = runs["padded"]
    assert len(padded) == 6
    for layout in ("packed", "packed_flex", "shared_prompt_flex"):
        assert len(runs[layout]) == 6
        for a, b in zip(padded, runs[layout]):
            assert abs(b["loss/train"] - a["loss/train"]) <= 1e-5, (layout, a["loss/train"], b["loss/train"])
            assert abs(b["grad_norm"] - a["grad_norm"]) <= 1e-5 * max(1.0, a["grad_norm"]), (layout, a, b)
            assert b["rewards_train/margins"] == pytest.approx(a["rewards_train/margins"], rel=1e-3, abs=1e-5)
    # the addition rows all have one length, so padded pads nothing; shared_prompt runs each prompt once
    assert runs["packed"][0]["throughput/padding_fraction"] <= padded[0]["throughput/padding_fraction"]
