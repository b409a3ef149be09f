"""One typed config: dataclass defaults <- optional YAML file <- key=value overrides.

The key names follow the original DPO code (eric-mitchell/direct-preference-optimization):
`loss=dpo loss.beta=0.1 model.archive=... batch_size=64 ...`. Unknown keys, values of the wrong
type and impossible values are errors that name the key; nothing is silently ignored.

errors.py    ConfigError, did_you_mean
schema.py    the allowed values (DTYPES, ...) and the typed dataclasses (Config, ...), each field with its help
keys.py      every dotted key with its type, default and help, walked from the dataclasses: the trainer's
             --help-keys, the did-you-mean hint, docs/reference/config.md (scripts/gen_reference.py)
registry.py  the reference modes and layouts (REFERENCE_MODES, LAYOUTS): each value with the class behind it
parse.py     coercion of YAML / CLI values, load_config (build -> resolve -> validate), read_config (the config
             and the keys the user set), to_dict, dump_yaml; an unknown key's error names the closest keys
             and what each means
trl_names.py TRL's names (DPOConfig, TrainingArguments) and what dpo_ds calls them: the errors' hints, the
             docs page docs/coming-from-trl.md
trl_defaults.py  the defaults that differ from TRL's on purpose, noted at launch
original_names.py  the original DPO code's keys dpo_ds has no place for, and what to write instead
resolve.py   resolve(): the one owner of derived, "auto" and normalised values
validate.py  validate(): checks only, never changes the config

Imports run errors <- schema, registry <- resolve, validate, keys <- parse; nothing here imports the rest of
dpo_ds (the registries import the classes they name when first asked, by name).
"""

from .errors import ConfigError
from .parse import dump_yaml, load_config, parse_overrides, read_config, to_dict
from .registry import LAYOUTS, REFERENCE_MODES, Registry
from .resolve import reference_mode, resolve
from .schema import (
    ADD_BOS,
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    GATHER_MODES,
    IPO_NORMALIZE,
    LOGPROB_IMPLS,
    MODEL_INITS,
    OPTIMIZERS,
    SFT_NORMALIZE,
    TRUNCATION_MODES,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    GuardConfig,
    LoraSettings,
    LossConfig,
    ModelConfig,
    ParallelConfig,
    ResumeConfig,
    WandbConfig,
)
from .validate import validate

__all__ = [
    "ADD_BOS",
    "ATTN_IMPLEMENTATIONS",
    "DTYPES",
    "GATHER_MODES",
    "IPO_NORMALIZE",
    "LAYOUTS",
    "Registry",
    "LOGPROB_IMPLS",
    "MODEL_INITS",
    "OPTIMIZERS",
    "REFERENCE_MODES",
    "SFT_NORMALIZE",
    "TRUNCATION_MODES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "ParallelConfig",
    "ResumeConfig",
    "WandbConfig",
    "dump_yaml",
    "load_config",
    "parse_overrides",
    "read_config",
    "reference_mode",
    "resolve",
    "to_dict",
    "validate",
]
