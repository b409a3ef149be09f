"""Resume that checks itself, rotation and metric truncation, without a launcher."""

from __future__ import annotations

import json

import pytest

from dpo_ds.config import ConfigError, load_config, to_dict
from dpo_ds.run import dir as run_dirs
from dpo_ds.run import resume as run_resume
from dpo_ds.run.dir import ArchiveError, RunDir


def _step(run: RunDir, examples: int, complete: bool = True, ds: bool = True):
    d = run.step(examples)
    d.mkdir(parents=True)
    (d / "policy.pt").write_bytes(b"x")
    if ds:
        (d / "ds").mkdir()
    if complete:
        run_dirs.mark_complete(d, {"step": examples // 16, "world": 2, "config": {}, "data": "d"})
    return d


def test_resolve_auto_and_explicit(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    assert run_resume.resolve_resume("auto", run) is None  # nothing yet: a fresh start
    assert run_resume.resolve_resume(None, run) is None
    good = _step(run, 32)
    run_dirs.point_latest(run.root, good)
    cut = _step(run, 64, complete=False)  # a save that was killed
    assert run_resume.resolve_resume("auto", run) == good.resolve()
    assert run_resume.resolve_resume(str(run.root), run) == good.resolve()  # a run dir means its LATEST
    with pytest.raises(ArchiveError, match=r"step-64 is not a complete checkpoint \(COMPLETE is missing"):
        run_resume.resolve_resume(str(cut), run)
    with pytest.raises(ArchiveError, match=r"resume_from=.*/nope: .*/nope does not exist"):
        run_resume.resolve_resume(str(tmp_path / "nope"), run)
    weights_only = _step(run, 96, ds=False)
    with pytest.raises(ArchiveError, match=r"has no ds \(saved with checkpoint.save_optimizer=false"):
        run_resume.resolve_resume(str(weights_only), run)


def _state(overrides, world=2, data="abc"):
    return {"step": 4, "world": world, "data": data, "config": to_dict(load_config(None, overrides))}


def test_check_resume_names_every_changed_key():
    base = ["batch_size=16", "lr=1e-3"]
    new = to_dict(load_config(None, base))
    assert run_resume.check_resume(_state(base), new, "abc", 2, []) == []
    # keys that do not change the trajectory are free
    free = to_dict(load_config(None, [*base, "n_epochs=9", "eval_every=7", "log_every=3", "exp_name=x"]))
    assert run_resume.check_resume(_state(base), free, "abc", 2, []) == []
    changed = to_dict(load_config(None, ["batch_size=32", "lr=2e-3", "loss.beta=0.2"]))
    with pytest.raises(ConfigError) as e:
        run_resume.check_resume(_state(base), changed, "abc", 2, [])
    msg = str(e.value)
    assert "lr: 0.001 -> 0.002" in msg and "loss.beta: 0.1 -> 0.2" in msg
    assert "cannot change on resume: batch_size: 16 -> 32" in msg
    assert "resume.allow_changes=[loss.beta,lr]" in msg
    with pytest.raises(ConfigError, match=r"data \(token ids of the training data\): changed"):
        run_resume.check_resume(_state(base), new, "other", 2, [])
    with pytest.raises(ConfigError, match=r"cannot change on resume: world size: 2 -> 4"):
        run_resume.check_resume(_state(base), new, "abc", 4, ["world size"])
    lr_only = to_dict(load_config(None, ["batch_size=16", "lr=2e-3"]))
    assert run_resume.check_resume(_state(base), lr_only, "abc", 2, ["lr"]) == ["lr: 0.001 -> 0.002"]


def test_rotation_keeps_newest_and_latest_and_drops_partial(tmp_path):
    run = RunDir(tmp_path / "run")
    dirs = [_step(run, 16 * k) for k in range(1, 7)]
    run_dirs.point_latest(run.root, dirs[-1])
    partial = _step(run, 16 * 7, complete=False)
    gone = run_dirs.rotate(run, keep_last=2)
    assert sorted(p.name for p in gone) == sorted([d.name for d in dirs[:4]] + [partial.name])
    assert [p.name for _, p in run.step_dirs()] == ["step-80", "step-96"]
    # LATEST's target is never deleted, even when it is not among the newest
    run_dirs.point_latest(run.root, run.step(80))
    _step(run, 16 * 8)
    _step(run, 16 * 9)
    run_dirs.rotate(run, keep_last=2)
    assert [p.name for _, p in run.step_dirs()] == ["step-80", "step-128", "step-144"]


def test_truncate_records_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss/train": s} for s in range(1, 7)] + [{"step": 4, "loss/eval": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "loss')  # cut short by a kill
    assert run_dirs.truncate_records(path, 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 4]
    assert run_dirs.truncate_records(tmp_path / "absent.jsonl", 4) == 0


def test_a_key_added_since_the_checkpoint_compares_as_its_default():
    """A checkpoint written before a config key existed resumes when the key keeps its default (an
    upgrade of dpo_ds mid-run), and is refused, naming it, when the run sets it otherwise."""
    state = _state(["batch_size=16"])
    del state["config"]["model"]["init"]  # as a dpo_ds from before the key wrote it
    assert run_resume.check_resume(state, to_dict(load_config(None, ["batch_size=16"])), "abc", 2, []) == []
    changed = to_dict(load_config(None, ["batch_size=16", "model.init=random"]))
    with pytest.raises(ConfigError, match=r"model.init: 'auto' -> 'random'"):
        run_resume.check_resume(state, changed, "abc", 2, [])
