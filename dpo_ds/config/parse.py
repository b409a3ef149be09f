"""Reading a config: dataclass defaults <- optional YAML file <- key=value overrides.

Unknown keys, values of the wrong type and impossible values are errors that name the key; nothing is
silently ignored. load_config builds the config, resolve() settles its derived and "auto" values, then
validate() checks it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from .errors import ConfigError
from .resolve import resolve
from .schema import Config, LossConfig
from .validate import validate


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Turn a YAML/CLI value into `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            # `[a,b]` as YAML; a bare `a,b` is the same list (`datasets=hh,shp` names two sources); a
            # single name with a comma in it is written quoted in brackets: `datasets=['my,file.jsonl']`
            value = (
                yaml.safe_load(value)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",")]
            )
            if any(v == "" for v in value):
                raise ConfigError(f"config key '{key}': an empty item in {value!r}")
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list like [a,b], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f == f and f.is_integer():
                return int(f)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _set(obj, dotted: str, value, prefix: str = "", seen: set[str] | None = None) -> None:
    """Set the dotted key `prefix + dotted` of `obj` to `value`; `seen` collects the dotted keys set."""
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    full = prefix + head
    if head not in names:
        raise ConfigError(_unknown_key(obj, head, prefix, value if not rest else None))
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, full + ".", seen)
        elif isinstance(value, dict):
            for k, v in value.items():
                _set(current, str(k), v, full + ".", seen)
        elif head == "loss":
            current.name = _loss_name("loss", value)  # `loss=dpo` as in the original's hydra groups
            _mark(seen, "loss.name")
        else:
            raise ConfigError(f"config key '{full}' is a group; set its fields as {full}.<field>=value")
        return
    if rest:
        raise ConfigError(f"unknown config key '{prefix + dotted}': '{full}' has no sub-keys")
    if isinstance(obj, LossConfig) and head == "name":
        value = _loss_name(full, value)
    setattr(obj, head, _coerce(full, value, hints[head]))
    _mark(seen, full)


def _mark(seen: set[str] | None, key: str) -> None:
    if seen is not None:
        seen.add(key)


def _unknown_key(obj, head: str, prefix: str, value) -> str:
    """The error for an unknown key: what TRL's name means here, or the closest known keys."""
    full = prefix + head
    from .original_names import original_hint

    if original := original_hint(full):  # fsdp_port=12355, model.block_name=...: the original code's keys
        return f"unknown config key '{full}': {original}"
    if not prefix:  # a TRL / Trainer name (learning_rate=1e-6, loss_type=sigmoid) says what dpo_ds calls it
        from .trl_names import key_hint  # here, not at the top: `python -m dpo_ds.config.trl_names` runs it

        hint = key_hint(head, value)
        if hint:
            return f"unknown config key '{full}': {hint}"
    names = [f.name for f in dataclasses.fields(obj)]
    close = [prefix + n for n in difflib.get_close_matches(head, names, n=3)]
    from .keys import config_keys, key_summary  # here: keys.py walks the dataclasses only for an error's hint

    if not prefix:  # a key written without its group: chosen_nll_weight=1 -> loss.chosen_nll_weight
        by_leaf: dict[str, list[str]] = {}
        for key in (k.name for k in config_keys()):
            if "." in key:
                by_leaf.setdefault(key.rsplit(".", 1)[1], []).append(key)
        for leaf in difflib.get_close_matches(head, list(by_leaf), n=3):
            close += by_leaf[leaf]
    if close:
        means = " or ".join(f"{k!r} ({key_summary(k)})" for k in close[:3])
        return f"unknown config key '{full}'; did you mean {means}?"
    return f"unknown config key '{full}'; known keys here: {', '.join(names)}"


def _loss_name(key: str, value) -> str:
    """`dpo`, or a sum of losses written as a list, `[dpo,sft]` (CLI) / `[dpo, sft]` (YAML): 'dpo+sft'."""
    if isinstance(value, list) or (isinstance(value, str) and value.strip().startswith("[")):
        try:
            value = "+".join(name.strip() for name in _coerce(key, value, list[str]))
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}': expected a list like [dpo,sft], got {value!r}") from None
    return _coerce(key, value, str)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        out.append((key.strip(), value))
    return out


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg, _ = _build(config_file, overrides)
    resolve(cfg)  # here, not in _build: its deprecation warning names load_config's caller (stacklevel)
    validate(cfg)
    return cfg


def read_config(
    config_file: str | None = None, overrides: list[str] | None = None
) -> tuple[Config, frozenset[str]]:
    """load_config's config, and the dotted keys the user set (in the file or as overrides): every other key
    holds its default, or what resolve() derived from the keys set."""
    cfg, seen = _build(config_file, overrides)
    resolve(cfg)
    validate(cfg)
    return cfg, frozenset(seen)


def _build(config_file: str | None, overrides: list[str] | None) -> tuple[Config, set[str]]:
    """Defaults <- the YAML file <- the key=value overrides, and the keys set; not yet resolved or checked."""
    cfg, seen = Config(), set()
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {config_file} must hold a mapping of keys, got {type(data).__name__}"
            )
        for key, value in data.items():
            try:
                _set(cfg, str(key), value, seen=seen)
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {e}") from None
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value, seen=seen)
    return cfg, seen


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
