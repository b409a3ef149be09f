"""The demo's checker: is a greedy answer the exact 3-digit sum of the prompt's two numbers?

    eval.checker=dpo_ds.demo.checker:exact_sum     (configs/demo_*.yaml set it)

Used by training (eval/checker_score at every eval) and by `python -m dpo_ds.demo.evaluate` (its
greedy accuracy), so the run's metrics and the demo's table score answers the same way.
"""

from __future__ import annotations


def truth(prompt: str) -> str:
    """'05+38=' -> '043'."""
    a, b = prompt.rstrip("=").split("+")
    return f"{int(a) + int(b):03d}"


def exact_sum(prompt, generation: str, row: dict | None = None) -> float:
    return float(generation.strip() == truth(prompt))
