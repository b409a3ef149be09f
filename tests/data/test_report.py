"""The data report on a fixture with planted duplicates, identical pairs, truncations and train/test
overlap: every count in its JSON equals the count made by hand from what was planted, and the token
lengths equal those computed here with the tokenizer and the documented truncation rule."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("datasets")

from dpo_ds.config import load_config  # noqa: E402
from dpo_ds.data.prepare import prepare_data  # noqa: E402
from dpo_ds.data.report import table  # noqa: E402
from dpo_ds.dist import comm  # noqa: E402
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer  # noqa: E402
from dpo_ds.run.dir import RunDir  # noqa: E402
from tests.data.solo import Solo  # noqa: E402

ML, MPL = 24, 12  # max_length, max_prompt_length

# source A: a directory of original-format rows (one group per row, pairs index its responses)
A_TRAIN = [
    {"prompt": "what is one", "responses": ["one", "uno", "eins"], "pairs": [[0, 1], [0, 2]]},  # 2 pairs
    {"prompt": "say hi", "responses": ["hi", "hi"], "pairs": [[0, 1]]},  # chosen text == rejected text
    {"prompt": "what is one", "responses": ["1", "one one"], "pairs": [[0, 1]]},  # the prompt again
    {"prompt": "long " * 8, "responses": ["ok", "no"], "pairs": [[0, 1]]},  # 41-token prompt: cut
    {"prompt": "cut me", "responses": ["a" * 30, "b" * 30], "pairs": [[0, 1]]},  # both responses cut
    {"prompt": "same start", "responses": ["z" * 30 + "1", "z" * 30 + "2"], "pairs": [[0, 1]]},  # cut alike
    {"prompt": "lonely", "responses": ["x"], "pairs": []},  # no pair: no preference example
]
A_TEST = [
    {"prompt": "say hi", "responses": ["hi", "yo"], "pairs": [[0, 1]]},  # also in A's train
    {"prompt": "fresh q", "responses": ["a", "b"], "pairs": [[0, 1]]},
    {"prompt": "q two", "responses": ["c", "d"], "pairs": [[0, 1]]},  # in B's train, not A's
]
# source B: a flat file (prompt, chosen, rejected; rows with one prompt are grouped), test its sibling
B_TRAIN = [
    {"prompt": "q two", "chosen": "yes", "rejected": "no"},
    {"prompt": "q two", "chosen": "yes yes", "rejected": "nope"},  # the same prompt: one group, 2 pairs
    {"prompt": "q three", "chosen": "same", "rejected": "same"},  # dropped by the parser
    {"prompt": "what is one", "chosen": "1", "rejected": "2"},  # A's prompt too
    {"prompt": "q four", "chosen": "short", "rejected": "much longer answer"},  # rejected cut to 17
]
B_TEST = [
    {"prompt": "q four", "chosen": "a", "rejected": "b"},  # also in B's train
    {"prompt": "q five", "chosen": "c", "rejected": "d"},
]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def planted(tmp_path):
    for split, rows in (("train", A_TRAIN), ("test", A_TEST)):
        _write(tmp_path / "a" / f"{split}.jsonl", [{**r, "sft_target": r["responses"][0]} for r in rows])
    _write(tmp_path / "b_train.jsonl", B_TRAIN)
    _write(tmp_path / "b_test.jsonl", B_TEST)
    return [str(tmp_path / "a"), str(tmp_path / "b_train.jsonl")]


def _prepare(tmp_path, monkeypatch, specs, *extra, sft=False):
    for name in ("decided_by_rank0", "all_gather_objects", "fail_alike", "barrier"):
        monkeypatch.setattr(comm, name, getattr(Solo, name))
    keys = [f"datasets=[{','.join(specs)}]", f"max_length={ML}", f"max_prompt_length={MPL}",
            f"run_dir={tmp_path / 'run'}", "model.name_or_path=tiny", *extra]  # fmt: skip
    cfg = load_config(None, keys)
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    run_dir = RunDir(cfg.run_dir)
    _, prepared = prepare_data(cfg, sft, tok, SHIPPED_MODELS["tiny"], run_dir, rank=0, world=1)
    return prepared, json.loads(run_dir.data_report.read_text())


def _lengths(tok, prompt, responses):
    """Token lengths as trained on, by the documented rules: BOS before the prompt (what tok(text) puts
    first), EOS after each response; a prompt over max_prompt_length, when prompt + the longest response
    is over max_length, keeps max_prompt_length tokens; every response is cut to the room left."""
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer's rule: a BOS in front
    p = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
    r = [len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in responses]
    if p + max(r) > ML and p > MPL:
        p = MPL
    return p, [min(n, ML - p) for n in r]


def _spread(values):
    """Nearest-rank percentiles: the value at rank ceil(p/100 * n) of the sorted values."""
    v = sorted(values)
    return {**{f"p{p}": v[math.ceil(p / 100 * len(v)) - 1] for p in (50, 90, 99)}, "max": v[-1]}


def _pairs(rows):
    """(prompt, chosen, rejected) of every preference pair of the planted rows."""
    if "pairs" in rows[0]:
        return [(r["prompt"], r["responses"][c], r["responses"][j]) for r in rows for c, j in r["pairs"]]
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in rows if r["chosen"] != r["rejected"]]


def _want_lengths(tok, pairs):
    got = [_lengths(tok, p, [c, r]) for p, c, r in pairs]
    prompt, chosen, rejected = [g[0] for g in got], [g[1][0] for g in got], [g[1][1] for g in got]
    return {"prompt": _spread(prompt), "chosen": _spread(chosen), "rejected": _spread(rejected)}, sum(
        c > r for c, r in zip(chosen, rejected)
    ) / len(got)


def _cuts(tokens=0, responses=0):
    return {"tokens": tokens, "turns": 0, "text": 0, "system": 0, "responses": responses}


# the counts, made by hand from the rows above (the comments there say what each row plants)
COUNTS = {
    ("a", "train"): dict(
        rows=7,
        dropped={},
        pairs=7,
        examples=7,
        prompts=5,
        shared_prompts=1,
        examples_on_shared_prompts=3,
        identical_pairs=1,
        identical_ids=2,
        truncated=_cuts(tokens=1, responses=4),
    ),  # fmt: skip
    ("a", "test"): dict(
        rows=3,
        dropped={},
        pairs=3,
        examples=3,
        prompts=3,
        shared_prompts=0,
        examples_on_shared_prompts=0,
        identical_pairs=0,
        identical_ids=0,
        truncated=_cuts(),
    ),  # fmt: skip
    ("b", "train"): dict(
        rows=5,
        dropped={"chosen and rejected identical": 1},
        pairs=4,
        examples=4,
        prompts=3,
        shared_prompts=1,
        examples_on_shared_prompts=2,
        identical_pairs=0,
        identical_ids=0,
        truncated=_cuts(responses=1),
    ),  # fmt: skip
    ("b", "test"): dict(
        rows=2,
        dropped={},
        pairs=2,
        examples=2,
        prompts=2,
        shared_prompts=0,
        examples_on_shared_prompts=0,
        identical_pairs=0,
        identical_ids=0,
        truncated=_cuts(),
    ),  # fmt: skip
    # 'what is one' has 3 pairs in A and 1 in B; 'q two' 2 in B
    ("total", "train"): dict(
        rows=12,
        dropped={"chosen and rejected identical": 1},
        pairs=11,
        examples=11,
        prompts=7,
        shared_prompts=2,
        examples_on_shared_prompts=6,
        identical_pairs=1,
        identical_ids=2,
        truncated=_cuts(tokens=1, responses=5),
    ),  # fmt: skip
    ("total", "test"): dict(
        rows=5,
        dropped={},
        pairs=5,
        examples=5,
        prompts=5,
        shared_prompts=0,
        examples_on_shared_prompts=0,
        identical_pairs=0,
        identical_ids=0,
        truncated=_cuts(),
    ),  # fmt: skip
}
# in both splits: A 'say hi'; B 'q four'; in total also 'q two' (A's test, B's train)
OVERLAP = {"a": 1, "b": 1, "total": 3}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_report_equals_the_counts_made_by_hand(tmp_path, monkeypatch, planted, num_proc):
    prepared, report = _prepare(tmp_path, monkeypatch, planted, f"data.num_proc={num_proc}")
    assert prepared.built
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    a, b = planted
    entries = {"a": report["sources"][a], "b": report["sources"][b], "total": report["total"]}
    assert set(report["sources"]) == {a, b}
    rows = {("a", "train"): A_TRAIN, ("a", "test"): A_TEST, ("b", "train"): B_TRAIN, ("b", "test"): B_TEST}
    for (name, split), want in COUNTS.items():
        got = entries[name][split]
        assert {k: got[k] for k in want} == want, (name, split)
        pairs = (
            _pairs(rows[(name, split)])
            if name != "total"
            else _pairs(rows[("a", split)]) + _pairs(rows[("b", split)])
        )
        lengths, longer = _want_lengths(tok, pairs)
        assert got["lengths"] == lengths, (name, split)
        assert got["chosen_longer"] == longer, (name, split)
    for name, n in OVERLAP.items():
        assert entries[name]["prompts_in_train_and_test"] == n, name
    assert (report["examples"], report["max_length"], report["max_prompt_length"]) == (
        "preference pairs",
        ML,
        MPL,
    )
    # the summary said once, of the total: one line per kind
    assert prepared.summary == [
        f"prompts over max_prompt_length={MPL} were truncated: 1 plain-text prompts cut to their tokens' start or end",
        f"5 responses were cut to the room their prompt left under max_length={ML} (a cut response loses its "
        f"end, EOS included)",
        "2 examples have responses with the same ids as trained on (identical texts, or cut to the same start): "
        "they carry no preference",
    ]


def test_a_relaunch_that_maps_the_cache_reports_the_same(tmp_path, monkeypatch, planted):
    first, report = _prepare(tmp_path, monkeypatch, planted)
    again, second = _prepare(tmp_path, monkeypatch, planted)
    assert first.built and not again.built
    assert second == report


def test_the_report_of_sft_targets(tmp_path, monkeypatch, planted):
    """SFT: one example per prompt group (A: one per row, 7; B: 3 groups of 4 kept rows), the target's
    lengths, no chosen / rejected."""
    _, report = _prepare(tmp_path, monkeypatch, planted, sft=True)
    a, b = planted
    train = report["sources"][a]["train"], report["sources"][b]["train"], report["total"]["train"]
    assert [t["examples"] for t in train] == [7, 3, 10]
    assert [t["prompts"] for t in train] == [6, 3, 8]  # 'lonely' is a prompt here
    assert [(t["shared_prompts"], t["examples_on_shared_prompts"]) for t in train] == [(1, 2), (0, 0), (1, 3)]
    assert [t["identical_pairs"] for t in train] == [None, None, None]
    assert set(report["total"]["train"]["lengths"]) == {"prompt", "target"}
    assert "chosen_longer" not in report["total"]["train"]
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    targets = [_lengths(tok, r["prompt"], [r["responses"][0]])[1][0] for r in A_TRAIN]
    assert report["sources"][a]["train"]["lengths"]["target"] == _spread(targets)


def test_the_table_shows_every_source_and_the_total(tmp_path, monkeypatch, planted):
    _, report = _prepare(tmp_path, monkeypatch, planted)
    lines = table(report).splitlines()
    a, b = planted
    counts = [line for line in lines if line.startswith(f"| {a} ") or line.startswith("| total ")]
    assert len(counts) == 8  # each of (a, total) x (train, test) in both tables
    row = next(line for line in lines if line.startswith("| total ") and "| train |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # source, split, rows, pairs, examples, prompts, shared (examples), dropped, identical, truncated, overlap
    assert cells == [
        "total",
        "train",
        "12",
        "11",
        "11",
        "7",
        "2 (6)",
        "1",
        "1 / 2",
        "tokens 1, responses 5",
        "3",
    ]
    assert any(line.startswith(f"| {b} ") for line in lines)


def test_a_cache_built_before_reports_still_reports_its_lengths(tmp_path, monkeypatch, planted):
    from dpo_ds.data import report

    prepared, _ = _prepare(tmp_path, monkeypatch, planted)
    old = report.build(None, prepared.stores, sft=False, max_length=ML, max_prompt_length=MPL)
    assert old["sources"] == {} and "before data reports" in old["note"]
    assert old["total"]["train"]["lengths"]["prompt"]["max"] == MPL
    assert "before data reports" in report.table(old)


def test_an_empty_split_reports_no_lengths(tmp_path, monkeypatch, planted):
    from dpo_ds.data import report
    from dpo_ds.data.store import TokenStore

    prepared, _ = _prepare(tmp_path, monkeypatch, planted)
    empty = TokenStore.build([], None, "test")
    got = report.build(None, {"train": prepared.stores["train"], "test": empty}, sft=False, max_length=ML,
                       max_prompt_length=MPL)  # fmt: skip
    assert got["total"]["test"]["lengths"] == {"prompt": None, "chosen": None, "rejected": None}
    assert got["total"]["test"]["chosen_longer"] is None
    assert "| total  | test  | -" in report.table(got)


def test_a_killed_or_refused_write_leaves_no_temporary(tmp_path, monkeypatch):
    # found by bench/soak.py: a rank killed (or a disk full) while the report was written left
    # .data_report.json.<pid>.tmp in the run dir for good
    import subprocess
    import sys
    from pathlib import Path

    from dpo_ds.data import report as reports

    path = tmp_path / "data_report.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".data_report.json.{dead.pid}.tmp").write_text("{half")
    reports.write({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_report.json"]

    def full(self, *args, **kwargs):
        Path.write_bytes(self, b"{hal")  # part of it written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        reports.write({"a": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_report.json"]
    assert json.loads(path.read_bytes()) == {"a": 1}  # the last whole report stays
