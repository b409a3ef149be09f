"""A toy reference mode and a toy layout, registered from tests/ alone (no edit under dpo_ds/): config
validation, the planner and a 2-rank run must take them through the registries.

    toy_engine   a live reference engine (it subclasses the built-in one) with a requirement of its own
                 (an fp32 reference) and a log line when it is built
    toy_packed   packed rows (it subclasses the built-in layout) with a log line when it first collates
"""

from __future__ import annotations

import logging

from dpo_ds.config import LAYOUTS, REFERENCE_MODES
from dpo_ds.data.layout import Packed
from dpo_ds.training.reference import LiveReference

log = logging.getLogger("dpo_ds")


class ToyEngine(LiveReference):
    @classmethod
    def check(cls, cfg, need) -> None:
        super().check(cfg, need)
        need(
            cfg.model.reference_dtype == "float32", "model.reference_dtype", "must be float32 for toy_engine"
        )

    @classmethod
    def build(cls, cfg, **context):
        log.warning("toy reference mode: building its engine")
        return super().build(cfg, **context)


class ToyPacked(Packed):
    name = "toy_packed"
    announced = False

    def collate(self, examples, pad_id):
        if not ToyPacked.announced:
            ToyPacked.announced = True
            log.warning("toy layout: collating packed rows")
        return super().collate(examples, pad_id)


def register() -> None:
    REFERENCE_MODES.register("toy_engine", ToyEngine)
    LAYOUTS.register("toy_packed", ToyPacked)


def unregister() -> None:
    REFERENCE_MODES.unregister("toy_engine")
    LAYOUTS.unregister("toy_packed")
