"""launch/single_node.sh's arguments, split without launching (DRY_RUN=1 prints the two commands): keys
before any marker reach both runs, `--sft ...` the SFT run only, `--dpo ...` the DPO run only."""

from __future__ import annotations

import os
import shlex
import subprocess

from tests.launch import ROOT

SCRIPT = ROOT / "launch" / "single_node.sh"


def _commands(*args: str) -> tuple[list[str], list[str]]:
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "DRY_RUN": "1", "EXP": "t"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    sft, dpo = [shlex.split(line) for line in proc.stdout.splitlines()]
    return sft, dpo


def _keys(cmd: list[str]) -> list[str]:
    """The key=value arguments train.py gets, in order."""
    return cmd[cmd.index("--ds") + 2 :]


def test_common_sft_only_and_dpo_only_keys():
    sft, dpo = _commands(
        "4", "ds_configs/zero2.json", "model.name_or_path=/models/m", "datasets=[hh]", "x=a b",
        "--sft", "lr=1e-5", "n_epochs=2", "--dpo", "lr=5e-7", "loss.beta=0.05",
    )  # fmt: skip
    assert sft[:8] == [
        "deepspeed", "--num_gpus", "4", "--master_port", "29500", "dpo_ds/train.py", "--ds", "ds_configs/zero2.json",
    ]  # fmt: skip
    assert _keys(sft) == [
        "loss=sft", "exp_name=sft-t", "model.name_or_path=/models/m", "datasets=[hh]", "x=a b",
        "lr=1e-5", "n_epochs=2",
    ]  # fmt: skip
    assert _keys(dpo) == [
        "loss=dpo", "loss.beta=0.1", "exp_name=dpo-t", "model.archive=runs/sft-t/LATEST",
        "model.name_or_path=/models/m", "datasets=[hh]", "x=a b", "lr=5e-7", "loss.beta=0.05",
    ]  # fmt: skip
    # markers in the other order, and common keys only (the old form) reach both runs alike
    sft2, dpo2 = _commands("4", "ds_configs/zero2.json", "--dpo", "lr=5e-7", "--sft", "lr=1e-5")
    assert _keys(sft2)[-1] == "lr=1e-5" and "lr=5e-7" not in sft2
    assert _keys(dpo2)[-1] == "lr=5e-7" and "lr=1e-5" not in dpo2
    sft3, dpo3 = _commands("2", "ds_configs/zero3.json", "datasets=[hh]")
    assert _keys(sft3)[-1] == "datasets=[hh]" and _keys(dpo3)[-1] == "datasets=[hh]"


def test_defaults_and_a_bad_gpu_count():
    sft, _ = _commands()
    assert sft[:8] == [
        "deepspeed", "--num_gpus", "8", "--master_port", "29500", "dpo_ds/train.py", "--ds", "ds_configs/zero3.json",
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SCRIPT), "lr=1e-5"], env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "NUM_GPUS must be a number, got 'lr=1e-5'" in proc.stderr


def test_a_port_and_a_key_in_place_of_the_json():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "2", "ds_configs/zero3.json"],
        env={**os.environ, "DRY_RUN": "1", "EXP": "t", "MASTER_PORT": "29611"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0 and all("--master_port 29611 " in line for line in proc.stdout.splitlines())
    proc = subprocess.run(
        ["bash", str(SCRIPT), "2", "lr=1e-5"],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "the 2nd argument is the DeepSpeed JSON, got 'lr=1e-5'" in proc.stderr
