"""Bad archives and state dicts fail with messages naming the file and the key; LATEST swaps atomically.

No distributed init: `read_archive` is plain torch, and `load_state` on a model built outside
`deepspeed.zero.Init` takes the non-ZeRO path (no parameter has `ds_id`).
"""

from __future__ import annotations

import os

import pytest
import torch

from dpo_ds.model.files import SHIPPED_MODELS, ModelError, load_config
from dpo_ds.run.archive import read_archive, write_policy
from dpo_ds.run.dir import ArchiveError, RunDir, point_latest


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]))


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


# ----------------------------------------------------------------------------- read_archive


def test_read_archive_missing_file(tmp_path):
    path = tmp_path / "nope" / "policy.pt"
    with pytest.raises(ArchiveError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert "model.archive" in msg and str(path) in msg and "does not exist" in msg


def test_read_archive_directory_without_policy(tmp_path):
    run = tmp_path / "step-16"
    run.mkdir()
    (run / "other.pt").write_bytes(b"")
    with pytest.raises(ArchiveError) as e:
        read_archive(str(run))
    msg = str(e.value)
    # the directory is resolved to DIR/policy.pt, and the message names the file it looked for
    assert str(run / "policy.pt") in msg and "does not exist" in msg


def test_read_archive_directory_with_policy(tmp_path, tiny_lm):
    run = tmp_path / "step-16"
    run.mkdir()
    write_policy(run / "policy.pt", 16, _state(tiny_lm), {"loss/eval": 1.0})
    archive = read_archive(str(run))  # a step dir is accepted for its policy.pt
    assert archive["step_idx"] == 16 and archive["metrics"] == {"loss/eval": 1.0}
    assert set(archive["state"]) == set(tiny_lm.state_dict())
    assert not list(run.glob("*.tmp"))  # write_policy leaves no temporary behind


def test_read_archive_not_torch(tmp_path):
    path = tmp_path / "policy.pt"
    path.write_text("this is not a torch checkpoint\n")
    with pytest.raises(ArchiveError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert str(path) in msg and "cannot read" in msg and "torch checkpoint" in msg


def test_read_archive_without_state_key(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 3, "metrics": {}, "model": {}}, path)
    with pytest.raises(ArchiveError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'state'" in msg
    assert "model" in msg and "step_idx" in msg  # it says what it found


def test_read_archive_not_a_dict(tmp_path):
    path = tmp_path / "policy.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ArchiveError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'state'" in msg and "list" in msg


@pytest.mark.parametrize(
    "state",
    [{"w": torch.zeros(2), "b": [1.0, 2.0]}, [torch.zeros(2)], {"w": "weights"}],
    ids=["list-value", "list-state", "str-value"],
)
def test_read_archive_state_not_tensors(tmp_path, state):
    path = tmp_path / "policy.pt"
    torch.save({"step_idx": 0, "state": state, "metrics": {}}, path)
    with pytest.raises(ArchiveError) as e:
        read_archive(str(path))
    msg = str(e.value)
    assert str(path) in msg and "['state']" in msg and "tensors" in msg


# ----------------------------------------------------------------------------- load_state


def test_load_state_copies_weights(tiny_lm):
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine.build import load_state

    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]))
    src = _state(other)
    name = "model.embed_tokens.weight"
    assert not torch.equal(tiny_lm.state_dict()[name], src[name])
    fresh = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]))
    load_state(fresh, src, "src.pt")
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src[k]), k


def test_load_state_missing_keys(tiny_lm):
    from dpo_ds.engine.build import load_state

    state = _state(tiny_lm)
    del state["lm_head.weight"]
    del state["model.norm.weight"]
    before = _state(tiny_lm)
    with pytest.raises(ModelError) as e:
        load_state(tiny_lm, state, "runs/x/policy.pt")
    msg = str(e.value)
    assert "runs/x/policy.pt" in msg and "missing" in msg
    assert "lm_head.weight" in msg and "model.norm.weight" in msg
    assert "(2)" in msg  # the count of missing keys
    for k, v in tiny_lm.state_dict().items():  # nothing was copied before the check
        assert torch.equal(v, before[k]), k


def test_load_state_unexpected_keys(tiny_lm):
    from dpo_ds.engine.build import load_state

    state = _state(tiny_lm)
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    with pytest.raises(ModelError) as e:
        load_state(tiny_lm, state, "a.pt")
    msg = str(e.value)
    assert "a.pt" in msg and "unexpected" in msg and "model.layers.9.mlp.up_proj.weight" in msg


def test_load_state_many_missing_keys_are_counted(tiny_lm):
    from dpo_ds.engine.build import load_state

    n = len(tiny_lm.state_dict())
    with pytest.raises(ModelError) as e:
        load_state(tiny_lm, {}, "empty.pt")
    msg = str(e.value)
    assert f"({n})" in msg and "..." in msg  # a long list is cut, its length still given


def test_load_state_wrong_shape(tiny_lm):
    from dpo_ds.engine.build import load_state

    state = _state(tiny_lm)
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1)
    with pytest.raises(ModelError) as e:
        load_state(tiny_lm, state, "b.pt")
    msg = str(e.value)
    assert "b.pt" in msg and name in msg
    assert str(tuple(state[name].shape)) in msg and str(tuple(tiny_lm.state_dict()[name].shape)) in msg


# ----------------------------------------------------------------------------- LATEST


def test_point_latest_creates_and_replaces(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first, second = RunDir(run).step(64), RunDir(run).step(128)
    assert first.name == "step-64"
    for d in (first, second):
        d.mkdir()
        (d / "marker").write_text(d.name)

    point_latest(run, first)
    latest = run / "LATEST"
    assert latest.is_symlink()
    assert os.readlink(latest) == "step-64"  # relative: the run dir can move
    assert (latest / "marker").read_text() == "step-64"

    point_latest(run, second)
    assert latest.is_symlink() and os.readlink(latest) == "step-128"
    assert (latest / "marker").read_text() == "step-128"
    assert first.is_dir()  # the old step dir is untouched
    # nothing but the two step dirs and the link: the temporary link was renamed, not left behind
    assert sorted(p.name for p in run.iterdir()) == ["LATEST", "step-128", "step-64"]

    moved = tmp_path / "moved"
    run.rename(moved)
    assert (moved / "LATEST" / "marker").read_text() == "step-128"


def test_point_latest_survives_a_stale_temporary(tmp_path):
    # a crash between symlink and rename leaves .LATEST.tmp; the next save must not fail on it
    run = tmp_path / "run"
    (run / "step-8").mkdir(parents=True)
    os.symlink("step-gone", run / ".LATEST.tmp")  # dangling
    point_latest(run, run / "step-8")
    assert os.readlink(run / "LATEST") == "step-8"
    assert not (run / ".LATEST.tmp").is_symlink()


def test_point_latest_is_an_atomic_rename(tmp_path, monkeypatch):
    # LATEST is never removed and then re-created: the swap is one os.replace onto the old link
    run = tmp_path / "run"
    for n in (8, 16):
        (run / f"step-{n}").mkdir(parents=True)
    point_latest(run, run / "step-8")
    calls = []
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst, *a, **k):
        calls.append(("replace", os.fspath(src), os.fspath(dst)))
        assert os.readlink(dst) == "step-8"  # the old link is still whole at the moment of the swap
        return real_replace(src, dst, *a, **k)

    def unlink(path, *a, **k):
        calls.append(("unlink", os.fspath(path)))
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    point_latest(run, run / "step-16")
    assert not any(
        c[0] == "unlink" and c[1].endswith("LATEST") and ".LATEST.tmp" not in c[1] for c in calls
    ), calls
    assert [c for c in calls if c[0] == "replace"] == [
        ("replace", str(run / ".LATEST.tmp"), str(run / "LATEST"))
    ]
    assert os.readlink(run / "LATEST") == "step-16"


def test_load_state_shape_checked_on_every_rank_before_any_gather(monkeypatch):
    # Under ZeRO-3 a parameter is partitioned (its local data is empty, ds_shape is the full shape)
    # and every rank runs load_state. A wrong shape must stop rank 1 as it stops rank 0, before any
    # rank enters a gather: otherwise rank 1 waits in a collective that rank 0 never joins.
    import deepspeed
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine.build import load_state

    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]))
    state = _state(lm)
    for i, p in enumerate(lm.parameters()):  # what zero.Init leaves behind on each rank
        p.ds_id, p.ds_shape = i, p.shape
        p.data = torch.empty(0)
    name = "model.layers.1.mlp.up_proj.weight"
    good = tuple(state[name].shape)
    state[name] = torch.zeros(3, 3)

    def no_gather(*args, **kwargs):
        raise AssertionError("entered a ZeRO-3 gather before the shapes were checked")

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", no_gather)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    with pytest.raises(ModelError) as e:
        load_state(lm, state, "c.pt")
    msg = str(e.value)
    assert "c.pt" in msg and name in msg and "(3, 3)" in msg and str(good) in msg
