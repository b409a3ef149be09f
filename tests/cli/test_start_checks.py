"""Checks that start_distributed makes on every rank before any model is built."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.cli import steps
from dpo_ds.config import ConfigError, load_config


def test_triton_log_probs_where_triton_cannot_run_are_refused_at_start(monkeypatch):
    monkeypatch.setattr(steps.comm, "init_distributed", lambda *a: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(steps, "triton_unavailable_reason", lambda on_cpu=None: "triton is not installed")
    cfg = load_config(None, ["model.logprob_impl=triton"])
    with pytest.raises(
        ConfigError, match=r"model.logprob_impl': triton cannot run here: triton is not installed"
    ):
        steps.start_distributed(cfg, "/nonexistent.json", objective=None)
    # where triton can run the check passes, and the next step (the DeepSpeed JSON) is what fails here
    monkeypatch.setattr(steps, "triton_unavailable_reason", lambda on_cpu=None: None)
    with pytest.raises(ConfigError, match="nonexistent.json"):
        steps.start_distributed(cfg, "/nonexistent.json", objective=None)


def test_triton_on_cpu_ranks_needs_the_interpreter_whatever_gpu_the_machine_has(monkeypatch):
    from dpo_ds.model import logprobs

    monkeypatch.setattr(logprobs.torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "the ranks run on CPU and TRITON_INTERPRET is not set" in logprobs.triton_unavailable_reason(
        on_cpu=True
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert logprobs.triton_unavailable_reason(on_cpu=True) is None


def test_wandb_enabled_without_the_package_is_refused_at_start(monkeypatch):
    import importlib.util

    monkeypatch.setattr(steps.comm, "init_distributed", lambda *a: (0, 1, torch.device("cpu")))
    cfg = load_config(None, ["wandb.enabled=true"])  # the config itself is fine: plan and prepare take it
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"wandb.enabled': true needs the wandb package: pip install 'dpo_ds\[wandb\]'"
    ):
        steps.start_distributed(cfg, "/nonexistent.json", objective=None)
    disabled = load_config(None, ["wandb.enabled=true", "wandb.mode=disabled"])  # needs no package
    with pytest.raises(ConfigError, match="nonexistent.json"):
        steps.start_distributed(disabled, "/nonexistent.json", objective=None)
