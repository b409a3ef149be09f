"""The DeepSpeed JSONs and recipes ship inside the package; `--ds NAME` / `--config NAME` find them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_ds.config import ConfigError, load_config
from dpo_ds.config.shipped import DS_CONFIGS, RECIPES, ds_config_path, recipe_path, recipes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("top, packaged", [("ds_configs", DS_CONFIGS), ("configs", RECIPES)])
def test_the_clone_shows_the_packaged_files_byte_for_byte(top, packaged):
    clone = {p.name: p.read_bytes() for p in (ROOT / top).iterdir() if p.is_file()}
    shipped = {p.name: p.read_bytes() for p in packaged.iterdir() if p.is_file()}
    assert clone and clone.keys() == shipped.keys()
    assert clone == shipped


def test_ds_names_and_paths():
    assert ds_config_path("zero3") == DS_CONFIGS / "zero3.json"
    assert ds_config_path("zero2.json") == DS_CONFIGS / "zero2.json"
    assert (
        ds_config_path(str(ROOT / "ds_configs" / "zero3_offload.json")).read_bytes()
        == (DS_CONFIGS / "zero3_offload.json").read_bytes()
    )


def test_an_unknown_ds_name_lists_the_shipped_ones_and_the_closest():
    with pytest.raises(ConfigError) as e:
        ds_config_path("zero4")
    msg = str(e.value)
    assert "--ds zero4" in msg and "no such file" in msg
    assert "did you mean zero3" in msg or "did you mean zero2" in msg
    assert "zero2, zero3, zero3_offload" in msg


def test_a_missing_path_is_named_as_a_path(tmp_path):
    with pytest.raises(ConfigError, match=r"--ds .*nope/zero3.json: no such file"):
        ds_config_path(str(tmp_path / "nope" / "zero3.json"))


def test_recipe_by_name_and_by_path(tmp_path):
    assert recipe_path("demo_sft") == RECIPES / "demo_sft.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("lr: 1.0e-6\n")
    assert recipe_path(str(own)) == own
    with pytest.raises(ConfigError, match=r"--config demo_stf: .*did you mean demo_sft"):
        recipe_path("demo_stf")


@pytest.mark.parametrize("name", [r.name for r in recipes()])
def test_every_recipe_is_a_valid_config(name):
    cfg = load_config(recipe_path(name), [])
    text = recipe_path(name).read_text()
    assert f"exp_name: {cfg.exp_name}" in text  # the YAML was read, not the defaults


def test_the_recipes_users_run_ship():
    names = {r.name for r in recipes()}
    assert {"llama3_8b_full_dpo", "llama3_70b_lora_dpo", "qwen2_5_7b_32k_sp", "small_gpu_lora_dpo"} <= names
    for r in recipes():
        assert r.summary, f"{r.name}: no opening comment saying what it is"
