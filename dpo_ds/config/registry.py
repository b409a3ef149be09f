"""The values a config key chooses between, each with the class that implements it: one owner per decision.

    REFERENCE_MODES  model.reference_mode -> a reference mode (training/reference.py): what it needs of the
                     config (check), whether it is built before the policy, whether it holds an engine while
                     the policy trains (the planner asks), build(); what `auto` means is config.resolve's
    LAYOUTS          data.layout -> a Layout (data/layout.py): its collator, rows, the attention it needs,
                     whether it takes a token budget (segmented), the tokens it plans per micro-batch

Config validation, the planner and the run all ask these; a new mode or layout is one class and one
register() call, from anywhere (a test registers toy ones from tests/ alone). The built-in entries are named
'module:attribute' and imported on first use: the implementations live in layers above this one, and a
registry is the one place dpo_ds imports its own modules by name.
"""

from __future__ import annotations

import importlib

from .errors import ConfigError


class Registry:
    def __init__(self, key: str, builtins: dict[str, str], choices: tuple[str, ...] = ()):
        self.key = key  # the config key whose values these are
        self.choices = choices  # values the key takes besides the entries (`auto`: resolve() settles it)
        self._lazy = dict(builtins)  # name -> 'module:attribute', imported on first use
        self._entries: dict[str, object] = {}
        self._order = list(builtins)  # the built-ins, then registered names, each once

    def register(self, name: str, entry):
        """Add (or replace) the entry for `name`; returns it, so it can decorate a class."""
        self._lazy.pop(name, None)
        self._entries[name] = entry
        if name not in self._order:
            self._order.append(name)
        return entry

    def unregister(self, name: str) -> None:
        """Remove a registered entry (a test's toy)."""
        self._lazy.pop(name, None)
        self._entries.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def names(self) -> tuple[str, ...]:
        """Every value the key takes, in order: the choices, the built-ins, then what was registered."""
        return (*self.choices, *self._order)

    def __contains__(self, name) -> bool:
        return name in self._order

    def get(self, name: str):
        if name in self._lazy:
            module, attribute = self._lazy[name].split(":")
            self._entries[name] = getattr(importlib.import_module(module), attribute)
            del self._lazy[name]  # only once it imported: a failed import leaves the name known
        if name not in self._entries:
            raise ConfigError(f"config key '{self.key}': must be one of {self.names()}, got {name!r}")
        return self._entries[name]


REFERENCE_MODES = Registry(
    "model.reference_mode",
    {
        "engine": "dpo_ds.training.reference:LiveReference",
        "precomputed": "dpo_ds.training.reference:PrecomputedReference",
        "adapters_off": "dpo_ds.training.reference:AdaptersOffReference",
    },
    choices=("auto",),
)
LAYOUTS = Registry(
    "data.layout",
    {
        "padded": "dpo_ds.data.layout:Layout",
        "packed": "dpo_ds.data.layout:Packed",
        "shared_prompt": "dpo_ds.data.layout:SharedPrompt",
    },
)
