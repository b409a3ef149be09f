"""Checks that start_distributed makes on every rank before any model is built."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.cli import steps
from dpo_ds.config import ConfigError, load_config


def test_triton_log_probs_where_triton_cannot_run_are_refused_at_start(monkeypatch):
    monkeypatch.setattr(steps.comm, "init_distributed", lambda *a: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(steps, "triton_unavailable_reason", lambda: "triton is not installed")
    cfg = load_config(None, ["model.logprob_impl=triton"])
    with pytest.raises(
        ConfigError, match=r"model.logprob_impl': triton cannot run here: triton is not installed"
    ):
        steps.start_distributed(cfg, "/nonexistent.json", objective=None)
    # where triton can run the check passes, and the next step (the DeepSpeed JSON) is what fails here
    monkeypatch.setattr(steps, "triton_unavailable_reason", lambda: None)
    with pytest.raises(ConfigError, match="nonexistent.json"):
        steps.start_distributed(cfg, "/nonexistent.json", objective=None)
