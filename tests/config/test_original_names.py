"""The original DPO code's keys that dpo_ds has no place for: typed as config keys, each error says what
to write instead, and every dpo_ds key those answers name exists."""

from __future__ import annotations

import re

import pytest

from dpo_ds.config import ConfigError, load_config
from dpo_ds.config.keys import config_keys
from dpo_ds.config.original_names import ORIGINAL_NAMES


@pytest.mark.parametrize("key", sorted(ORIGINAL_NAMES))
def test_each_original_key_is_answered(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=x"])
    assert (
        str(e.value)
        == f"unknown config key '{key}': '{key}' is the original DPO code's key; {ORIGINAL_NAMES[key]}"
    )


def test_no_entry_is_a_dpo_ds_key_and_every_key_an_answer_names_exists():
    ours = {k.name for k in config_keys()}
    assert not ours & set(ORIGINAL_NAMES)
    named = {
        m
        for hint in ORIGINAL_NAMES.values()
        for m in re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+|[a-z]+_[a-z_]+)=", hint)
    }
    assert named and named <= ours, named - ours
