"""LoRA DPO through the real launcher (2 CPU ranks): LoRA SFT -> LoRA DPO under ZeRO-3 with the
reference the base, adapters off; a bf16 base with fp32 adapters; resume after SIGKILL; ZeRO-2 with
a precomputed reference; bad LoRA input refused on every rank (packed rows with fused_linear and
gradient checkpointing: tests/engine/test_sequence_parallel_launcher.py, split over 2 ranks). Each run is a few seconds of training on the tiny shipped Llama."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from tests.launch import ROOT, TINY, check, metrics, run_many, run_train, small_demo
from tests.run.test_long_runs import _finish, _rank_pids, _start, _wait_for_step

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.integration
LN2 = math.log(2)
LORA = ["model.lora.r=8", "model.lora.alpha=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


def _dpo(data, run_dir, *extra, ds="zero3.json"):
    return [
        "--ds", str(ROOT / "ds_configs" / ds), "loss=dpo", "loss.beta=0.1", *TINY, *LORA, f"datasets=[{data}]",
        f"run_dir={run_dir}", "lr=1e-2", "warmup_steps=0", "n_epochs=2", "eval_every=32", *extra,
    ]  # fmt: skip


RESUMED = ["n_epochs=4", "checkpoint.save_every=2", "checkpoint.keep_last=2", "do_first_eval=false",
           "eval_every=100000", "resume_from=auto"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every run of this file that trains to its end, in order, behind one launcher run: a LoRA SFT run
    under ZeRO-3 (its step dirs hold the adapter in peft's format, not policy.pt), then the DPO runs.
    {name: (run_dir, log)}."""
    root = tmp_path_factory.mktemp("runs")
    common = ["do_first_eval=false", "eval_every=100000"]
    todo = {
        "sft": ["--ds", str(ROOT / "ds_configs/zero3.json"), "loss=sft", *TINY, *LORA, f"datasets=[{data}]",
                f"run_dir={root / 'sft'}", "n_examples=48", "lr=1e-2", "warmup_steps=0", "do_first_eval=false",
                "seed=5"],
        "dpo": _dpo(data, root / "dpo", f"model.archive={root / 'sft' / 'LATEST'}"),
        "bf16 base": _dpo(data, root / "bf16 base", "model.policy_dtype=bfloat16", "model.lora.adapter_dtype=float32",
                          "do_first_eval=false"),
        "straight": _dpo(data, root / "straight", *RESUMED),
        "adapters off": _dpo(data, root / "adapters off", *common, ds="zero2.json"),
        "precomputed": _dpo(data, root / "precomputed", *common, "model.reference_mode=precomputed", ds="zero2.json"),
    }  # fmt: skip
    logs = run_many(root / "logs", todo, timeout=1200)
    return {name: (root / name, logs[name]) for name in todo}


@pytest.fixture(scope="module")
def lora_sft(runs):
    return runs["sft"][0]


def _base(seed: int):
    """The tiny shipped model with the seeded init a run of that seed starts from."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.files import SHIPPED_MODELS, load_config, random_init_state

    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=seed))
    return lm.eval()


def test_lora_sft_then_lora_dpo_zero3_exported_merged(tmp_path, runs, lora_sft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_ds.cli.export import export

    step = lora_sft / "LATEST"
    assert (step / "adapter_config.json").is_file() and (step / "adapter_model.safetensors").is_file()
    assert not (step / "policy.pt").exists()  # nothing gathered the base to save
    assert json.loads((step / "adapter_config.json").read_text())["r"] == 8
    sft_model = PeftModel.from_pretrained(_base(5), str(step))  # peft loads it on the run's own base
    assert any(p.abs().sum() > 0 for n, p in sft_model.named_parameters() if "lora_B" in n)  # it trained

    dpo_dir, out = runs["dpo"]
    assert "the LoRA adapter(s)" in out and "merged in" in out
    assert "LoRA: 0." in out and "adapter parameters in torch.float32 train" in out
    train, evals = metrics(dpo_dir)
    # the adapters start as identity: policy == reference (the merged SFT model), ln 2 exactly
    assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-7) and evals[0]["loss/eval"] == pytest.approx(
        LN2, abs=1e-7
    )
    # the second epoch's pairs, seen once already: the adapters learned them
    assert train[-1]["loss/train"] < LN2 - 0.01 and train[-1]["rewards_train/accuracies"] > 0.5
    # the reference (the base, adapters off) never changes: the same log-probs at every eval
    assert len({e["logps_eval/ref_chosen"] for e in evals}) == 1 and len(evals) >= 3
    assert evals[-1]["logps_eval/chosen"] != evals[0]["logps_eval/chosen"]

    merged = export(dpo_dir / "LATEST", tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    # the same model built independently: the seeded base, the SFT adapter merged, the DPO adapter merged
    want = PeftModel.from_pretrained(_base(5), str(step)).merge_and_unload()
    want = PeftModel.from_pretrained(want, str(dpo_dir / "LATEST")).merge_and_unload().eval()
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want(ids).logits, atol=1e-5)
    # the adapter alone would name the tiny model's directory as its base, not the seeded init with the
    # SFT adapter merged that it trained on: refused, naming what to do instead
    from dpo_ds.cli.export import ExportError

    with pytest.raises(ExportError, match="export the merged model"):
        export(dpo_dir / "LATEST", tmp_path / "adapter", adapter=True)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / ".adapter.tmp").exists()


# fp32 adapters on a bf16 base: the mixed-dtype ZeRO-3 gathers DeepSpeed 0.19.2 broke (its issue 8072);
# bf16 adapters (adapter_dtype=policy) are a bf16 policy's parameters like any other
def test_bf16_base_with_fp32_adapters(runs):
    """The mixed-dtype case DeepSpeed 0.19.2 broke under ZeRO-3 (fp32 adapters on a bf16 base), on 2 ranks."""
    run_dir, out = runs["bf16 base"]
    assert (
        "adapter parameters in torch.float32 train" in out
        and "base parameters in torch.bfloat16 are frozen" in out
    )
    train, _ = metrics(run_dir)
    assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6)  # one bf16 model, adapters off or zero
    assert all(math.isfinite(r["loss/train"]) for r in train) and train[-1]["loss/train"] < LN2


def test_lora_resume_after_sigkill_reproduces_the_run(tmp_path, data, runs):
    from safetensors.torch import load_file

    straight, killed = runs["straight"][0], tmp_path / "killed"
    args = _dpo(data, killed, *RESUMED)
    proc = _start(*args)
    _wait_for_step(killed, 5, proc)
    os.kill(_rank_pids(killed)[1], signal.SIGKILL)
    code, _ = _finish(proc, timeout=60)
    assert code != 0
    check(run_train(*args))
    a, b = metrics(straight)[0], metrics(killed)[0]
    assert [(r["step"], r["loss/train"]) for r in a] == [(r["step"], r["loss/train"]) for r in b]
    wa = load_file(str(straight / "LATEST" / "adapter_model.safetensors"))
    wb = load_file(str(killed / "LATEST" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_zero2_precomputed_reference_equals_adapters_off(runs):
    """ZeRO-2, and a reference precomputed by the policy with its adapters off: the same losses as the
    live adapters-off reference, bit for bit in the first epoch (the base never changes)."""
    (off, _), (pre, log) = runs["adapters off"], runs["precomputed"]
    assert "reference pre-pass done by the policy with its adapters off" in log
    a, b = metrics(off)[0], metrics(pre)[0]
    # the first epoch's 3 steps bit for bit; the second meets its pairs in other batches (fp32 rounding)
    assert [r["loss/train"] for r in a[:3]] == [r["loss/train"] for r in b[:3]] and len(a) == len(b) == 6
    assert all(abs(x["loss/train"] - y["loss/train"]) < 1e-6 for x, y in zip(a, b))


def test_bad_lora_input_is_refused_on_every_rank(tmp_path, data, lora_sft):
    proc = run_train(*_dpo(data, tmp_path / "a", "model.lora.target_modules=[q_proj,qkv]"), timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "dpo_ds: error:" in line]
    assert (
        proc.returncode == 2 and len(lines) == 2 and all("'qkv' matches no module" in line for line in lines)
    )
    proc = run_train(*_dpo(data, tmp_path / "b", f"model.archive={lora_sft / 'LATEST'}"), "model.name_or_path=demo",
                     timeout=120)  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "dpo_ds: error:" in line]
    assert (
        proc.returncode == 2
        and len(lines) == 2
        and all("is a LoRA adapter trained on" in line for line in lines)
    )
