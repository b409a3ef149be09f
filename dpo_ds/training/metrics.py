"""The names of the metrics a run writes to metrics.jsonl (and wandb): spelled here only.

A statistic `group/field` of a split is `{group}_{split}/{field}` (rewards_train/chosen, logps_eval/chosen,
as the original DPO code names them); a statistic without a field is `{group}/{split}` (loss/train);
metrics of the eval alone are `eval/{field}` (eval/checker_score).
"""

from __future__ import annotations


def key(group: str, split: str, field: str = "") -> str:
    """A split's statistic: `{group}_{split}/{field}`, or `{group}/{split}` when it has no field."""
    return f"{group}_{split}/{field}" if field else f"{group}/{split}"


def of_stat(stat: str, split: str) -> str:
    """The metric name of an objective's statistic `group/field` (or `group`) on a split."""
    group, _, field = stat.partition("/")
    return key(group, split, field)


def eval_only(field: str) -> str:
    """A metric the eval alone has (the checker's score)."""
    return f"eval/{field}"


LOSS_TRAIN = key("loss", "train")
GRAD_NORM = "grad_norm"  # the policy's global gradient norm of the step, before clipping
LR = "lr"
EXAMPLES = "counters/examples"  # training examples seen: the x axis of every plot
UPDATES = "counters/updates"
CHECKER_SCORE = eval_only("checker_score")
MEMORY_PEAK = "memory/peak_gib"
MEMORY_NOW = "memory/now_gib"
