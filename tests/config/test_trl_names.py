"""TRL's names: every DPOConfig field of TRL itself is classified, every mapped target exists in dpo_ds, and a
TRL name typed as a key or flag gets a message naming the dpo_ds setting. Also did-you-mean for other unknown
keys, the docs page generated from the same table, and the launch note on defaults that differ from TRL's."""

import dataclasses
import json
import logging
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dpo_ds.config import Config, ConfigError, load_config, read_config
from dpo_ds.config.shipped import DS_CONFIGS
from dpo_ds.config.trl_defaults import DEFAULT_NOTES, TRL_ADAM_BETAS, trl_default_notes
from dpo_ds.config.trl_names import (
    DPO,
    DS_JSON,
    FLAG,
    KINDS,
    LOSS_TYPES,
    MAPPED,
    OLDER,
    TRAINER,
    TRL_NAMES,
    flag_hint,
    key_hint,
    loss_setting,
    render_markdown,
)

REPO = Path(__file__).resolve().parents[2]
# the Trainer names TRL users type most (issue 25), whatever TRL version is installed
USERS_TRAINER_NAMES = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "output_dir",
    "deepspeed",
    "bf16",
    "gradient_checkpointing",
)


def _trl_fields() -> dict[str, dataclasses.Field]:
    trl = pytest.importorskip("trl")
    return {f.name: f for f in dataclasses.fields(trl.DPOConfig)}


def _schema_keys(tp=Config, prefix: str = "") -> set[str]:
    """Every dotted key of the schema, walked from the dataclass types themselves (not from the table)."""
    keys = set()
    for name, hint in typing.get_type_hints(tp).items():
        if dataclasses.is_dataclass(hint):
            keys |= _schema_keys(hint, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


# ----------------------------------------------------------------------------- the table against TRL


def test_every_dpoconfig_field_is_classified():
    fields = _trl_fields()
    assert len(fields) > 100  # DPOConfig's own and TrainingArguments' (TRL 1.16: 139)
    missing = sorted(set(fields) - set(TRL_NAMES))
    assert not missing, f"TRL DPOConfig fields not classified in dpo_ds/config/trl_names.py: {missing}"


def test_declared_in_is_where_trl_declares_it():
    import transformers

    fields = _trl_fields()
    trainer = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    for name, entry in TRL_NAMES.items():
        want = TRAINER if name in trainer else DPO if name in fields else OLDER
        assert entry.origin == want, name


def test_every_trl_loss_type_is_classified():
    help_text = _trl_fields()["loss_type"].metadata["help"]
    values = re.findall(r"`'(\w+)'`", help_text)
    assert "sigmoid" in values and len(values) > 10
    assert not sorted(set(values) - set(LOSS_TYPES))


def test_trainer_names_users_type_are_mapped():
    for name in USERS_TRAINER_NAMES:
        assert TRL_NAMES[name].kind == MAPPED, name


def test_each_entry_is_one_kind_with_a_reason():
    for name, entry in TRL_NAMES.items():
        assert entry.kind in KINDS and entry.note.strip(), name
        assert bool(entry.targets) == (entry.kind == MAPPED), name


# ----------------------------------------------------------------------------- the targets exist in dpo_ds


def test_mapped_targets_exist():
    from dpo_ds.cli.train import parse_args

    keys = _schema_keys()
    assert {"lr", "loss.beta", "model.lora.r"} <= keys  # the walk itself reaches nested groups
    keys.add("loss")  # the group takes a value too, `loss=ipo` being loss.name:
    assert load_config(None, ["loss=ipo"]).loss.name == "ipo"
    shipped = [json.loads(p.read_text()) for p in sorted(DS_CONFIGS.glob("*.json"))]
    assert shipped
    for entry in TRL_NAMES.values():
        for target in entry.targets:
            if target == FLAG:
                assert parse_args([FLAG, "x"]).ds == "x"
            elif target.startswith(DS_JSON):
                for ds in shipped:  # the field is present in every shipped DeepSpeed JSON
                    node = ds
                    for part in target[len(DS_JSON) :].split("."):
                        node = node[part]
            else:
                assert target in keys, f"{entry.name} -> {target}: not a dpo_ds config key"


def test_shipped_optimizer_values_are_the_ones_the_table_states():
    def stated(name):  # "...; 0.95 in the shipped JSONs, ..." -> 0.95
        return float(re.search(r"([0-9.e-]+) in the shipped", TRL_NAMES[name].note).group(1))

    for path in DS_CONFIGS.glob("*.json"):
        params = json.loads(path.read_text())["optimizer"]["params"]
        assert (stated("adam_beta1"), stated("adam_beta2")) == tuple(params["betas"]), path
        assert stated("adam_epsilon") == params["eps"] and stated("weight_decay") == params["weight_decay"], (
            path
        )


def test_loss_types_map_to_dpo_ds_losses_that_load():
    from dpo_ds.training.objectives import OBJECTIVES

    for value, mapped in LOSS_TYPES.items():
        if mapped is None:
            assert loss_setting(value) is None
            continue
        assert mapped[0] in OBJECTIVES, value
        cfg = load_config(None, loss_setting(value).split())
        assert cfg.loss.names == [mapped[0]]
    assert loss_setting("ipo").split()[1:] == ["loss.ipo_normalize=length"]  # TRL's IPO is per token
    assert load_config(None, loss_setting("[sigmoid,sft]").split()).loss.names == ["dpo", "sft"]
    assert load_config(None, loss_setting(["sigmoid", "hinge"]).split()).loss.names == ["dpo", "hinge"]


def test_every_setting_the_table_tells_users_to_write_loads():
    for entry in TRL_NAMES.values():
        if isinstance(entry.write, dict):
            for setting in entry.write.values():
                load_config(None, setting.split())


# ----------------------------------------------------------------------------- the messages


@pytest.mark.parametrize(
    "override, says",
    [
        ("learning_rate=1e-6", ["'lr'", "write lr=1e-6"]),
        ("per_device_train_batch_size=8", ["'batch_size'", "per optimizer step", "pairs"]),
        ("loss_type=sigmoid", ["'loss'", "write loss=dpo"]),
        ("loss_type=ipo", ["write loss=ipo loss.ipo_normalize=length"]),
        ("loss_type=[sigmoid,sft]", ["write loss=[dpo,sft]"]),
        ("rpo_alpha=1.0", ["'loss.chosen_nll_weight'", "write loss.chosen_nll_weight=1.0"]),
        ("precompute_ref_log_probs=true", ["write model.reference_mode=precomputed"]),
        ("generate_during_eval=true", ["'sample_during_eval'", "write sample_during_eval=true"]),
        ("output_dir=runs/x", ["'run_dir'", "write run_dir=runs/x"]),
        ("deepspeed=zero3", ["--ds", "write --ds zero3"]),
        ("eval_steps=100", ["'eval_every'", "training examples"]),
        ("bf16=true", ["write model.policy_dtype=bfloat16 model.reference_dtype=bfloat16"]),
        ("gradient_checkpointing=true", ["write model.gradient_checkpointing=true"]),
        ("adam_beta2=0.999", ["'optimizer.params.betas'", "DeepSpeed JSON"]),
    ],
)
def test_trl_name_as_key_names_the_dpo_ds_setting(override, says):
    name = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"unknown config key '{name}'" in msg and "TRL's name" in msg
    for part in says:
        assert part in msg, msg


@pytest.mark.parametrize(
    "override, says",
    [
        ("push_to_hub=true", "does not support"),
        ("lr_scheduler_kwargs={}", "does not support"),
        ("lr_scheduler_type=cosine", "write lr_schedule=cosine"),
        ("loss_type=kto_pair", "no loss kto_pair"),  # an older TRL's loss, now its KTOTrainer
        ("loss_type=[sigmoid_norm,exo_pair]", "write loss=\\[dpo_norm,exo_pair\\]"),
        ("disable_dropout=false", "does not apply"),
        ("fsdp=full_shard", "does not apply"),
    ],
)
def test_unsupported_and_inapplicable_names_say_so(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [override])


def test_trl_name_in_a_yaml_file(tmp_path):
    f = tmp_path / "trl.yaml"
    f.write_text("learning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"trl.yaml: unknown config key 'learning_rate'.*'lr'"):
        load_config(str(f))


def test_flag_hints():
    assert "write --ds x.json" in flag_hint("--deepspeed", "x.json")
    assert "write run_dir=runs/y" in flag_hint("--output_dir", "runs/y")
    assert "write run_dir=runs/z" in flag_hint("--output-dir=runs/z")  # dashes and an inline value
    assert "key=value" in flag_hint("--learning_rate")
    assert "model.policy_dtype=bfloat16" in flag_hint("--bf16")  # a bare switch means true
    assert flag_hint("--gpus") is None and flag_hint("--ds") is None
    assert key_hint("lr") is None  # a dpo_ds key is no TRL name


@pytest.mark.parametrize(
    "override, want",
    [
        ("loss.bet=0.1", "'loss.beta'"),
        ("bet=0.1", "'loss.beta'"),  # a group's key written without its group
        ("chosen_nll_weight=1", "'loss.chosen_nll_weight'"),
        ("model.lora.rr=8", "'model.lora.r'"),
        ("n_epoch=2", "'n_epochs'"),
    ],
)
def test_unknown_key_did_you_mean(override, want):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"unknown config key '{key}'; did you mean" in str(e.value) and want in str(e.value), str(e.value)


def test_unknown_key_without_a_close_one_lists_the_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'xyzzy'; known keys here: loss, model"):
        load_config(None, ["xyzzy=1"])


# ----------------------------------------------------------------------------- the docs page


def test_docs_page_is_the_rendered_table():
    page = (REPO / "docs" / "coming-from-trl.md").read_text()
    assert page == render_markdown(), (
        "regenerate: python -m dpo_ds.config.trl_names > docs/coming-from-trl.md"
    )
    for name in TRL_NAMES:
        assert f"`{name}`" in page


def test_docs_example_is_the_real_message():
    page = (REPO / "docs" / "coming-from-trl.md").read_text()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learning_rate=1e-6"])
    assert f"    dpo_ds: error: {e.value}\n" in page


def test_docs_regenerate_command_runs_as_shown():
    page = (REPO / "docs" / "coming-from-trl.md").read_text()
    assert "`python -m dpo_ds.config.trl_names > docs/coming-from-trl.md`" in page
    out = subprocess.run(
        [sys.executable, "-m", "dpo_ds.config.trl_names"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert out.stdout == page and not out.stderr


# ----------------------------------------------------------------------------- defaults that differ from TRL's


def test_default_notes_state_trl_defaults():
    fields = _trl_fields()
    for note in DEFAULT_NOTES:
        assert _get(Config(), note.key) != note.trl_default, note.key  # else the note says nothing
        if note.trl not in fields:  # loss_type=ipo: a behaviour, not a field
            continue
        default = fields[note.trl].default
        if default is None:  # bf16: None stands for a rule its help states
            assert f"defaults to `{note.trl_default}`" in fields[note.trl].metadata["help"], note.trl
        else:
            assert default == note.trl_default, note.trl
    assert TRL_ADAM_BETAS == (fields["adam_beta1"].default, fields["adam_beta2"].default)


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_read_config_returns_the_keys_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  gradient_checkpointing: true\nloss: ipo\n")
    cfg, keys = read_config(str(f), ["lr=1e-6", "loss.beta=0.2"])
    assert keys == {"model.gradient_checkpointing", "loss.name", "lr", "loss.beta"}
    assert cfg.lr == 1e-6 and cfg.loss.names == ["ipo"]


def test_notes_only_for_defaults_in_use():
    cfg, keys = read_config(None, [])
    notes = trl_default_notes(cfg, keys)
    for key in ("lr=5e-07", "warmup_steps=150", "max_grad_norm=10", "model.gradient_checkpointing=false"):
        assert any(n.startswith(key) for n in notes), (key, notes)
    assert not any("ipo_normalize" in n for n in notes)  # loss=dpo: the IPO default is not used
    # set to dpo_ds's own default value: the user chose it, no note
    cfg, keys = read_config(None, ["lr=5e-7", "loss=ipo", "warmup_steps=10"])
    notes = trl_default_notes(cfg, keys)
    assert not any(n.startswith(("lr=", "warmup_steps=")) for n in notes)
    assert any(n.startswith("loss.ipo_normalize=sum") for n in notes)


def test_notes_for_betas_only_when_they_differ():
    cfg, keys = read_config(None, [])
    assert any("betas [0.9, 0.95]" in n for n in trl_default_notes(cfg, keys, [0.9, 0.95]))
    assert not any("betas" in n for n in trl_default_notes(cfg, keys, [0.9, 0.999]))
    assert not any("betas" in n for n in trl_default_notes(cfg, keys, None))


def test_launch_logs_the_notes_once_for_a_shipped_json(tmp_path, caplog):
    from dpo_ds.cli.steps import log_trl_defaults

    cfg, keys = read_config(None, ["lr=1e-6"])
    ds = {"optimizer": {"params": {"betas": [0.9, 0.95]}}}
    with caplog.at_level(logging.INFO, logger="dpo_ds"):
        log_trl_defaults(cfg, keys, str(DS_CONFIGS / "zero3.json"), ds)
        log_trl_defaults(cfg, keys, str(tmp_path / "mine.json"), ds)  # the user's own JSON: their betas
    shipped, own = [r.getMessage() for r in caplog.records]
    assert "warmup_steps=150" in shipped and "lr=" not in shipped and "betas" in shipped
    assert "warmup_steps=150" in own and "betas" not in own
