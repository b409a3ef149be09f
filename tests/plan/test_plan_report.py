"""What the plan says besides its figures: what it assumed, warnings, --write-ds's rule, the units."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_ds.plan.planner import main, params_text, plural

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
ROOT = Path(__file__).resolve().parents[2]


def test_units_read_as_a_person_writes_them():
    assert params_text(549_888) == "0.55M" and params_text(135_000_000) == "135M"
    assert params_text(8_030_261_248) == "8.03B"
    assert plural(1, "rank") == "1 rank" and plural(8, "rank") == "8 ranks"


def test_the_header_says_what_it_assumed(capsys):
    assert main(["model.name_or_path=tiny", "--gpus", "1", "--gpu-mem", "24", "batch_size=4", "max_length=64", "max_prompt_length=32",
                 "data.layout=packed", "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert ", 1 rank," in out and "0.0" not in out.splitlines()[0].split(" parameters")[0]
    assumed = next(line for line in out.splitlines() if line.startswith("assumed:"))
    assert "policy bfloat16" in assumed and "reference bfloat16" in assumed
    assert "4 pairs" in assumed and "8 sequences of up to 64 tokens" in assumed and "packed rows" in assumed
    assert "attention " in assumed


def test_a_batch_that_does_not_divide_is_a_warning(capsys):
    assert main(["model.name_or_path=tiny", "--gpus", "4", "--gpu-mem", "24", "batch_size=6"]) == 0
    out = capsys.readouterr().out
    assert "warning: batch_size=6 does not divide into 4 data-parallel ranks" in out


def test_gpus_on_a_cpu_box_says_it_plans_cpu_memory(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["model.name_or_path=tiny", "--gpus", "2"]) == 0
    assert "no GPU here and no --gpu-mem: planning CPU memory (2 ranks a node" in capsys.readouterr().out


def _big(extra):
    return [f"model.name_or_path={FIXTURES / 'llama3_8b'}", "model.policy_dtype=bfloat16", "batch_size=8",
            "--gpus", "8", *extra]  # fmt: skip


def test_write_ds_only_when_the_json_changes(tmp_path, capsys):
    out = tmp_path / "ds.json"
    # ZeRO-3 already, and config keys alone make it fit: nothing to write, the keys to paste printed
    assert main(["--ds", "zero3", *_big(["--gpu-mem", "24", "--write-ds", str(out)])]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and "nothing written" in text
    assert "to fit, add: model.lora.r=16" in text
    # from ZeRO-2 the first set that fits includes ZeRO-3: the JSON is written, and says so
    assert main(["--ds", "zero2", *_big(["--gpu-mem", "12", "--write-ds", str(out)])]) == 0
    text = capsys.readouterr().out
    assert json.loads(out.read_text())["zero_optimization"]["stage"] == 3
    assert f"train with --ds {out}" in text
