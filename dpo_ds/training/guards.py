"""Watching for the failure reward accuracy hides, and scoring generations with the user's checker.

Likelihood displacement: DPO only asks that the chosen response gain on the rejected one; both can
lose probability, the chosen just less. Reward accuracy then climbs toward 1 while the model's own
generations degrade (the study the demo grew from showed it: without its anchor pairs and the RPO
term, greedy accuracy collapsed while held-out reward accuracy stayed near 1). The objective logs,
per step and per eval, how far the chosen and rejected responses' per-token log-probs moved from the
reference's (logps_*/chosen_shift_per_token, logps_*/rejected_shift_per_token).

With guard.max_chosen_drop_per_token=X, `guard/displacement` is 1 while the chosen responses' mean
per-token log-prob is more than X nats below the reference's and the reward accuracy is above 0.5
(the reward prefers the chosen responses while their likelihood falls); on training steps both are
smoothed over about 10 steps. The first time it is set, the run warns (guard.action=warn) or saves
a checkpoint and stops with exit 0 (guard.action=stop), the reason in the log and in metrics.jsonl.

Checker: eval.checker=module:function names a function (prompt, generation, row) -> float in [0, 1]
that scores greedy generations on eval.n_checked held-out prompts at each eval; their mean is
`eval/checker_score`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from dpo_ds.config import ConfigError
from dpo_ds.run.save import TrainingStopped  # raised here and by the save protocol
from dpo_ds.training import metrics as metric_names

log = logging.getLogger("dpo_ds")
EMA_STEPS = 10


class NonFiniteGuard:
    """Steps whose loss or gradient norm is not finite on any rank (the trainer agrees on it with one
    all-reduce, so every rank asks alike). Under ZeRO 1-3 DeepSpeed discards such a step (its gradient
    norm is not finite); a stage-0 optimizer applies it, so there the weights are checked too
    (`weights_broken`, a collective, asked only when a step was bad). guard.max_bad_steps in a row stop
    the run; a bad step is never checkpointed."""

    def __init__(self, max_bad_steps: int, latest: Callable[[], object]):
        self.max_bad_steps = max_bad_steps
        self.latest = latest  # what LATEST names now, for the message
        self.total = 0
        self.in_a_row = 0

    @property
    def may_save(self) -> bool:
        return self.in_a_row == 0

    def check(
        self, step: int, bad: bool, metrics: dict, weights_broken: Callable[[], bool]
    ) -> TrainingStopped | None:
        """Count the step (guard/bad_steps in metrics); the error that stops the run, if it must stop
        (raised by the trainer once the step is logged)."""
        self.total += bad
        self.in_a_row = self.in_a_row + 1 if bad else 0
        metrics["guard/bad_steps"] = self.total
        if not bad:
            return None
        cause = f"loss {metrics[metric_names.LOSS_TRAIN]:.4g}, gradient norm {metrics[metric_names.GRAD_NORM]:.4g}"
        if weights_broken():
            return TrainingStopped(
                f"step {step}: {cause}, and the weights are no longer finite (a ZeRO stage 0 optimizer "
                f"applies a non-finite update); LATEST still names {self.latest()}"
            )
        log.warning(
            f"step {step} skipped: {cause} ({self.in_a_row} in a row; the run stops at "
            f"guard.max_bad_steps={self.max_bad_steps})"
        )
        if self.in_a_row >= self.max_bad_steps:
            return TrainingStopped(
                f"step {step}: {self.in_a_row} steps in a row with a non-finite loss or gradient norm (last: "
                f"{cause}); the weights were not updated by them; LATEST still names {self.latest()}"
            )
        return None


class DisplacementGuard:
    def __init__(self, max_drop: float | None, action: str = "warn", splits=("train", "eval")):
        self.max_drop = max_drop
        self.action = action  # warn | stop
        # the splits whose shift is measured against the reference the guard means: under TR-DPO only the
        # eval's, taken against the initial reference (a moving one would hide the drop it exists to catch)
        self.splits = splits
        self.fired = False
        self._ema: dict[str, float] = {}

    def _smooth(self, key: str, value: float) -> float:
        alpha = 2 / (EMA_STEPS + 1)
        self._ema[key] = value if key not in self._ema else (1 - alpha) * self._ema[key] + alpha * value
        return self._ema[key]

    def should_stop(self, metrics: dict, split: str, step: int) -> str | None:
        """Set guard/displacement in `metrics`; the first time it fires, warn (guard.action=warn) or
        return the reason to save and stop (guard.action=stop)."""
        reason = self.check(metrics, split)
        if reason is None:
            return None
        if self.action == "warn":
            log.warning(f"guard: {reason} (step {step}; guard.action=stop would save and stop here)")
            return None
        log.warning(f"guard: stopping at step {step}: {reason}")
        return reason

    def check(self, metrics: dict, split: str) -> str | None:
        """Set guard/displacement in `metrics`; the reason, the first time it fires."""
        if self.max_drop is None or split not in self.splits:
            return None
        shift = metrics.get(metric_names.key("logps", split, "chosen_shift_per_token"))
        accuracy = metrics.get(metric_names.key("rewards", split, "accuracies"))
        if shift is None or accuracy is None:
            return None
        if split == "train":
            shift, accuracy = self._smooth("shift", shift), self._smooth("accuracy", accuracy)
        flagged = shift < -self.max_drop and accuracy > 0.5
        metrics["guard/displacement"] = float(flagged)
        if not flagged or self.fired:
            return None
        self.fired = True
        return (
            f"likelihood displacement ({split}): the chosen responses' log-prob is {-shift:.3g} nats per token "
            f"below the reference's (guard.max_chosen_drop_per_token={self.max_drop:g}) while reward accuracy "
            f"is {accuracy:.3f}: the reward prefers the chosen responses as the model makes them less likely"
        )


def load_checker(spec: str) -> Callable[[object, str, dict], float]:
    """eval.checker=module:function -> the function; a ConfigError naming the key when it is not there."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key 'eval.checker': expected module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module's
        raise ConfigError(
            f"config key 'eval.checker': cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config key 'eval.checker': {module_name} has no function {attr!r}")
    return fn


def score(checker, prompt, generation: str, row: dict) -> float:
    """The checker's score of one generation, which must be a number in [0, 1]."""
    value = checker(prompt, generation, row)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"eval.checker returned {value!r} for prompt {prompt!r}; it must return a float in [0, 1]"
        )
    return float(value)
