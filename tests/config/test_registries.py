"""A reference mode and a layout added from tests/ alone (tests/toy/modes.py registers them): config
validation, the planner and a 2-step 2-rank run take them through the registries, with no edit under dpo_ds/."""

from __future__ import annotations

import math

import pytest

from dpo_ds.config import LAYOUTS, REFERENCE_MODES, ConfigError, load_config
from dpo_ds.model.files import SHIPPED_MODELS
from dpo_ds.plan.estimate import estimate
from dpo_ds.plan.planner import describe
from tests.launch import ROOT, TINY, metrics, run_many, small_demo
from tests.toy.modes import ToyEngine, ToyPacked, register, unregister

TOY = ["model.reference_mode=toy_engine", "data.layout=toy_packed", "data.max_tokens_per_micro_batch=64"]


@pytest.fixture
def toys():
    register()
    yield
    unregister()


def test_validation_asks_the_registries(toys):
    cfg = load_config(None, ["max_length=16", "max_prompt_length=8", *TOY])
    assert REFERENCE_MODES.get(cfg.model.reference_mode) is ToyEngine
    assert LAYOUTS.get(cfg.data.layout) is ToyPacked
    # the toy mode's own requirement, named by its key
    with pytest.raises(ConfigError, match="'model.reference_dtype': must be float32 for toy_engine"):
        load_config(None, [*TOY, "max_length=16", "max_prompt_length=8", "model.reference_dtype=bfloat16"])
    # the built-in requirement it inherits (no second engine beside a LoRA policy)
    with pytest.raises(ConfigError, match="'model.reference_mode': is engine, a second copy"):
        load_config(None, [*TOY, "max_length=16", "max_prompt_length=8", "model.lora.r=8"])
    # a token budget needs a segmented layout: the toy one is, as packed rows are
    with pytest.raises(ConfigError, match="must hold one pair"):
        load_config(None, ["model.reference_mode=toy_engine", "data.layout=toy_packed", "max_length=64", "max_prompt_length=8",
                           "data.max_tokens_per_micro_batch=64"])  # fmt: skip


def test_unknown_names_list_what_is_registered(toys):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.reference_mode=nope"])
    assert "('auto', 'engine', 'precomputed', 'adapters_off', 'toy_engine'), got 'nope'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.layout=nope"])
    assert "('padded', 'packed', 'shared_prompt', 'toy_packed'), got 'nope'" in str(e.value)
    unregister()
    with pytest.raises(
        ConfigError, match="must be one of \\('auto', 'engine', 'precomputed', 'adapters_off'\\), got"
    ):
        load_config(None, ["model.reference_mode=toy_engine"])


def test_the_planner_asks_the_registries(toys):
    ds = {"zero_optimization": {"stage": 3}}

    def plan(*keys):
        cfg = load_config(None, ["max_length=16", "max_prompt_length=8", "batch_size=8", *keys])
        return describe(cfg, ds, 2, True, SHIPPED_MODELS["tiny"])

    toy, builtin = plan(*TOY), plan("data.layout=packed", "data.max_tokens_per_micro_batch=64")
    assert toy.reference_mode == "toy_engine" and toy.tokens_per_micro == builtin.tokens_per_micro == 64
    assert estimate(toy) == estimate(builtin)  # an engine beside the policy: the same bytes as `engine`
    assert estimate(toy)["reference"] > 0
    precomputed = plan(*TOY[1:], "model.reference_mode=precomputed")
    assert estimate(precomputed)["reference"] == 0
    # without a budget the toy layout plans what packed rows hold: every sequence once
    assert plan("model.reference_mode=toy_engine", "data.layout=toy_packed").tokens_per_micro == 4 * 2 * 16


@pytest.mark.integration
def test_a_two_rank_run_uses_the_toy_mode_and_layout(tmp_path):
    data = small_demo(tmp_path / "data", 32, 16)
    common = ["--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", "loss.beta=0.1", *TINY, "batch_size=8",
              "eval_batch_size=8", "n_eval_examples=16", f"datasets=[{data}]", "lr=1e-3", "warmup_steps=0",
              "n_examples=16", "do_first_eval=false", "eval_every=100000", "checkpoint.save_optimizer=false",
              "data.max_tokens_per_micro_batch=64"]  # fmt: skip
    runs = {
        "toy": [
            *common,
            f"run_dir={tmp_path / 'toy'}",
            "model.reference_mode=toy_engine",
            "data.layout=toy_packed",
        ],
        "builtin": [
            *common,
            f"run_dir={tmp_path / 'builtin'}",
            "model.reference_mode=engine",
            "data.layout=packed",
        ],
    }
    logs = run_many(tmp_path / "logs", runs, script=ROOT / "tests" / "toy" / "multirun.py")
    assert "toy reference mode: building its engine" in logs["toy"]
    assert "toy layout: collating packed rows" in logs["toy"]
    assert "toy" not in logs["builtin"].replace(str(tmp_path), "")
    toy, builtin = metrics(tmp_path / "toy")[0], metrics(tmp_path / "builtin")[0]
    assert len(toy) == 2 and abs(toy[0]["loss/train"] - math.log(2)) < 1e-6  # policy == reference at step 0
    # the toy classes only add a check and log lines: the same steps as the built-in mode and layout
    assert [r["loss/train"] for r in toy] == [r["loss/train"] for r in builtin]
    assert [r["grad_norm"] for r in toy] == [r["grad_norm"] for r in builtin]


def test_a_config_never_resolved_means_what_resolve_makes_it():
    """The planner and the reference builder read model.reference_mode through config.reference_mode: a
    Config built without load_config (reference_mode=auto) plans as the resolved one does."""
    from dpo_ds.config import Config, reference_mode
    from dpo_ds.training.objectives import build_objective
    from dpo_ds.training.reference import built_before_policy

    raw = Config()
    raw.max_length, raw.max_prompt_length = 16, 8
    resolved = load_config(None, ["max_length=16", "max_prompt_length=8"])
    assert (
        raw.model.reference_mode == "auto"
        and reference_mode(raw) == resolved.model.reference_mode == "engine"
    )
    ds = {"zero_optimization": {"stage": 3}}
    plans = [describe(c, ds, 2, True, SHIPPED_MODELS["tiny"]) for c in (raw, resolved)]
    assert plans[0].reference_mode == plans[1].reference_mode == "engine"
    assert estimate(plans[0]) == estimate(plans[1])
    assert built_before_policy(raw, build_objective(resolved)) is True
    raw.model.lora.r = 8
    assert reference_mode(raw) == "adapters_off" and not built_before_policy(raw, build_objective(resolved))
