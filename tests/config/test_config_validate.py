"""The config package's split: resolve() owns the derived / "auto" values, validate() only checks."""

import ast
import copy
from pathlib import Path

import pytest

import dpo_ds.config
from dpo_ds.config import Config, ConfigError, load_config, resolve, validate

OVERRIDES = {
    "defaults": [],
    "lora_auto": ["model.lora.r=8", "model.reference_mode=auto"],
    "add_bos_upper": ["data.add_bos=TRUE"],
    "gather_mixed_case": ["eval.gather_for_generation=AuTo"],
    "packed": ["data.layout=packed", "data.max_tokens_per_micro_batch=2048"],
}


def _raw(overrides):
    """A config as parsed, before resolve(): "auto" and upper-case values still in it."""
    from dpo_ds.config.parse import _set, parse_overrides

    cfg = Config()
    for key, value in parse_overrides(overrides):
        _set(cfg, key, value)
    return cfg


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_validate_never_changes_the_config(name):
    loaded = load_config(None, OVERRIDES[name])
    copied = copy.deepcopy(loaded)
    validate(copied)
    assert copied == loaded
    raw = _raw(OVERRIDES[name])  # unresolved: validate may refuse it, but must leave it as it was
    copied = copy.deepcopy(raw)
    try:
        validate(copied)
    except ConfigError:
        pass
    assert copied == raw


def test_load_config_resolves_auto_and_case():
    assert load_config(None, []).model.reference_mode == "engine"
    assert load_config(None, ["model.lora.r=8"]).model.reference_mode == "adapters_off"
    assert load_config(None, ["model.lora.r=8", "model.reference_mode=precomputed"]).model.reference_mode == (
        "precomputed"
    )
    assert load_config(None, ["data.add_bos=TRUE"]).data.add_bos == "true"
    assert load_config(None, ["data.add_bos=False"]).data.add_bos == "false"
    assert load_config(None, ["eval.gather_for_generation=AuTo"]).eval.gather_for_generation == "auto"
    assert load_config(None, ["eval.gather_for_generation=TRUE"]).eval.gather_for_generation == "true"
    with pytest.raises(ConfigError, match="data.add_bos.*got 'maybe'"):
        load_config(None, ["data.add_bos=MAYBE"])  # the message shows the lower-cased value, as before


def test_resolve_is_the_step_load_config_runs():
    raw = _raw(OVERRIDES["lora_auto"] + ["data.add_bos=TRUE", "eval.gather_for_generation=False"])
    resolve(raw)
    once = copy.deepcopy(raw)
    resolve(raw)
    assert raw == once  # a second resolve changes nothing
    validate(raw)
    loaded = load_config(
        None, OVERRIDES["lora_auto"] + ["data.add_bos=TRUE", "eval.gather_for_generation=False"]
    )
    assert raw == loaded


def test_packing_alias_warns_at_the_caller():
    with pytest.warns(FutureWarning, match="data.packing=true is deprecated") as record:
        cfg = load_config(None, ["data.packing=true"])
    assert cfg.data.layout == "packed"
    assert record[0].filename == __file__


def test_lora_errors_come_before_the_reference_mode_ones():
    # auto resolves to adapters_off for any r != 0; a negative r is still reported as model.lora.r
    with pytest.raises(ConfigError, match="'model.lora.r': must be >= 0"):
        load_config(None, ["model.lora.r=-1"])
    with pytest.raises(ConfigError, match="'model.reference_mode': is engine"):
        load_config(None, ["model.lora.r=4", "model.reference_mode=engine"])
    with pytest.raises(ConfigError, match="'model.reference_mode': is adapters_off"):
        load_config(None, ["model.reference_mode=adapters_off"])


def _package_imports():
    """{module: package modules it imports}, after checking none imports the rest of dpo_ds."""
    pkg = Path(dpo_ds.config.__file__).parent
    graph = {}
    for path in sorted(pkg.glob("*.py")):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), (path.name, node.module)
                assert node.level == 1 or not (node.module or "").startswith("dpo_ds"), (
                    path.name,
                    node.module,
                )
                if node.level == 1:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dpo_ds") for a in node.names), path.name
        graph[path.stem] = deps
    return graph


def test_config_package_imports_no_other_dpo_ds_module_and_has_no_cycle():
    graph = _package_imports()
    assert set(graph) == {
        "__init__",
        "errors",
        "schema",
        "registry",
        "parse",
        "resolve",
        "validate",
        "shipped",
        "trl_names",
        "trl_defaults",
        "keys",
        "original_names",
    }
    done: set[str] = set()

    def visit(name, stack):
        assert name not in stack, f"import cycle: {stack + [name]}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, stack + [name])
            done.add(name)

    for name in graph:
        visit(name, [])
