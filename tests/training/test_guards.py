"""The likelihood-displacement guard and the checker hook, without a launcher."""

from __future__ import annotations

import pytest

from dpo_ds.config import ConfigError, load_config
from dpo_ds.demo.checker import exact_sum, truth
from dpo_ds.training.guards import DisplacementGuard, load_checker, score


def _m(shift, acc, split="train"):
    return {f"logps_{split}/chosen_shift_per_token": shift, f"rewards_{split}/accuracies": acc}


def test_guard_fires_once_when_chosen_falls_while_accuracy_is_high():
    guard = DisplacementGuard(0.5)
    steps = [_m(0.1, 0.6) for _ in range(3)] + [_m(-3.0, 1.0) for _ in range(30)]
    fired = [k for k, m in enumerate(steps) if guard.check(m, "train")]
    assert len(fired) == 1 and fired[0] > 3  # smoothed: not on the first bad step, and only once
    assert [m["guard/displacement"] for m in steps[:4]] == [0.0] * 4 and steps[-1][
        "guard/displacement"
    ] == 1.0
    assert guard.check(_m(-3.0, 1.0, "eval"), "eval") is None  # it has fired already: no second warning


def test_guard_is_silent_when_accuracy_is_low_or_the_chosen_rises():
    # the reward not preferring the chosen responses; the chosen responses rising
    for steps in ([_m(-3.0, 0.3) for _ in range(30)], [_m(0.4, 1.0) for _ in range(30)]):
        guard = DisplacementGuard(0.5)
        assert all(guard.check(m, "train") is None for m in steps)
    assert DisplacementGuard(None).check(_m(-9.0, 1.0), "train") is None  # off by default
    eval_guard = DisplacementGuard(0.5)
    assert "nats per token" in eval_guard.check(_m(-1.0, 0.9, "eval"), "eval")  # eval values are not smoothed


def test_guard_config():
    assert load_config(None, []).guard.max_chosen_drop_per_token is None
    with pytest.raises(ConfigError, match="guard.action"):
        load_config(None, ["guard.action=panic"])
    with pytest.raises(ConfigError, match="guard.max_chosen_drop_per_token"):
        load_config(None, ["guard.max_chosen_drop_per_token=-1"])


def test_checker_loading_and_scores():
    fn = load_checker("dpo_ds.demo.checker:exact_sum")
    assert fn is exact_sum and truth("05+38=") == "043"
    assert score(fn, "05+38=", " 043", {}) == 1.0 and score(fn, "05+38=", "033", {}) == 0.0
    with pytest.raises(ConfigError, match="eval.checker.*module:function"):
        load_checker("dpo_ds.demo.checker")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_checker("no_such_module:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_checker("dpo_ds.demo.checker:nope")
    with pytest.raises(ValueError, match=r"must return a float in \[0, 1\]"):
        score(lambda p, g, r: 3, "p", "g", {})
