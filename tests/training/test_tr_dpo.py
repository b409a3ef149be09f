"""TR-DPO's keys (model.reference_sync_steps, model.reference_mixup_alpha): what is refused, by name, before any
model is built, and the TRL names that map to them."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_ds.cli import steps
from dpo_ds.config import ConfigError, load_config
from dpo_ds.training.objectives import build_objective

SYNC = ["model.reference_sync_steps=2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.reference_sync_steps=-1"], r"'model.reference_sync_steps': must be >= 0"),
        ([*SYNC, "model.reference_mixup_alpha=1.5"], r"'model.reference_mixup_alpha': must be in \[0, 1\]"),
        (
            ["model.reference_mixup_alpha=0.9"],
            r"'model.reference_mixup_alpha': applies with model.reference_sync",
        ),
        (
            [*SYNC, "model.reference_mode=precomputed"],
            r"'model.reference_sync_steps': moves the reference, but ",
        ),
        (
            [*SYNC, "model.lora.r=8", "model.lora.target_parameters=[experts]"],
            r"'model.reference_sync_steps': moves a LoRA reference through adapters on modules",
        ),
        (
            [*SYNC, "loss.reference_free=true"],
            r"'model.reference_sync_steps': moves a reference model, and loss",
        ),
    ],
)
def test_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_loss_without_a_reference_and_a_policy_partitioned_otherwise_are_refused_at_start(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(steps.comm, "init_distributed", lambda *a: (0, 1, torch.device("cpu")))
    cfg = load_config(None, [*SYNC, "loss=simpo"])
    with pytest.raises(
        ConfigError, match=r"'model.reference_sync_steps': moves the reference model, and loss=simpo"
    ):
        steps.start_distributed(cfg, "dpo_ds/ds_configs/zero3.json", objective=build_objective(cfg))
    cfg = load_config(None, SYNC)
    for key, value in (("zero_hpz_partition_size", 2), ("mics_shard_size", 2)):
        ds = json.loads(open("dpo_ds/ds_configs/zero3.json").read())
        ds["zero_optimization"][key] = value
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(ds))
        with pytest.raises(ConfigError, match=rf"zero_optimization.{key}=2 partitions the policy"):
            steps.start_distributed(cfg, str(path), objective=build_objective(cfg))
    ds["zero_optimization"].pop("mics_shard_size")
    ds["zero_optimization"]["zero_hpz_partition_size"] = 1  # hpZ off: taken
    path.write_text(json.dumps(ds))
    steps.start_distributed(cfg, str(path), objective=build_objective(cfg))


def test_trl_names_map_to_the_keys():
    from dpo_ds.config.trl_names import TRL_NAMES

    assert TRL_NAMES["sync_ref_model"].setting(True) == "model.reference_sync_steps=512"
    assert TRL_NAMES["ref_model_sync_steps"].setting(64) == "model.reference_sync_steps=64"
    assert TRL_NAMES["ref_model_mixup_alpha"].setting(0.9) == "model.reference_mixup_alpha=0.9"
    load_config(
        None, ["model.reference_sync_steps=64", "model.reference_mixup_alpha=0.9"]
    )  # both valid as written


def test_under_tr_dpo_the_guard_reads_the_eval_only():
    from dpo_ds.training.guards import DisplacementGuard

    dropped = {"logps_train/chosen_shift_per_token": -1.0, "rewards_train/accuracies": 0.9}
    assert (
        DisplacementGuard(0.1).check(dict(dropped), "train") is not None
    )  # a frozen reference: train counts
    moving = DisplacementGuard(0.1, splits=("eval",))
    assert moving.check(dict(dropped), "train") is None
    evals = {"logps_eval/chosen_shift_per_token": -1.0, "rewards_eval/accuracies": 0.9}
    assert "likelihood displacement (eval)" in moving.check(evals, "eval")


def test_a_lora_reference_adapter_holds_a_rank_for_each_sync_of_the_run():
    from dpo_ds.engine.build import reference_adapter_rank

    soft = load_config(None, ["model.lora.r=8", "model.reference_sync_steps=10"])
    assert reference_adapter_rank(soft, total_steps=35) == 8 * 3  # syncs after steps 10, 20, 30
    hard = load_config(
        None, ["model.lora.r=8", "model.reference_sync_steps=10", "model.reference_mixup_alpha=1"]
    )
    assert reference_adapter_rank(hard, total_steps=35) == 8  # each hard update starts again
