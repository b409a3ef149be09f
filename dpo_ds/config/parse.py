"""Reading a config: dataclass defaults <- optional YAML file <- key=value overrides.

Unknown keys, values of the wrong type and impossible values are errors that name the key; nothing is
silently ignored. load_config builds the config, resolve() settles its derived and "auto" values, then
validate() checks it.
"""

from __future__ import annotations

import dataclasses
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
            loaded = yaml.safe_load(value) if value.strip().startswith("[") else [value]
            value = loaded
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


def _set(obj, dotted: str, value, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    full = prefix + head
    if head not in names:
        raise ConfigError(f"unknown config key '{full}'; known keys here: {', '.join(names)}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, prefix=full + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                _set(current, str(k), v, prefix=full + ".")
        elif head == "loss":
            current.name = _loss_name("loss", value)  # `loss=dpo` as in the original's hydra groups
        else:
            raise ConfigError(f"config key '{full}' is a group; set its fields as {full}.<field>=value")
        return
    if rest:
        raise ConfigError(f"unknown config key '{prefix + dotted}': '{full}' has no sub-keys")
    if isinstance(obj, LossConfig) and head == "name":
        value = _loss_name(full, value)
    setattr(obj, head, _coerce(full, value, hints[head]))


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
    cfg = Config()
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
                _set(cfg, str(key), value)
            except ConfigError as e:
                raise ConfigError(f"{config_file}: {e}") from None
    for key, value in parse_overrides(overrides or []):
        _set(cfg, key, value)
    resolve(cfg)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
