"""dpo_ds.plot (curves PNG from metrics.jsonl) and dpo_ds.export (run checkpoint -> HF directory).

Unit tests build run directories by hand: a metrics.jsonl, or a policy.pt + config.yaml + LATEST.
The integration test trains the tiny model for two steps under ZeRO-3 (one process, ~15 s) and
exports its DeepSpeed checkpoint alone.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from dpo_ds.cli import export, plot
from dpo_ds.config import dump_yaml, load_config
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer, random_init_state
from dpo_ds.run.archive import write_policy
from dpo_ds.run.dir import point_latest
from tests.launch import ROOT, single_process_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["97+70=", "36+31=", "04+21=", "98+78="]


# ----------------------------------------------------------------------------- plot


def _write_metrics(run_dir, sft: bool, n_steps: int = 6, batch: int = 8):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, steps in (("eval", range(0, n_steps + 1, 3)), ("train", range(1, n_steps + 1))):
        for s in steps:
            r = {"step": s, f"loss/{split}": 0.7 - 0.05 * s, f"logps_{split}/chosen": -20.0 + s}
            if not sft:
                r.update(
                    {
                        f"logps_{split}/rejected": -21.0 - s,
                        f"rewards_{split}/chosen": 0.01 * s,
                        f"rewards_{split}/rejected": -0.02 * s,
                        f"rewards_{split}/margins": 0.03 * s,
                        f"rewards_{split}/accuracies": min(1.0, 0.5 + 0.1 * s),
                    }
                )
            if split == "train":
                r.update({"grad_norm": 1.0, "lr": 1e-4})
            r["counters/examples"] = s * batch
            rows.append(r)
    rows.sort(key=lambda r: r["step"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_plot_dpo_run_default_out(tmp_path, capsys):
    run = _write_metrics(tmp_path / "dpo", sft=False)
    assert plot.main([str(run)]) == 0
    out = run / "curves.png"
    assert out.stat().st_size > 1000
    assert capsys.readouterr().out.strip() == str(out)
    w, h = _png_size(out)
    assert h > 600  # 5 panels: two rows


def test_plot_sft_run_skips_reward_panels(tmp_path):
    run = _write_metrics(tmp_path / "sft", sft=True)
    out = tmp_path / "figs" / "sft.png"
    assert plot.main([str(run), "--out", str(out)]) == 0
    w, h = _png_size(out)
    assert h < 600 and w < 1400  # loss and log-probs only: one row of two panels


def test_plot_several_runs_and_resumed_run(tmp_path):
    a = _write_metrics(tmp_path / "a", sft=False)
    b = _write_metrics(tmp_path / "b", sft=True)
    # a resumed run appends records for examples it had already logged: the later one wins
    with open(a / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss/train": 0.1, "counters/examples": 48}) + "\n")
    xs, ys = plot.series(plot.read_metrics(a), "loss/train")
    assert xs == sorted(set(xs)) and ys[-1] == 0.1
    out = tmp_path / "both.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    _png_size(out)


def test_plot_missing_or_empty_metrics(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"run directory {tmp_path / 'nope'} does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "a_file").write_text("x")
    assert plot.main([str(tmp_path / "a_file")]) == 2
    assert f"run directory {tmp_path / 'a_file'} is not a directory" in capsys.readouterr().err
    (tmp_path / "no_metrics").mkdir()
    assert plot.main([str(tmp_path / "no_metrics")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'no_metrics'} holds no metrics" in err
    assert str(tmp_path / "no_metrics" / "metrics.jsonl") in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert plot.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty" / "metrics.jsonl") in err and "empty" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    assert plot.main([str(tmp_path / "bad")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert not (tmp_path / "nope" / "curves.png").exists()


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    run = _write_metrics(tmp_path / "dpo", sft=False)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot.main([str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "dpo_ds.plot: error: matplotlib is not installed; plotting needs it: " + (
        "pip install 'dpo_ds[plot]'\n"
    )
    assert captured.out == "" and not (run / "curves.png").exists()
    # a bad run dir is still named first: no import is needed to find it
    assert plot.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export: helpers


def _model(model_dir, state):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _perturbed_state(model_dir, seed: int) -> dict[str, torch.Tensor]:
    """A seeded init moved off the init, so the export cannot pass by re-initialising."""
    g = torch.Generator().manual_seed(seed + 1)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in random_init_state(model_dir, seed).items()
    }


def _make_run(run_dir, state, name_or_path: str = "tiny", step: int = 3, overrides=()):
    step_dir = run_dir / f"step-{step}"
    step_dir.mkdir(parents=True)
    write_policy(step_dir / "policy.pt", step, state, {"loss/eval": 0.5})
    dump_yaml(
        load_config(None, [f"model.name_or_path={name_or_path}", f"run_dir={run_dir}", *overrides]),
        run_dir / "config.yaml",
    )
    point_latest(run_dir, step_dir)
    return run_dir


@torch.no_grad()
def _greedy(model, tok, prompts=PROMPTS, new_tokens: int = 8):
    """[(generated ids (1, T), logits of the whole sequence (1, T, V))] per prompt."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        seq = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        out.append((seq, model(seq).logits))
    return out


def _assert_same_outputs(exported, reference, tok):
    for (seq_e, logits_e), (seq_r, logits_r) in zip(_greedy(exported, tok), _greedy(reference, tok)):
        assert torch.equal(seq_e, seq_r)
        torch.testing.assert_close(logits_e, logits_r, rtol=0, atol=1e-5)


def _load_export(out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- export: unit


def test_export_policy_round_trip(tmp_path, capsys):
    model_dir = SHIPPED_MODELS["tiny"]
    state = _perturbed_state(model_dir, seed=7)
    run = _make_run(tmp_path / "run", state)
    out = tmp_path / "hf"
    assert export.main([str(run / "LATEST"), str(out)]) == 0
    # the last line: importing transformers' model code may make deepspeed log to stdout first
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    exported, tok = _load_export(out)
    original_tok = load_tokenizer(model_dir)
    for p in PROMPTS:
        assert tok(p)["input_ids"] == original_tok(p)["input_ids"]
    got = exported.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    _assert_same_outputs(exported, _model(model_dir, state), tok)


def test_export_bfloat16_and_overwrite(tmp_path, capsys):
    from safetensors import safe_open

    state = _perturbed_state(SHIPPED_MODELS["tiny"], seed=1)
    run = _make_run(tmp_path / "run", state)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    assert export.main([str(run / "LATEST"), str(out), "--dtype", "bfloat16"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert export.main([str(run / "LATEST"), str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and torch.equal(t, state[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _saved_dtypes(out_dir) -> set:
    from safetensors import safe_open

    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_export_keeps_the_runs_dtype_unless_told(tmp_path, capsys):
    """A bf16 run exports bf16 by default (half of float32's bytes), --dtype overrides, stderr says which."""
    state = {k: v.to(torch.bfloat16) for k, v in _perturbed_state(SHIPPED_MODELS["tiny"], seed=4).items()}
    run = _make_run(tmp_path / "run", state, overrides=["model.policy_dtype=bfloat16"])
    assert export.main([str(run), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert (
        f"weights in bfloat16 (the run's model.policy_dtype in {run / 'config.yaml'}; --dtype to change)"
        in err
    )
    assert _saved_dtypes(tmp_path / "hf") == {torch.bfloat16}
    exported, _ = _load_export(tmp_path / "hf")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state[k]), k

    assert export.main([str(run), str(tmp_path / "hf32"), "--dtype", "float32"]) == 0
    assert "weights in float32 (--dtype)" in capsys.readouterr().err
    assert _saved_dtypes(tmp_path / "hf32") == {torch.float32}

    # no config.yaml (--model gives the model): the checkpoint's own weights decide
    (run / "config.yaml").unlink()
    assert export.main([str(run / "LATEST"), str(tmp_path / "hf_w"), "--model", "tiny"]) == 0
    assert "weights in bfloat16 (the checkpoint's weights" in capsys.readouterr().err
    assert _saved_dtypes(tmp_path / "hf_w") == {torch.bfloat16}


def test_export_run_dir_without_latest_is_named(tmp_path, capsys):
    """A run dir with no LATEST is an error naming it, not a step dir whose run is its parent."""
    state = _perturbed_state(SHIPPED_MODELS["tiny"], seed=6)
    _make_run(tmp_path / "parent", state)  # a parent that *is* a run, config.yaml and all
    run = tmp_path / "parent" / "child_run"
    run.mkdir()
    assert export.main([str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{run} has no LATEST/: expected a run dir whose run saved a checkpoint" in err
    assert "step dir (RUN_DIR/step-N)" in err and not (tmp_path / "hf").exists()
    (run / "step-8").mkdir()
    assert export.main([str(run), str(tmp_path / "hf")]) == 2
    assert "it holds step-8: pass one of them" in capsys.readouterr().err
    (run / "LATEST").symlink_to("step-16")
    assert export.main([str(run), str(tmp_path / "hf")]) == 2
    assert f"{run / 'LATEST'} names step-16, which does not exist" in capsys.readouterr().err


def test_export_tied_embeddings(tmp_path):
    model_dir = tmp_path / "tied_model"
    shutil.copytree(SHIPPED_MODELS["tiny"], model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    state = _perturbed_state(model_dir, seed=3)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # what a tied run saves
    run = _make_run(tmp_path / "run", state, name_or_path=str(model_dir))
    out = tmp_path / "hf"
    assert export.main([str(run / "LATEST"), str(out)]) == 0
    exported, tok = _load_export(out)
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert torch.equal(exported.lm_head.weight, state["model.embed_tokens.weight"])
    _assert_same_outputs(exported, _model(model_dir, state), tok)

    # tied names that disagree in the checkpoint are an error, not a silent pick of one
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    bad = _make_run(tmp_path / "bad", state, name_or_path=str(model_dir))
    with pytest.raises(export.ExportError, match="lm_head.weight.*tied"):
        export.export(bad / "LATEST", tmp_path / "hf_bad")


def test_export_key_mismatch_names_keys(tmp_path, capsys):
    state = _perturbed_state(SHIPPED_MODELS["tiny"], seed=2)
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(3)
    run = _make_run(tmp_path / "run", state)
    assert export.main([str(run / "LATEST"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "missing keys: model.norm.weight" in err and "unexpected keys: model.extra.weight" in err
    assert str(run / "LATEST" / "policy.pt") in err
    assert not (tmp_path / "hf").exists()
    # and a checkpoint of another model, with --model pointing at the wrong directory
    run2 = _make_run(tmp_path / "run2", _perturbed_state(SHIPPED_MODELS["tiny"], seed=2))
    assert export.main([str(run2 / "LATEST"), str(tmp_path / "hf"), "--model", "demo"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_export_missing_inputs(tmp_path, capsys):
    assert export.main([str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    step = tmp_path / "run" / "step-1"
    step.mkdir(parents=True)
    assert export.main([str(step), str(tmp_path / "hf")]) == 2  # no config.yaml
    assert "config.yaml" in capsys.readouterr().err
    assert export.main([str(step), str(tmp_path / "hf"), "--model", "tiny"]) == 2  # no policy.pt, no ds/
    assert str(step / "ds") in capsys.readouterr().err


def test_export_from_zero2_model_states(tmp_path):
    """Below ZeRO-3 the DeepSpeed checkpoint's model states hold the whole module, keys 'lm.'-prefixed."""
    model_dir = SHIPPED_MODELS["tiny"]
    state = _perturbed_state(model_dir, seed=5)
    run = _make_run(tmp_path / "run", state)
    ds = run / "LATEST" / "ds"
    ds.mkdir()
    torch.save(
        {"module": {f"lm.{k}": v for k, v in state.items()}, "ds_version": "0.19.8"},
        ds / "mp_rank_00_model_states.pt",
    )
    (run / "LATEST" / "policy.pt").unlink()
    out = tmp_path / "hf"
    assert export.main([str(run), str(out)]) == 0  # a run dir exports its LATEST
    exported, _ = _load_export(out)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state[k]), k


# ----------------------------------------------------------------------------- export: ZeRO-3 run


@pytest.mark.integration
def test_export_from_zero3_checkpoint(tmp_path):
    run = tmp_path / "run"
    e = single_process_env()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "dpo_ds" / "train.py"),
            "--ds",
            str(ROOT / "ds_configs" / "zero3.json"),
            "loss=sft",
            "model.name_or_path=tiny",
            "datasets=[demo]",
            "batch_size=8",
            "eval_batch_size=8",
            "n_examples=16",
            "n_eval_examples=8",
            "max_length=16",
            "max_prompt_length=8",
            "do_first_eval=false",
            "lr=1e-2",
            "warmup_steps=0",
            f"run_dir={run}",
        ],
        env=e,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    latest = run / "LATEST"
    assert any((latest / "ds").glob("zero_pp_rank_0_*_model_states.pt")), "expected a ZeRO-3 checkpoint"
    state = torch.load(latest / "policy.pt", map_location="cpu", weights_only=True)["state"]
    model_dir = SHIPPED_MODELS["tiny"]
    init = random_init_state(model_dir, load_config(str(run / "config.yaml")).seed)
    assert any(not torch.equal(state[k], init[k]) for k in state), "training did not move the weights"

    reference = _model(model_dir, state)
    out_ds = tmp_path / "hf_ds"
    assert export.main([str(latest), str(out_ds), "--from-deepspeed"]) == 0
    (latest / "policy.pt").unlink()
    out_fallback = tmp_path / "hf_fallback"
    assert export.main([str(latest), str(out_fallback)]) == 0  # no policy.pt: DeepSpeed checkpoint
    for out in (out_ds, out_fallback):
        exported, tok = _load_export(out)
        got = exported.state_dict()
        assert set(got) == set(state)
        for k, v in state.items():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k
        _assert_same_outputs(exported, reference, tok)


def _adapter_step(root, model_dir, model_cfg: dict):
    """A LoRA step dir as a run saves it, as far as --adapter's check reads it: its adapter config naming
    the base, and the run's config (run_state.json)."""
    from dpo_ds.model import adapters
    from dpo_ds.run.dir import RUN_STATE

    step = root / "run" / "step-8"
    step.mkdir(parents=True)
    (step / adapters.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(model_dir)}))
    (step / adapters.ADAPTER_WEIGHTS).write_bytes(b"")
    (step / RUN_STATE).write_text(json.dumps({"config": {"seed": 0, "model": model_cfg}}))
    return step


def test_adapter_export_is_refused_when_the_run_did_not_start_from_the_model_dirs_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_ds.cli.export import ExportError, _adapter_base_is
    from dpo_ds.model.files import SHIPPED_MODELS, load_config

    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"])).save_pretrained(model_dir)
    on_weights = _adapter_step(tmp_path / "a", model_dir, {"name_or_path": str(model_dir), "init": "auto"})
    _adapter_base_is(model_dir, on_weights)  # the adapter's base is the directory's weights: allowed
    # the same with only config.json here: the adapter alone never reads the base's weights
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    _adapter_base_is(config_only, on_weights)
    seeded = _adapter_step(tmp_path / "b", model_dir, {"name_or_path": str(model_dir), "init": "random"})
    with pytest.raises(
        ExportError, match=r"trained on a seeded init of .*model.init=random.* export the merged model"
    ):
        _adapter_base_is(model_dir, seeded)
    after_sft = _adapter_step(
        tmp_path / "c",
        model_dir,
        {"name_or_path": str(model_dir), "init": "auto", "archive": "runs/sft/LATEST"},
    )
    with pytest.raises(ExportError, match=r"trained on model.archive=runs/sft/LATEST, not on the weights of"):
        _adapter_base_is(config_only, after_sft)
