"""The planner against what the trainer does under offload and with the changes it proposes: the reference
is offloaded by model.reference_offload alone (as engine/ds_config.py builds its JSON), offloaded states
leave both of the GPU's columns and the allocator reserve, the verdict and the change table compare the
same peak, and a change is proposed only where the config can make it and it lowers that peak."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from dpo_ds.config import load_config
from dpo_ds.engine.ds_config import reference_ds_config
from dpo_ds.plan import estimate as est
from dpo_ds.plan import planner
from dpo_ds.plan.planner import FIXES, describe, device_total, first_fix, main, plan, worst_total

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]
DS = {name: json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()) for name in ("zero2", "zero3", "zero3_offload")}  # fmt: skip
BF16 = ["model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]
FIX = {name.split(" (")[0]: (change, keys) for name, change, keys in FIXES}
OFFLOAD, HALF = FIX["ZeRO-3 with CPU offload"], FIX["half the tokens per micro-batch"]


def _cfg(*keys, model="llama3_8b"):
    return load_config(None, [f"model.name_or_path={FIXTURES / model}", *BF16, *keys])


def _run(*keys, ds="zero3_offload", ranks=8, on_cpu=False, model="llama3_8b"):
    return describe(_cfg(*keys, model=model), DS[ds], ranks, on_cpu, FIXTURES / model)


def _plan_cli(capsys, *args) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def _report_numbers(report: str, row: str) -> list[float]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {row}"))
    return [float(x) for x in re.findall(r"\d+\.\d+", line.split("|", 2)[2])]


@pytest.mark.parametrize("keys", [[], ["model.reference_offload=true"]])
def test_the_reference_is_offloaded_as_its_engine_json_says(keys):
    """Under --ds zero3_offload the reference's JSON (engine.ds_config.reference_ds_config) offloads only
    with model.reference_offload=true; the plan counts its weights on the GPU exactly then."""
    cfg = _cfg("batch_size=64", *keys)
    trainer_offloads = "offload_param" in reference_ds_config(DS["zero3_offload"], cfg)["zero_optimization"]
    run = describe(cfg, DS["zero3_offload"], 8, False, FIXTURES / "llama3_8b")
    weights = run.shape.params * 2 / 8  # bf16, ZeRO-3 over 8 ranks
    rest = est.estimate(dataclasses.replace(run, reference_offload=True))["reference"]  # prefetch, logits
    assert run.reference_offload is trainer_offloads is bool(keys)
    assert ("reference" in est.offloaded(run)) is trainer_offloads
    assert abs(est.estimate(run)["reference"] - (rest if trainer_offloads else rest + weights)) < 1
    assert est.offloaded(run).get("reference", 0) == (weights if trainer_offloads else 0)


def test_a_reference_offload_the_launch_refuses_is_a_warning_and_stays_on_the_gpu():
    run = _run("model.reference_offload=true", "model.reference_zero_stage=0", "batch_size=64")
    assert any("model.reference_offload=true needs a ZeRO-3 reference" in n for n in run.notes)
    assert "reference" not in est.offloaded(run)
    assert est.estimate(run)["reference"] > run.shape.params * 2  # a whole copy at stage 0


def test_offloaded_states_leave_both_columns_and_the_reserve():
    run, kept = _run("batch_size=64"), _run("batch_size=64", ds="zero3")
    t, t_kept = est.estimate(run), est.estimate(kept)
    moved = est.offloaded(run)
    assert set(moved) == {"weights", "optimizer", "gradients"}  # the reference: not without its own key
    assert all(t[k] == 0 and moved[k] == t_kept[k] > 0 for k in moved)
    allocated = sum(v for k, v in planner.running_terms(t).items() if k not in est.GPU_OVERHEAD_TERMS)
    assert abs(t[est.ALLOCATOR_RESERVE] - est.ALLOCATOR_RESERVE_FRACTION * allocated) < 1
    assert device_total(run) == t["total"] < device_total(kept) - sum(moved.values())
    saving = planner._saving(t)
    assert all(saving[k] == 0 for k in moved) and saving[planner.SAVE] == t_kept[planner.SAVE]
    # on CPU ranks the offloaded memory is the same process's: nothing moves
    cpu = _run("batch_size=64", on_cpu=True)
    assert est.offloaded(cpu) == {} and est.estimate(cpu)["weights"] > 0


def test_the_reviewers_offload_plan_is_consistent(capsys):
    """`dpo-ds plan --ds zero3_offload --config small_gpu_lora_dpo --gpus 1 --gpu-mem 16` printed a 4.33 GiB
    training total, a saving column with the offloaded weights in it, 'over 16.0 GiB', then a '(fits)'."""
    reviewed = ["--ds", "zero3_offload", "--config", "small_gpu_lora_dpo", "--gpus", "1", "--gpu-mem"]
    out = _plan_cli(capsys, *reviewed, "16")
    total, saving = _report_numbers(out, "**total**")
    assert "| weights |" not in out and "| optimizer |" not in out
    assert "(offloaded to CPU memory, in neither column: weights 15.04, optimizer 0.47, gradients 0.08" in out
    assert saving < total < 16 and "estimate: fits in 16.0 GiB" in out and "| change" not in out
    # a budget between the two totals: over by the larger (this LoRA run's training column; the full run's
    # saving column, its save gathering the base's largest tensor), and no row may claim to fit above it
    for keys, largest in (([], "activations"),
                          (["model.lora.r=0", "model.reference_offload=true"], planner.SAVE)):  # fmt: skip
        total, saving = _report_numbers(_plan_cli(capsys, *reviewed, "16", *keys), "**total**")
        budget = round((total + saving) / 2, 1)
        assert min(total, saving) < budget < max(total, saving)
        out = _plan_cli(capsys, *reviewed, str(budget), *keys)
        verdict = next(line for line in out.splitlines() if line.startswith("estimate: "))
        over = float(re.search(r" by (\d+\.\d+) GiB", verdict).group(1))
        assert (
            verdict.startswith(f"estimate: over {budget:.1f} GiB by ") and f"(largest: {largest})" in verdict
        )
        assert abs(over - (max(total, saving) - budget)) <= 0.011
        fits = [line for line in out.splitlines() if "(fits)" in line]
        assert all(_report_numbers(out, line[2:].split(" |")[0])[1] <= budget for line in fits), fits


def test_the_change_table_uses_the_verdicts_peak():
    run = _run("batch_size=64", "model.logprob_impl=chunked", ds="zero3", model="llama3_70b")
    report, fixes, fitting = plan(run, 60.0)
    assert fixes and fitting is not None and worst_total(fitting) / est.GIB <= 60.0
    table = report.split("| change (alone) |", 1)[1].splitlines()[2:]
    rows = [line for line in table if line.startswith("| ")]
    for (name, alone), row in zip(fixes, rows):
        assert row.startswith(f"| {name} |") and f"| {alone:.2f} |" in row
    cumulative = [_report_numbers(report, name)[1] for name, _ in fixes]
    assert cumulative == sorted(cumulative, reverse=True) and len(set(cumulative)) == len(cumulative)
    assert "(fits)" in rows[-1] and cumulative[-1] <= 60.0 and all("(fits)" not in r for r in rows[:-1])
    # the launch's "first change that fits" counts the same peak
    budget = min(alone for _, alone in fixes) + 0.01
    fits_alone = [n for n, c, _ in FIXES if c(run) != run and worst_total(c(run)) / est.GIB <= budget]
    assert first_fix(run, budget) == fits_alone[0]


def test_a_change_that_does_not_lower_the_peak_is_not_listed(capsys, tmp_path):
    """The will-it-fit page's full 8B on one 24 GB GPU under ZeRO-2: ZeRO-3 on one rank shards nothing (its
    buckets raise the total) and a precomputed reference does nothing once LoRA's adapters-off reference
    holds no copy: neither is in the table or the keys, and --write-ds has no JSON to write."""
    out_json = tmp_path / "fit.json"
    assert main(["--ds", "zero2", "--config", "small_gpu_lora_dpo", "--gpus", "1", "--gpu-mem", "24", "model.lora.r=0",
                 "model.logprob_impl=chunked", "model.gradient_checkpointing=false", "--write-ds", str(out_json)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| ZeRO-3 (--ds zero3) |" not in out and "| a precomputed reference" not in out
    assert (
        "to fit, add: model.lora.r=16 model.logprob_impl=fused_linear model.gradient_checkpointing=true\n"
        in out
    )
    assert "nothing written" in out and not out_json.exists()


def test_half_the_tokens_only_where_the_config_can_make_it():
    one = _run("batch_size=8", "gradient_accumulation_steps=1", ds="zero3")  # one pair a rank
    assert one.micro_examples == 1 and HALF[0](one) == one
    report, _, _ = plan(one, 1.0)
    assert "half the tokens" not in report and "twice yours" not in report
    four = _run("batch_size=64", "gradient_accumulation_steps=2", ds="zero3")
    halved = HALF[0](four)
    assert (halved.micro_examples, halved.tokens_per_micro) == (2, four.tokens_per_micro // 2)
    assert HALF[1](four) == ["gradient_accumulation_steps=4"] and worst_total(halved) < worst_total(four)
    odd = _run("batch_size=24", "gradient_accumulation_steps=1", ds="zero3")  # 3 pairs: not halved exactly
    assert odd.micro_examples == 3 and HALF[0](odd) == odd
    packed = ["data.layout=packed", "max_length=1024", "batch_size=8"]
    budget = _run(*packed, "data.max_tokens_per_micro_batch=8192", ds="zero3")
    assert HALF[1](budget) == ["data.max_tokens_per_micro_batch=4096"]
    assert HALF[0](budget).tokens_per_micro == 4096
    tight = _run(*packed, "data.max_tokens_per_micro_batch=3000", ds="zero3")  # half would not hold a pair
    assert HALF[0](tight) == tight


def test_the_offload_change_moves_the_reference_with_its_key(monkeypatch):
    """Offload as a change: the estimate moves a reference engine too, so its keys say
    model.reference_offload=true (and model.reference_zero_stage=3 where a key pins the reference at 0);
    under a JSON that offloads already, the key alone and no JSON to write."""
    change, keys = OFFLOAD
    zero2 = _run("batch_size=64", ds="zero2")
    assert keys(zero2) == ["--ds", "model.reference_offload=true"]
    moved = est.offloaded(change(zero2))
    assert moved["reference"] == zero2.shape.params * 2 / 8 and est.estimate(change(zero2))["weights"] == 0
    pinned = _run("batch_size=64", "model.reference_zero_stage=0", ds="zero2")
    assert keys(pinned) == ["--ds", "model.reference_offload=true", "model.reference_zero_stage=3"]
    assert change(pinned).reference_stage == 3
    assert keys(_run("batch_size=64", "model.lora.r=8", ds="zero2")) == ["--ds"]  # adapters off: no reference
    offloading = _run("batch_size=64")
    assert keys(offloading) == ["model.reference_offload=true"]
    assert worst_total(change(offloading)) < worst_total(offloading)
    monkeypatch.setattr(planner, "FIXES", [f for f in FIXES if f[1] is change])
    report, _, fitting = plan(offloading, worst_total(change(offloading)) / est.GIB + 0.01)
    assert report.endswith("to fit, add: model.reference_offload=true")
    assert fitting is not None and planner.ds_json_for(DS["zero3_offload"], fitting) == {
        **DS["zero3_offload"], "zero_optimization": {**DS["zero3_offload"]["zero_optimization"], "stage": 3}}  # fmt: skip
    assert "model.reference_offload=true" in FIXES[-1][0]  # the launch's warning names it
