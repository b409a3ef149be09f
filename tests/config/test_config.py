import json

import pytest

from dpo_ds.config import Config, ConfigError, load_config
from dpo_ds.engine.ds_config import reference_ds_config, resolve_ds_config
from dpo_ds.training.objectives import build_objective


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "loss=ipo",
            "loss.beta=0.5",
            "datasets=[hh,shp]",
            "model.archive=a/policy.pt",
            "batch_size=64",
            "n_epochs=null",
            "n_examples=1000",
            "do_first_eval=false",
            "exp_name=x",
        ],
    )
    assert cfg.loss.name == "ipo" and cfg.loss.beta == 0.5
    assert cfg.datasets == ["hh", "shp"]
    assert cfg.model.archive == "a/policy.pt"
    assert cfg.batch_size == 64 and cfg.n_epochs is None and cfg.n_examples == 1000
    assert cfg.do_first_eval is False
    assert cfg.run_dir == "runs/x"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "loss:\n  name: dpo\n  beta: 0.2\nlr: 1.0e-6\ndatasets: [demo]\nmodel:\n  reference_dtype: bfloat16\n"
    )
    cfg = load_config(str(f), ["loss.beta=0.3"])
    assert cfg.loss.beta == 0.3 and cfg.lr == 1e-6 and cfg.model.reference_dtype == "bfloat16"
    f.write_text("loss: sft\n")
    assert load_config(str(f)).loss.name == "sft"


@pytest.mark.parametrize(
    "override, key",
    [
        ("los.beta=0.1", "los"),
        ("loss.betta=0.1", "loss.betta"),
        ("batch_size=abc", "batch_size"),
        ("batch_size=1.5", "batch_size"),
        ("do_first_eval=maybe", "do_first_eval"),
        ("loss.beta=0", "loss.beta"),
        ("loss.beta=-1", "loss.beta"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing"),
        ("loss.label_smoothing=-0.1", "loss.label_smoothing"),
        ("loss=kto", "loss.name"),
        ("model.reference_dtype=fp8", "model.reference_dtype"),
        ("model.logprob_impl=cuda", "model.logprob_impl"),
        ("max_prompt_length=512", "max_prompt_length"),
        ("gradient_accumulation_steps=3", "batch_size"),
        ("lr=0", "lr"),
        ("data.truncation_mode=middle", "data.truncation_mode"),
        ("data.add_bos=maybe", "data.add_bos"),
        ("data.chat_template=/no/such/template.jinja", "data.chat_template"),
        ("loss.sft_normalize=batch", "loss.sft_normalize"),
        ("loss.sft_normalize=token", "loss.sft_normalize"),  # with loss=dpo: applies to SFT only
        ("model=gpt2", "model"),
        ("batch_size", "key=value"),
        ("wandb.mode=cloud", "wandb.mode"),
        ("data.max_tokens_per_micro_batch=4096", "data.max_tokens_per_micro_batch"),
        ("data.layout=rows", "data.layout"),
        ("model.attn_implementation=flash", "model.attn_implementation"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:  # as train.py reads a config: loaded, then its losses built
        build_objective(load_config(None, [override]))
    assert key in str(e.value)


def test_ipo_with_label_smoothing_is_an_error():
    cfg = load_config(None, ["loss=ipo", "loss.label_smoothing=0.1"])  # every value valid on its own
    with pytest.raises(ConfigError, match="loss.label_smoothing.*not defined for loss=ipo"):
        build_objective(cfg)  # the ipo spec defines no label smoothing


def test_reference_free_needs_a_loss_with_a_reference():
    build_objective(load_config(None, ["loss=dpo", "loss.reference_free=true"]))
    with pytest.raises(ConfigError, match="loss.reference_free"):
        build_objective(load_config(None, ["loss=simpo", "loss.reference_free=true"]))


def test_config_and_objectives_do_not_import_each_other():
    import ast
    from pathlib import Path

    import dpo_ds.config

    tree = ast.parse(Path(dpo_ds.config.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("dpo_ds.") for m in imported), imported


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  bta: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*loss\.bta"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def _ds(tmp_path, obj):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_ds_auto_fields_are_derived(tmp_path):
    cfg = load_config(
        None, ["batch_size=32", "gradient_accumulation_steps=2", "max_grad_norm=1.0", "lr=1e-5"]
    )
    path = _ds(tmp_path, json.load(open("ds_configs/zero3.json")))
    ds = resolve_ds_config(path, cfg, world=8, on_cpu=False)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 2  # 32 / (8 ranks x 2 accumulation steps)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"]["lr"] == 1e-5
    assert "torch_adam" not in ds["optimizer"]["params"]  # a GPU run keeps the fused Adam
    assert ds["bf16"]["enabled"] is False
    cpu = resolve_ds_config(path, cfg, world=2, on_cpu=True)
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no JIT build on CPU


def test_ds_conflicts_are_errors(tmp_path):
    cfg = load_config(None, ["batch_size=32"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_ds_config(_ds(tmp_path, {"train_batch_size": 64}), cfg, world=2, on_cpu=True)
    with pytest.raises(ConfigError, match="gradient_clipping"):
        resolve_ds_config(_ds(tmp_path, {"gradient_clipping": 1.0}), cfg, world=2, on_cpu=True)
    with pytest.raises(ConfigError, match="bf16.enabled"):
        resolve_ds_config(_ds(tmp_path, {"bf16": {"enabled": True}}), cfg, world=2, on_cpu=True)
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(_ds(tmp_path, {"scheduler": {"type": "WarmupLR"}}), cfg, world=2, on_cpu=True)
    rms = load_config(None, ["batch_size=32", "optimizer=RMSprop"])
    with pytest.raises(ConfigError, match="optimizer.type"):
        resolve_ds_config(_ds(tmp_path, {"optimizer": {"type": "AdamW"}}), rms, world=2, on_cpu=True)
    with pytest.raises(ConfigError, match="world_size"):
        resolve_ds_config(_ds(tmp_path, {}), cfg, world=3, on_cpu=True)
    with pytest.raises(ConfigError, match="not valid JSON"):
        p = tmp_path / "bad.json"
        p.write_text("{ nope")
        resolve_ds_config(str(p), cfg, world=2, on_cpu=True)
    with pytest.raises(ConfigError, match="not found"):
        resolve_ds_config(str(tmp_path / "none.json"), cfg, world=2, on_cpu=True)


def test_reference_config_is_derived(tmp_path):
    cfg = load_config(
        None, ["batch_size=16", "model.reference_dtype=bfloat16", "model.reference_offload=true"]
    )
    ds = resolve_ds_config(_ds(tmp_path, json.load(open("ds_configs/zero3.json"))), cfg, world=2, on_cpu=True)
    ref = reference_ds_config(ds, cfg)
    assert "optimizer" not in ref
    assert ref["bf16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ref["zero_optimization"]["stage"] == 3
    assert ref["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ref["train_batch_size"] == ds["train_batch_size"]
    ds2 = resolve_ds_config(
        _ds(tmp_path, json.load(open("ds_configs/zero2.json"))), cfg, world=2, on_cpu=True
    )
    with pytest.raises(ConfigError, match="model.reference_offload"):
        reference_ds_config(ds2, cfg)
    cfg.model.reference_offload = False
    assert reference_ds_config(ds2, cfg)["zero_optimization"] == {"stage": 0}


def test_config_is_a_dataclass_with_original_names():
    names = {f for f in Config.__dataclass_fields__}
    for key in [
        "batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "lr",
        "warmup_steps",
        "max_grad_norm",
        "max_length",
        "max_prompt_length",
        "n_epochs",
        "n_examples",
        "n_eval_examples",
        "eval_every",
        "do_first_eval",
        "sample_during_eval",
        "n_eval_model_samples",
        "seed",
        "exp_name",
        "run_dir",
        "datasets",
    ]:
        assert key in names


def test_tokenisation_keys():
    cfg = load_config(
        None, ["loss=sft", "loss.sft_normalize=token", "data.add_bos=false", "data.truncation_mode=original"]
    )
    assert (
        cfg.loss.sft_normalize == "token"
        and cfg.data.add_bos == "false"
        and cfg.data.truncation_mode == "original"
    )
    assert load_config(None, ["data.add_bos=true"]).data.add_bos == "true"  # YAML's true arrives as a bool
    with pytest.raises(ConfigError, match="data.add_bos.*original"):
        load_config(None, ["data.add_bos=true", "data.truncation_mode=original"])


def test_deepspeeds_muon_module_is_only_imported_for_muon(monkeypatch):
    """DeepSpeed compiles Muon's kernels when its optimizers import that module to check isinstance: a
    stand-in answers the check (no optimizer is a Muon) unless the DeepSpeed JSON asks for Muon."""
    import sys

    import torch

    from dpo_ds.engine import build as engine_build

    monkeypatch.delitem(sys.modules, engine_build.MUON_MODULE, raising=False)
    engine_build._without_muon_compile({"optimizer": {"type": "Muon"}})
    assert engine_build.MUON_MODULE not in sys.modules
    engine_build._without_muon_compile({"optimizer": {"type": "AdamW"}})
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # what DeepSpeed's check imports

    assert not isinstance(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), MuonWithAuxAdam)
    assert sys.modules[engine_build.MUON_MODULE].__doc__.startswith("dpo_ds:")


def test_a_bare_comma_list_is_the_bracketed_list():
    # `datasets=hh,shp` used to become the single source 'hh,shp'
    assert load_config(None, ["datasets=hh,shp"]).datasets == ["hh", "shp"]
    assert load_config(None, ["datasets=[hh,shp]"]).datasets == ["hh", "shp"]
    assert load_config(None, ["model.lora.target_modules=q_proj, v_proj"]).model.lora.target_modules == [
        "q_proj",
        "v_proj",
    ]
    assert load_config(None, ["datasets=['my,file.jsonl']"]).datasets == ["my,file.jsonl"]
    with pytest.raises(ConfigError, match="config key 'datasets': an empty item"):
        load_config(None, ["datasets=hh,"])
