"""The one step that settles a parsed config's derived, "auto" and normalised values.

load_config runs resolve() after the config is built and before validate(), which only checks. What is
resolved here: the run dir's default, the deprecated data.packing alias, the lower-cased string switches
(data.add_bos, eval.gather_for_generation) and model.reference_mode=auto. Running it twice changes
nothing more.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .schema import Config


def reference_mode(cfg: Config) -> str:
    """model.reference_mode with `auto` settled: the policy's own base with its adapters off under LoRA, else
    a frozen engine beside the policy. What resolve() writes; what a config that was never resolved means."""
    if cfg.model.reference_mode != "auto":
        return cfg.model.reference_mode
    return "adapters_off" if cfg.model.lora.r else "engine"


def resolve(cfg: Config) -> None:
    """Fill in `cfg`'s derived values, in place."""
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / cfg.exp_name)
    if cfg.data.packing and cfg.data.layout == "padded":
        # stacklevel 3: the warning names load_config's caller, as it did when load_config raised it
        warnings.warn("data.packing=true is deprecated: use data.layout=packed", FutureWarning, stacklevel=3)
        cfg.data.layout = "packed"
    cfg.data.add_bos = str(cfg.data.add_bos).lower()
    cfg.eval.gather_for_generation = str(cfg.eval.gather_for_generation).lower()
    cfg.model.reference_mode = reference_mode(cfg)
