"""The files that ship inside the package: DeepSpeed JSONs (dpo_ds/ds_configs/) and recipes (dpo_ds/recipes/).

`--ds zero3` and `--config llama3_8b_full_dpo` name them; a path names a file of the user's own. A clone
shows the same files at the top level (ds_configs/, configs/ are links to these folders), so
`--ds ds_configs/zero3.json` keeps working there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, did_you_mean

PACKAGE = Path(__file__).resolve().parent.parent  # dpo_ds/
DS_CONFIGS = PACKAGE / "ds_configs"
RECIPES = PACKAGE / "recipes"
DEFAULT_DS = "zero3"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    summary: str  # the recipe's opening comment, up to its first blank comment line
    verdict: str  # its `# verdict:` line: the planner's, on the hardware of its `# plan:` line ('' if none)


def ds_config_names() -> list[str]:
    return sorted(p.stem for p in DS_CONFIGS.glob("*.json"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def ds_config_path(spec: str, flag: str = "--ds") -> Path:
    """A DeepSpeed JSON: a file path, or the name of a shipped one (`zero3`, `zero3.json`)."""
    return _shipped_or_path(spec, DS_CONFIGS, ".json", ds_config_names(), flag, "DeepSpeed config")


def recipe_path(spec: str, flag: str = "--config") -> Path:
    """A YAML config: a file path, or the name of a shipped recipe (`demo_dpo`, `llama3_8b_full_dpo`)."""
    return _shipped_or_path(spec, RECIPES, ".yaml", recipe_names(), flag, "recipe")


def _shipped_or_path(spec: str, folder: Path, suffix: str, names: list[str], flag: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"{flag} {spec}: not a file")
    name = spec[: -len(suffix)] if spec.endswith(suffix) else spec
    if "/" not in name and name in names:
        return folder / f"{name}{suffix}"
    hint = did_you_mean(name, names)
    raise ConfigError(
        f"{flag} {spec}: no such file, and not the name of a shipped {what}{hint}; shipped: {', '.join(names)}"
    )


def recipes() -> list[Recipe]:
    return [_recipe(RECIPES / f"{name}.yaml") for name in recipe_names()]


def comment_field(text: str, field: str) -> str:
    """A recipe's `# field: value` comment line's value ('' if it has none)."""
    prefix = f"# {field}:"
    return next((line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)), "")


def _recipe(path: Path) -> Recipe:
    text = path.read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or not line[1:].strip():
            break
        lines.append(line[1:].strip())
    return Recipe(path.stem, path, " ".join(lines), comment_field(text, "verdict"))
