"""Every config key with its type, default and help, read from the dataclasses (schema.py's `opt`).

One help string per field feeds three places: the trainer's `--help-keys` (and the key list of its
--help), the "did you mean" hint of an unknown key (parse.py), and docs/reference/config.md, which
scripts/gen_reference.py writes from `sections()`.

    sections()         the keys grouped: the top level, then loss, model, model.lora, data, ...
    key_summary(key)   a key's or section's help, first sentence: what the hint quotes
    keys_text(only)    the text --help-keys prints; keys_overview() the compact list of --help
    add_help_keys(ap)  the --help-keys flag on an argparse parser
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass

from .errors import ConfigError, did_you_mean
from .schema import Config

TOP_LEVEL = ""  # the section of the keys outside any group
TOP_LEVEL_TITLE = "top level"
TOP_LEVEL_HELP = (
    "Data, batch sizes, optimizer, run length, evals, the run dir and the runtime: the keys of no group."
)
WIDTH = 100  # the text of --help and --help-keys: fixed, so the CLI reference does not depend on a terminal


@dataclass(frozen=True)
class Key:
    name: str  # dotted: loss.beta, model.lora.r
    type: str  # float, int | null, list[str]
    default: object
    help: str
    choices: tuple[str, ...] = ()

    @property
    def default_text(self) -> str:
        return format_value(self.default)

    @property
    def summary(self) -> str:
        return first_sentence(self.help)


@dataclass(frozen=True)
class Section:
    name: str  # TOP_LEVEL, loss, model.lora
    help: str
    keys: tuple[Key, ...]

    @property
    def title(self) -> str:
        return self.name or TOP_LEVEL_TITLE


def format_value(value) -> str:
    """A value as it is written on the command line: null, true, 0.1, [a, b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and not value:
        return '""'
    return str(value) if not isinstance(value, float) else repr(value)


def type_name(tp) -> str:
    """float, int | null, list[str]: the annotation as a user writes the value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (one followed by a capital or a backtick)."""
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", text.strip(), maxsplit=1)[0]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def sections(cls=Config, name: str = TOP_LEVEL, help: str = TOP_LEVEL_HELP) -> list[Section]:
    """The keys of `cls` in field order, its groups' sections after its own keys (model, then model.lora)."""
    hints = typing.get_type_hints(cls)
    keys, groups = [], []
    for f in dataclasses.fields(cls):
        dotted = f"{name}.{f.name}" if name else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            groups += sections(tp, dotted, f.metadata.get("help", ""))
        else:
            keys.append(
                Key(
                    dotted,
                    type_name(tp),
                    _default(f),
                    f.metadata.get("help", ""),
                    f.metadata.get("choices", ()),
                )
            )
    return [Section(name, help, tuple(keys)), *groups]


def config_keys() -> list[Key]:
    """Every dotted key of the config, in the order of sections()."""
    return [key for section in sections() for key in section.keys]


def key_summary(dotted: str) -> str:
    """The first sentence of a key's help, or of a group's (`model`, `model.lora`), without its full stop;
    '' for neither."""
    for section in sections():
        if section.name and section.name == dotted:
            return first_sentence(section.help).removesuffix(".")
        for key in section.keys:
            if key.name == dotted:
                return key.summary.removesuffix(".")
    return ""


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _selected(only: list[str]) -> list[Section]:
    """The sections, each with the keys that one of `only` names (a key, a group or a group's prefix)."""
    if not only:
        return sections()
    names = [k.name for k in config_keys()] + [s.name for s in sections() if s.name]
    for wanted in only:
        if not any(n == wanted or n.startswith(wanted + ".") for n in names):
            raise ConfigError(f"--help-keys: no config key or group {wanted!r}{did_you_mean(wanted, names)}")
    out = []
    for section in sections():
        keys = tuple(k for k in section.keys if any(k.name == w or k.name.startswith(w + ".") for w in only))
        if keys:
            out.append(Section(section.name, section.help, keys))
    return out


def keys_text(only: list[str] | None = None) -> str:
    """Every key (or those `only` names) with its type, default, values and help, grouped by section."""
    lines = []
    for section in _selected(list(only or [])):
        lines += _wrap(f"{section.title}: {section.help}", "")
        for key in section.keys:
            values = f": {' | '.join(key.choices)}" if key.choices else ""
            lines.append(f"  {key.name}  ({key.type}{values}; default {key.default_text})")
            lines += _wrap(key.help, "      ")
        lines.append("")
    return "\n".join(lines)


def keys_overview() -> str:
    """The keys' names by section, for the trainer's --help: what --help-keys explains."""
    width = max(len(s.title) for s in sections())
    lines = textwrap.wrap(
        "config keys, as key=value or in the --config YAML; `--help-keys [SECTION|KEY ...]` prints each "
        "key's type, default and meaning:",
        WIDTH,
    )
    for section in sections():
        leaves = " ".join(k.name.rsplit(".", 1)[-1] for k in section.keys)
        lines += textwrap.wrap(
            leaves,
            WIDTH,
            initial_indent=f"  {section.title:<{width}}  ",
            subsequent_indent=" " * (width + 4),
            break_on_hyphens=False,
        )
    return "\n".join(lines)


class _HelpKeys(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            text = keys_text(values)
        except ConfigError as e:
            parser.error(str(e))
        sys.stdout.write(text)
        parser.exit()


def add_help_keys(ap: argparse.ArgumentParser) -> None:
    """`--help-keys [SECTION|KEY ...]`: print the config keys (all, or those named) and exit, as --help does."""
    ap.add_argument(
        "--help-keys",
        action=_HelpKeys,
        nargs="*",
        metavar="SECTION|KEY",
        default=argparse.SUPPRESS,
        help="show every config key with its type, default and meaning (or only those of the sections "
        "or keys named: loss, model.lora, lr) and exit",
    )
