"""What the data phase logs: progress only where a share takes long enough to need it, at most three
lines a share; tokenization's counts said once, as the total over every rank's share."""

from __future__ import annotations

import logging

import pytest

from dpo_ds.data import cache
from dpo_ds.data.tokenize import Tokenization
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _progress_lines(caplog, total: int, seconds_per_row: float) -> list[str]:
    clock = Clock()
    progress = cache._Progress("train", total, rank=0, clock=clock)
    progress.bar = None  # a terminal's tqdm bar aside: the log lines a job's log gets
    with caplog.at_level(logging.INFO, logger="dpo_ds.data"):
        caplog.clear()
        for done in range(1, total + 1):
            clock.now += seconds_per_row
            progress.update(done)
        progress.close()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing")]


def test_a_quick_share_logs_no_progress(caplog):
    """The issue's case: 32 rows printed 10 lines. Tokenized in under PROGRESS_QUIET_S: none."""
    assert _progress_lines(caplog, 32, 0.01) == []
    assert _progress_lines(caplog, 100_000, cache.PROGRESS_QUIET_S / 200_000) == []  # big but quick


def test_a_long_share_logs_three_quarters(caplog):
    lines = _progress_lines(caplog, 1000, 0.1)  # 100 s in all
    assert [line.split(":")[1].split()[0] for line in lines] == ["250/1000", "500/1000", "750/1000"]


def test_progress_that_starts_late_skips_the_quarters_it_passed(caplog):
    """Quiet for 10 s, then the first line at 60 %: one line per quarter reached, never a burst."""
    assert cache.progress_due(600, 1000, 11.0, 0) == 2
    assert cache.progress_due(601, 1000, 11.1, 2) is None
    assert cache.progress_due(750, 1000, 14.0, 2) == 3
    assert cache.progress_due(1000, 1000, 20.0, 3) is None  # done: the cache's own line says so
    assert cache.progress_due(5, 0, 50.0, 0) is None  # an empty share
    assert cache.progress_due(999, 1000, 9.9, 0) is None  # quicker than PROGRESS_QUIET_S


def test_other_ranks_log_no_progress(caplog):
    clock = Clock()
    progress = cache._Progress("train", 100, rank=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="dpo_ds.data"):
        for done in range(1, 101):
            clock.now += 1.0
            progress.update(done)
    assert not caplog.records


@pytest.fixture
def rules():
    return Tokenization(load_tokenizer(SHIPPED_MODELS["tiny"]), max_length=24, max_prompt_length=12)


def test_the_counts_of_two_ranks_are_said_once_as_their_sum(rules):
    """Rank 0 tokenized 16 long prompts and 3 cut responses of source a, rank 1 17 and 4 (and 2 of b):
    one line per kind, with 33 and 9, not one line per rank."""
    parts = [
        {"tokens": 10, "tallies": {"train": {"a": {"tokens": 16, "responses": 3}}, "test": {}}},
        {
            "tokens": 12,
            "tallies": {"train": {"a": {"tokens": 17, "responses": 4}, "b": {"responses": 2}}, "test": {}},
        },
    ]
    own = {"counts": {"train": 40, "test": 0}, "sources": ["data source a: ..."], "survey": None}
    info = cache._info(parts, own, rules)
    assert info["summary"] == [
        "prompts over max_prompt_length=12 were truncated: 33 plain-text prompts cut to their tokens' start or end",
        "9 responses were cut to the room their prompt left under max_length=24 (a cut response loses its end, "
        "EOS included)",
    ]
    assert info["report"]["tallies"]["train"] == {"a": {"tokens": 33, "responses": 7}, "b": {"responses": 2}}
    assert (info["tokens"], info["train_examples"], info["sources"]) == (22, 40, ["data source a: ..."])


def test_tokenization_tallies_what_it_cut(rules):
    """The counts the sum is made of, by hand: a 41-token prompt is cut (tokens); a 31-token response
    after a 7-token prompt is cut to 17 (responses); two responses cut to the same 13 'z's are identical."""
    rules.tokenize("long " * 8, ["ok", "no"], "keep_end")
    rules.tokenize("cut me", ["a" * 30, "b"], "keep_end")
    rules.tokenize("same start", ["z" * 30 + "1", "z" * 30 + "2"], "keep_end")
    assert rules.tallies() == {"tokens": 1, "responses": 3, "identical_ids": 1, "boundary_splits": 0}
    rules.reset_tallies()
    assert not +rules.tallies()
