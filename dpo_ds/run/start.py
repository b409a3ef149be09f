"""Where a run's starting weights come from: the one owner of that decision.

    the model directory's own weights      model.init=auto, no model.archive (an error when it has none)
    a seeded random initialisation         model.init=random, or the shipped demo / tiny configs
    model.archive, a full state            a run's policy.pt (step dir, LATEST, run dir) or an HF dir
    model.archive, a LoRA run's step dir   that run's own starting point, with its adapter merged in:
                                           "DPO after LoRA SFT" starts from the merged model, which is
                                           then both the reference and the base of any new adapter

A LoRA run's starting point is rebuilt from its run_state.json (model dir, init, archive, seed), so
the base its adapter was trained on is exactly the base it is merged into; adapter_config.json must
name this run's model.name_or_path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpo_ds.model import adapters
from dpo_ds.model.files import random_init_state, start_from_weights, weight_files
from dpo_ds.run.archive import archive_files, read_archive
from dpo_ds.run.dir import ArchiveError, find_step_dir, read_run_state


@dataclass
class Start:
    archive_state: dict | None  # an archive's full state dict (memory-mapped), or None
    from_weights: bool  # build with from_pretrained (the model dir's weights)
    adapters: list[Path] = field(default_factory=list)  # LoRA adapter dirs to merge in, in order
    source: str = ""  # what it is, for messages
    files: list[Path] = field(default_factory=list)  # the files whose bytes the weights come from
    step_idx: int | None = None
    metrics: dict = field(default_factory=dict)
    model_dir: Path | None = None
    seed: int | None = None  # a seeded random init of model_dir, made when first asked for
    _seeded: dict | None = None

    @property
    def state(self) -> dict | None:
        """The full state dict to load into the built model (None: from_pretrained's own weights)."""
        if self.archive_state is not None:
            return self.archive_state
        if self.seed is not None and self._seeded is None:
            self._seeded = random_init_state(self.model_dir, self.seed)
        return self._seeded

    def release(self) -> None:
        """Drop the state once both models hold it."""
        self.archive_state = self._seeded = None
        self.seed = None

    def describe(self) -> str:
        return self.source + (
            f" + the LoRA adapter(s) {', '.join(str(a) for a in self.adapters)} merged in"
            if self.adapters
            else ""
        )


def starting_point(model_dir: Path, init: str, archive: str | None, seed: int) -> Start:
    """The weights both models start from (see the module docstring); every check before any engine."""
    if archive:
        step = _adapter_step(archive)
        if step is not None:
            return _adapter_start(step, model_dir)
        loaded = read_archive(archive)
        return Start(
            loaded["state"], False, source=str(archive), files=archive_files(archive),
            step_idx=loaded.get("step_idx"), metrics=loaded.get("metrics") or {},
        )  # fmt: skip
    if start_from_weights(model_dir, init, None):  # raises when a directory that must hold weights has none
        return Start(None, True, source=f"the weights of {model_dir}", files=weight_files(model_dir))
    return Start(
        None, False, source=f"seeded init of {model_dir} (seed {seed})", model_dir=model_dir, seed=seed
    )


def _adapter_step(archive: str) -> Path | None:
    p = Path(archive)
    if p.is_file():
        return None
    try:
        step = find_step_dir(p)
    except ArchiveError:
        return None
    return step if adapters.is_adapter_dir(step) else None


def _adapter_start(step: Path, model_dir: Path) -> Start:
    """A LoRA run's step dir: its run's starting point, then its adapter merged in."""
    config = read_run_state(step).get("config", {})
    model = config.get("model", {})
    base = adapters.adapter_base(step)
    if not _same_base(base, model.get("name_or_path"), model_dir):
        raise ArchiveError(
            f"model.archive={step} is a LoRA adapter trained on {base}, but model.name_or_path is "
            f"{model_dir}: the adapter only means something on its own base; set model.name_or_path={base}"
        )
    inner = starting_point(
        model_dir, model.get("init", "auto"), model.get("archive"), int(config.get("seed", 0))
    )
    inner.adapters.append(step.resolve())
    inner.files += [step / adapters.ADAPTER_WEIGHTS]
    return inner


def _same_base(base: str | None, run_name: str | None, model_dir: Path) -> bool:
    """Whether an adapter's base is model_dir: the same directory; or the name the run gave
    (model.name_or_path, a shipped config's name or a path) resolving to it here; or a directory holding
    the same config.json (the base moved, or another install's copy of a shipped config)."""
    from dpo_ds.model.files import ModelError, resolve_model_dir

    if base is None:
        return False
    if Path(base).resolve() == Path(model_dir).resolve():
        return True
    if run_name:
        try:
            if resolve_model_dir(run_name).resolve() == Path(model_dir).resolve():
                return True
        except ModelError:
            pass
    ours, theirs = Path(model_dir) / "config.json", Path(base) / "config.json"
    return theirs.is_file() and ours.is_file() and theirs.read_bytes() == ours.read_bytes()
