"""Where a run's starting weights come from: the model directory's, the archive's, or a seeded init
that must be asked for (model.init=random) unless the directory is a shipped demo config."""

from __future__ import annotations

import json
import shutil

import pytest

from dpo_ds.config import ConfigError, load_config
from dpo_ds.model.files import SHIPPED_MODELS, ModelError, start_from_weights


@pytest.fixture
def downloaded(tmp_path):
    """A model dir as an interrupted download leaves it: config.json and the tokenizer, no weights."""
    d = tmp_path / "model"
    shutil.copytree(SHIPPED_MODELS["tiny"], d)
    return d


def test_no_weights_is_an_error_naming_the_dir(downloaded):
    with pytest.raises(ModelError, match=rf"{downloaded} holds no weights.*model.init=random"):
        start_from_weights(downloaded, "auto", None)


def test_random_init_must_be_asked_for(downloaded):
    assert start_from_weights(downloaded, "random", None) is False
    assert start_from_weights(downloaded, "auto", "runs/sft/LATEST/policy.pt") is False  # the archive's
    for shipped in SHIPPED_MODELS.values():  # demo / tiny: seeded by design
        assert start_from_weights(shipped, "auto", None) is False


def test_weights_present(downloaded):
    (downloaded / "model.safetensors").write_bytes(b"")
    assert start_from_weights(downloaded, "auto", None) is True


def test_index_naming_absent_shards(downloaded):
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    (downloaded / shards[0]).write_bytes(b"")
    index = {"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}
    (downloaded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=rf"{downloaded}.*2 shard\(s\).*{shards[1]}, {shards[2]}"):
        start_from_weights(downloaded, "auto", None)


def test_model_init_keys():
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["model.init=zeros"])
    with pytest.raises(ConfigError, match="model.init.*pick one"):
        load_config(None, ["model.init=random", "model.archive=x/policy.pt"])
    assert load_config(None, ["model.init=random"]).model.init == "random"
