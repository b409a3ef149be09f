"""`dpo-ds`: the subcommands, `dpo-ds train`'s two ways to run, recipes, env."""

from __future__ import annotations

import importlib.metadata

import pytest

from dpo_ds.cli import env as env_cmd
from dpo_ds.cli import launch
from dpo_ds.cli.main import COMMANDS
from dpo_ds.cli.main import main as dpo_ds
from dpo_ds.config.shipped import RECIPES


def test_no_arguments_lists_every_subcommand(capsys):
    assert dpo_ds([]) == 0
    out = capsys.readouterr().out
    for name in ("train", "plan", "prepare", "export", "plot", "recipes", "env"):
        assert f"  {name} " in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_subcommand_has_help_under_its_own_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        dpo_ds([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dpo-ds {name}"), out[:200]


def test_a_mistyped_subcommand_is_named_with_the_closest(capsys):
    assert dpo_ds(["trian"]) == 2
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err


def test_train_outside_a_launcher_runs_deepspeeds_launcher_on_the_module(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--gpus", "8", "--nodes", "2", "--hostfile", "hosts", "--master-port", "29611", "--dry-run",
            "--ds", "zero3", "loss=dpo", "--config", "llama3_8b_full_dpo"]  # fmt: skip
    assert launch.main(argv) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    i = cmd.index("--module")
    assert cmd[i + 1] == "dpo_ds.train"
    assert cmd[i + 2 :] == ["--ds", "zero3", "loss=dpo", "--config", "llama3_8b_full_dpo"]
    launcher = cmd[3:i]
    for flag, value in [
        ("--num_gpus", "8"),
        ("--num_nodes", "2"),
        ("--hostfile", "hosts"),
        ("--master_port", "29611"),
    ]:
        assert launcher[launcher.index(flag) + 1] == value


def test_train_under_torchrun_is_a_rank_and_starts_no_launcher(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}

    def fake_train(argv):
        seen["argv"] = argv
        return 0

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr("dpo_ds.cli.train.main", fake_train)
    monkeypatch.setattr("dpo_ds.cli.train.exit_now", fake_exit)
    monkeypatch.setattr(launch.os, "execv", lambda *a: pytest.fail(f"started a launcher: {a}"))
    with pytest.raises(Exited):
        launch.main(["--ds", "zero2", "lr=1e-6"])
    assert seen["argv"] == ["--ds", "zero2", "lr=1e-6"]


def test_recipes_cp_copies_one_to_edit_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert dpo_ds(["recipes", "cp", "llama3_8b_full_dpo"]) == 0
    assert (tmp_path / "llama3_8b_full_dpo.yaml").read_bytes() == (
        RECIPES / "llama3_8b_full_dpo.yaml"
    ).read_bytes()
    assert dpo_ds(["recipes", "cp", "llama3_8b_full_dpo"]) == 2
    assert "exists" in capsys.readouterr().err
    assert dpo_ds(["recipes", "cp", "lama3_8b_full_dpo", "x.yaml"]) == 2
    assert "did you mean llama3_8b_full_dpo" in capsys.readouterr().err


def test_recipes_cp_ds_copies_a_deepspeed_config(tmp_path, monkeypatch, capsys):
    from dpo_ds.config.shipped import DS_CONFIGS

    monkeypatch.chdir(tmp_path)
    assert dpo_ds(["recipes", "cp", "--ds", "zero3_offload"]) == 0
    assert (tmp_path / "zero3_offload.json").read_bytes() == (DS_CONFIGS / "zero3_offload.json").read_bytes()
    assert "dpo-ds train --ds zero3_offload.json" in capsys.readouterr().out
    assert dpo_ds(["recipes", "show", "--ds", "zero2"]) == 0
    assert '"zero_optimization"' in capsys.readouterr().out
    assert dpo_ds(["recipes", "cp", "--ds", "zero4"]) == 2
    assert "zero" in capsys.readouterr().err


def test_recipes_lists_names_with_what_they_are_and_the_planned_verdict(capsys):
    assert dpo_ds(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "small_gpu_lora_dpo\n" in out and "24 GB" in out
    assert "planned: fits in 24.0 GiB" in out


def test_env_names_versions_and_a_missing_extra(monkeypatch):
    real = importlib.metadata.version

    def version(dist):
        if dist == "matplotlib":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    rows = dict(env_cmd.versions())
    import torch

    assert rows["torch"] == torch.__version__.split("+")[0] or rows["torch"] == torch.__version__
    assert rows["matplotlib"] == "not installed (pip install 'dpo_ds[plot]')"
    text = env_cmd.report()
    assert "## DeepSpeed ops" in text and "cpu_adam" in text and "## accelerator" in text
