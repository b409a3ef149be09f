"""A hub id (`org/name`) names the hub cache's snapshot, laid out as `hf download` leaves it; nothing
is downloaded at run time."""

from __future__ import annotations

import json

import pytest

from dpo_ds.model.files import ModelError, hub_cached, hub_id, resolve_model_dir


def _hub_cache(root, repo_id, files):
    """The cache layout of huggingface_hub: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_a_downloaded_repo_resolves_to_its_snapshot(tmp_path):
    snap = _hub_cache(tmp_path, "acme/llm-1b", {"config.json": json.dumps({"model_type": "llama"})})
    assert hub_cached("acme/llm-1b", cache_dir=str(tmp_path)) == snap
    assert hub_cached("acme/other", cache_dir=str(tmp_path)) is None


def test_hub_ids_and_paths():
    assert hub_id("meta-llama/Meta-Llama-3-8B")
    assert not hub_id("tiny") and not hub_id("/models/llama") and not hub_id("./llama3-8b")
    assert not hub_id("a/b/c") and not hub_id("~/x")


def test_a_repo_that_is_not_downloaded_says_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        resolve_model_dir("acme/not-downloaded")
    assert "acme/not-downloaded" in str(e.value) and "hf download" in str(e.value)
