"""SFT then DPO through the real `deepspeed` launcher, 2 CPU ranks, on the tiny shipped Llama.

Each run takes ~25 s on 2 cores (most of it is two processes importing deepspeed + transformers).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.launch import ROOT, TINY, check, metrics, run_train, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
COMMON = [*TINY, "warmup_steps=0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def sft_archive(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("sft")
    check(
        run_train(
            "--ds",
            str(ROOT / "ds_configs/zero3.json"),
            "loss=sft",
            "exp_name=sft",
            f"datasets=[{data_dir}]",
            f"run_dir={run_dir}",
            "lr=3e-3",
            "n_epochs=10",
            "do_first_eval=false",
            *COMMON,
        )
    )
    train, _ = metrics(run_dir)
    assert train[-1]["loss/train"] < train[0]["loss/train"] * 0.7, "SFT did not learn"
    return run_dir / "LATEST" / "policy.pt"


def _dpo(run_dir, data_dir, archive, ds="zero3.json", *extra):
    """A DPO run from the SFT archive; later key=value arguments override earlier ones."""
    proc = check(
        run_train(
            "--ds",
            str(ROOT / "ds_configs" / ds),
            "loss=dpo",
            "loss.beta=0.1",
            "exp_name=dpo",
            f"datasets=[{data_dir}]",
            f"run_dir={run_dir}",
            f"model.archive={archive}",
            "lr=1e-3",
            "n_epochs=6",
            "eval_every=160",
            *COMMON,
            *extra,
        )
    )
    return run_dir, proc


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


def test_sft_then_dpo_zero3(tmp_path, data_dir, sft_archive):
    run_dir, _ = _dpo(
        tmp_path / "dpo",
        data_dir,
        sft_archive,
        "zero3.json",
        "sample_during_eval=true",
        "n_eval_model_samples=3",
        "max_new_tokens=4",
    )
    _check_dpo_run(run_dir, sft_archive, first_loss_tol=1e-5)
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 3  # 3 prompts at each of 3 evals (first, mid-run, end)


def test_sft_then_dpo_zero2(tmp_path, data_dir, sft_archive):
    run_dir, _ = _dpo(tmp_path / "dpo", data_dir, sft_archive, "zero2.json")
    _check_dpo_run(run_dir, sft_archive, first_loss_tol=1e-5)


def test_dpo_reference_bf16(tmp_path, data_dir, sft_archive):
    run_dir, proc = _dpo(
        tmp_path / "dpo", data_dir, sft_archive, "zero3.json", "model.reference_dtype=bfloat16"
    )
    # a bf16 reference rounds its log-probs, so the first loss is only near ln 2
    _check_dpo_run(run_dir, sft_archive, first_loss_tol=0.02)
    ds = (run_dir / "ds_config.json").read_text()
    assert '"stage": 3' in ds


@pytest.mark.parametrize(
    "loss_args, first_loss",
    [
        # (cDPO is one loss argument away from DPO: tests/test_losses*.py check it against the original)
        (["loss=ipo", "loss.beta=0.5", "lr=1e-4"], (1 / (2 * 0.5)) ** 2),  # IPO at h = 0: (0 - 1/(2 beta))^2
        (["loss.reference_free=true"], None),
    ],
    ids=["ipo", "reference_free"],
)
def test_loss_variants(tmp_path, data_dir, sft_archive, loss_args, first_loss):
    run_dir = tmp_path / "run"
    _dpo(run_dir, data_dir, sft_archive, "zero3.json", "n_epochs=3", "do_first_eval=false", *loss_args)
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


def test_packed_and_shared_prompt_runs_match_padded(tmp_path, data_dir, sft_archive):
    """Same data, same steps: only the layout differs, so the losses and gradient norms agree step by
    step (<= 1e-5). Packed on dpo_ds_blocks (CPU's default), then packed and shared_prompt rows on
    FlexAttention, the GPU's default (on CPU through torch's eager FlexAttention, attention.flex_on_cpu):
    the BlockMask, transformers' flex path and FlexAttention's backward, trained under ZeRO-3."""
    runs = {}
    flex = ["model.attn_implementation=flex_attention"]
    for name, extra in (
        ("padded", ["gradient_accumulation_steps=2"]),
        ("packed", ["data.layout=packed", "data.max_tokens_per_micro_batch=64"]),
        ("packed_flex", ["data.layout=packed", "data.max_tokens_per_micro_batch=64", *flex]),
        ("shared_prompt_flex", ["data.layout=shared_prompt", "data.max_tokens_per_micro_batch=64", *flex]),
    ):
        run_dir = tmp_path / name
        _, proc = _dpo(
            run_dir, data_dir, sft_archive, "zero3.json", "n_epochs=2", "do_first_eval=false", *extra
        )
        runs[name] = metrics(run_dir)[0]
        assert ("torch's eager FlexAttention" in proc.stdout + proc.stderr) == ("flex" in name)
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
