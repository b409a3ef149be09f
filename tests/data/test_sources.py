"""Offline tests of dpo_ds.data.sources.

tests/fixtures/hub/{hh,shp,se} hold a few rows with the hub datasets' exact columns and types; the
expected groups below are written out by hand from those rows.
"""

import gzip
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from dpo_ds.data import sources  # noqa: E402
from dpo_ds.data.sources import DataError, PromptGroup, html_to_text, load_source, load_sources  # noqa: E402

HUB = Path(__file__).resolve().parents[1] / "fixtures" / "hub"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def check_invariants(groups):
    for g in groups:
        assert isinstance(g, PromptGroup)
        assert isinstance(g.prompt, str) and isinstance(g.sft_target, str)
        assert len(g.responses) >= 1 and all(isinstance(r, str) for r in g.responses)
        for c, r in g.pairs:
            assert 0 <= c < len(g.responses) and 0 <= r < len(g.responses) and c != r
        assert g.truncation_mode in ("keep_start", "keep_end")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    # column-wise, so a key missing from the first row still becomes a column
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in keys}), path)
    return path


# ---------------------------------------------------------------------------------------------
# hub-shaped fixtures


def test_hh_train(cache, caplog):
    caplog.set_level(logging.INFO, logger="dpo_ds.data")
    groups = load_source(f"hh:{HUB / 'hh'}", "train", cache_dir=cache)
    france = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    joke = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert groups == [
        # rows 0 and 2 share the prompt: merged, the second row's pair offset by 2
        PromptGroup(
            prompt=france,
            responses=[" Paris.", " London.", " It is Paris.", " I don't know."],
            pairs=[(0, 1), (2, 3)],
            sft_target=" Paris.",
            truncation_mode="keep_end",
        ),
        # the prompt runs to the LAST assistant marker; earlier turns stay in the prompt
        PromptGroup(
            prompt=joke,
            responses=[" Why did the chicken cross the road? To get to the other side.", " No."],
            pairs=[(0, 1)],
            sft_target=" Why did the chicken cross the road? To get to the other side.",
            truncation_mode="keep_end",
        ),
    ]
    # row 3 (identical responses) and row 4 (rejected has another prompt) are dropped and counted
    text = caplog.text
    assert "dropped 2 of 5 rows" in text
    assert "1 chosen and rejected responses identical" in text
    assert "1 rejected does not start with the chosen's prompt" in text


def test_hh_test_split(cache):
    groups = load_source(f"hh:{HUB / 'hh'}", "test", cache_dir=cache)
    assert groups == [
        PromptGroup("\n\nHuman: Name a prime number.\n\nAssistant:", [" 7", " 8"], [(0, 1)], " 7", "keep_end")
    ]


def test_hh_gzipped_jsonl_like_the_hub(tmp_path, cache):
    # the hub stores hh-rlhf as {split}.jsonl.gz
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(row) + "\n")
    groups = load_source(f"hh:{tmp_path}", "train", cache_dir=cache)
    assert groups == [
        PromptGroup("\n\nHuman: Hi\n\nAssistant:", [" Hello.", " Go away."], [(0, 1)], " Hello.", "keep_end")
    ]


def test_shp_train(cache, caplog):
    caplog.set_level(logging.INFO, logger="dpo_ds.data")
    groups = load_source(f"shp:{HUB / 'shp'}", "train", cache_dir=cache)
    assert groups == [
        # row 0: labels 1, scores 30/10 -> (A, B); row 1: labels 0, scores 4/12 -> (B, A) offset by 2
        PromptGroup(
            prompt="\n\nHuman: How do I keep basil fresh?\n\nAssistant:",
            responses=[
                " Put it in water like flowers.",
                " Freeze it.",
                " Wrap it in a paper towel.",
                " Leave it on the counter.",
            ],
            pairs=[(0, 1), (3, 2)],
            sft_target=" Put it in water like flowers.",  # score 30, the group's highest
            truncation_mode="keep_start",
        ),
        # row 2 (scores 5/4, ratio 1.25 < 2) is filtered: its prompt has no group at all
        PromptGroup(
            prompt="\n\nHuman: Why is the sky blue?\n\nAssistant:",
            responses=[
                " Rayleigh scattering.",
                " Because it reflects the ocean.",
                " Shorter wavelengths scatter more.",
                " Magic.",
            ],
            pairs=[(0, 1), (2, 3)],
            sft_target=" Shorter wavelengths scatter more.",  # score 200 from the second row beats 50
            truncation_mode="keep_start",
        ),
        # scores 3/6: ratio exactly 2 is kept; labels 0 means B preferred
        PromptGroup(
            prompt="\n\nHuman: Best surface for a pizza oven?\n\nAssistant:",
            responses=[" A steel.", " A stone."],
            pairs=[(1, 0)],
            sft_target=" A stone.",
            truncation_mode="keep_start",
        ),
    ]
    assert "dropped 1 of 6 rows: 1 score ratio below 2" in caplog.text


def test_shp_test_split(cache):
    groups = load_source(f"shp:{HUB / 'shp'}", "test", cache_dir=cache)
    assert groups == [
        PromptGroup(
            "\n\nHuman: Why do cats purr?\n\nAssistant:",
            [" Nobody is fully sure.", " To annoy dogs."],
            [(0, 1)],
            " Nobody is fully sure.",
            "keep_start",
        )
    ]


def test_se_train(cache, caplog):
    caplog.set_level(logging.INFO, logger="dpo_ds.data")
    groups = load_source(f"se:{HUB / 'se'}", "train", cache_dir=cache)
    assert groups == [
        # qid 1 and qid 5 ask the same question: merged; pm_scores 5, 1, 3 then 4
        PromptGroup(
            prompt="\n\nHuman: How do I check if a key exists in a `dict`?\n\nAssistant:",
            responses=[
                " Use `key in d`.",
                " Call `d.has_key(k)` & hope.",
                " Catch the error:\n\n```\ntry:\n    d[k]\nexcept KeyError:\n    pass\n```",
                " Use `d.get(k)`.",
            ],
            pairs=[(0, 1), (0, 2), (2, 1)],  # pairs only within a row's answers
            sft_target=" Use `key in d`.",
            truncation_mode="keep_start",
        ),
        # pm_scores 2, 2, 0: the tie gives no pair; the first of the top scores is the SFT target
        PromptGroup(
            prompt="\n\nHuman: Tabs or spaces?\n\nAssistant:",
            responses=[" Spaces.", " Tabs.", " Both <3"],
            pairs=[(0, 2), (1, 2)],
            sft_target=" Spaces.",
            truncation_mode="keep_start",
        ),
        # qid 3 has no answers: dropped. qid 4 is held out for 'test'. qid 6 has one answer: SFT only.
        PromptGroup(
            prompt="\n\nHuman: What does `a && b` do in bash?\n\nAssistant:",
            responses=[" Runs `b` only if `a` succeeds."],
            pairs=[],
            sft_target=" Runs `b` only if `a` succeeds.",
            truncation_mode="keep_start",
        ),
    ]
    assert "dropped 1 of 5 rows: 1 question without answers" in caplog.text
    assert "5 of 6 rows are in split 'train'" in caplog.text


def test_se_test_split_is_the_hash_held_out_question(cache):
    groups = load_source(f"se:{HUB / 'se'}", "test", cache_dir=cache)
    assert groups == [
        PromptGroup(
            prompt="\n\nHuman: What is a monad (take 1)?\n\nAssistant:",
            responses=[" A monoid in the category of endofunctors.", " A burrito."],
            pairs=[(1, 0)],
            sft_target=" A burrito.",
            truncation_mode="keep_start",
        )
    ]


def test_se_train_and_test_are_disjoint_and_cover_all_questions(cache):
    train = load_source(f"se:{HUB / 'se'}", "train", cache_dir=cache)
    test = load_source(f"se:{HUB / 'se'}", "test", cache_dir=cache)
    assert not {g.prompt for g in train} & {g.prompt for g in test}
    assert len(train) + len(test) == 4  # 5 distinct questions, one without answers


def test_html_to_text():
    html = (
        "<p>Use <code>a &amp;&amp; b</code> &lt;here&gt;,\n   please.</p>\n"
        "<pre><code>for x in y:\n    print(x)\n\n\nend\n</code></pre>\n"
        "<ul><li>one</li><li>two <b>bold</b></li></ul>line<br>break<script>alert(1)</script>"
    )
    assert html_to_text(html) == (
        "Use `a && b` <here>, please.\n\n"
        "```\nfor x in y:\n    print(x)\n\n\nend\n```\n\n"
        "- one\n- two bold\n\n"
        "line\nbreak"
    )
    assert html_to_text("plain &eacute;t&eacute;") == "plain été"
    assert html_to_text("") == ""


def test_hub_fixtures_have_the_hub_columns(cache):
    hh = datasets.load_dataset(
        "json", data_files=str(HUB / "hh" / "train.jsonl"), split="train", cache_dir=cache
    )
    assert hh.column_names == ["chosen", "rejected"]
    shp = datasets.load_dataset(
        "json", data_files=str(HUB / "shp" / "train.json"), split="train", cache_dir=cache
    )
    assert set(shp.column_names) == {
        "post_id", "domain", "upvote_ratio", "history", "c_root_id_A", "c_root_id_B", "created_at_utc_A",
        "created_at_utc_B", "score_A", "score_B", "human_ref_A", "human_ref_B", "labels",
        "seconds_difference", "score_ratio",
    }  # fmt: skip
    se = pq.read_table(HUB / "se" / "train.parquet")
    assert se.column_names == ["qid", "question", "answers", "date", "metadata"]
    assert str(se.schema.field("answers").type.value_type) == (
        "struct<answer_id: int64, author: string, author_id: int64, author_profile: string, "
        "pm_score: int64, selected: bool, text: string>"
    )


# ---------------------------------------------------------------------------------------------
# local files: original and flat formats

ORIGINAL_ROWS = [
    {"prompt": "Q1", "responses": ["a", "b", "c"], "pairs": [[0, 1], [2, 1]], "sft_target": "a"},
    {"prompt": "Q2", "responses": ["x"], "pairs": [], "sft_target": "y", "truncation_mode": "keep_start"},
]
ORIGINAL_GROUPS = [
    PromptGroup("Q1", ["a", "b", "c"], [(0, 1), (2, 1)], "a", "keep_end"),
    PromptGroup("Q2", ["x"], [], "y", "keep_start"),
]


def test_original_jsonl(tmp_path, cache):
    path = write_jsonl(tmp_path / "train.jsonl", ORIGINAL_ROWS)
    assert load_source(str(path), "train", cache_dir=cache) == ORIGINAL_GROUPS


def test_original_json_array(tmp_path, cache):
    path = tmp_path / "prefs_train.json"
    path.write_text(json.dumps(ORIGINAL_ROWS, indent=1))
    assert load_source(str(path), "train", cache_dir=cache) == ORIGINAL_GROUPS


def test_original_parquet(tmp_path, cache):
    path = tmp_path / "train.parquet"
    write_parquet(path, ORIGINAL_ROWS)
    assert load_source(str(path), "train", cache_dir=cache) == ORIGINAL_GROUPS


def test_original_integral_float_indices_are_accepted(tmp_path, cache):
    # one float anywhere turns the whole arrow column into floats
    rows = [{"prompt": "Q", "responses": ["a", "b"], "pairs": [[1.0, 0]], "sft_target": "a"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_source(str(path), "train", cache_dir=cache)[0].pairs == [(1, 0)]


def test_flat_format_groups_by_prompt(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO, logger="dpo_ds.data")
    rows = [
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"prompt": "R", "chosen": "yes", "rejected": "no"},
        {"prompt": "P", "chosen": "better", "rejected": "worse"},
        {"prompt": "R", "chosen": "same", "rejected": "same"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_source(str(path), "train", cache_dir=cache) == [
        PromptGroup("P", ["good", "bad", "better", "worse"], [(0, 1), (2, 3)], "good", "keep_end"),
        PromptGroup("R", ["yes", "no"], [(0, 1)], "yes", "keep_end"),
    ]
    assert "dropped 1 of 4 rows: 1 chosen and rejected identical" in caplog.text


def test_flat_format_parquet_with_extra_columns(tmp_path, cache):
    path = tmp_path / "train.parquet"
    rows = [{"id": 7, "prompt": "P", "chosen": "c", "rejected": "r"}]
    write_parquet(path, rows)
    assert load_source(str(path), "train", cache_dir=cache) == [
        PromptGroup("P", ["c", "r"], [(0, 1)], "c", "keep_end")
    ]


def test_single_file_test_split_is_the_sibling(tmp_path, cache):
    train = write_jsonl(tmp_path / "my_train_prefs.jsonl", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    write_jsonl(tmp_path / "my_test_prefs.jsonl", [{"prompt": "B", "chosen": "3", "rejected": "4"}])
    assert [g.prompt for g in load_source(str(train), "train", cache_dir=cache)] == ["A"]
    assert [g.prompt for g in load_source(str(train), "test", cache_dir=cache)] == ["B"]


def test_single_file_without_test_sibling(tmp_path, cache):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    with pytest.raises(DataError, match="looked for .*test.jsonl"):
        load_source(str(train), "test", cache_dir=cache)
    other = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    assert len(load_source(str(other), "train", cache_dir=cache)) == 1
    with pytest.raises(DataError, match="prefs.jsonl.*has no 'train' in it"):
        load_source(str(other), "test", cache_dir=cache)


def test_directory_form(tmp_path, cache):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    write_parquet(tmp_path / "test.parquet", ORIGINAL_ROWS)
    assert [g.prompt for g in load_source(str(tmp_path), "train", cache_dir=cache)] == ["A"]
    assert load_source(str(tmp_path), "test", cache_dir=cache) == ORIGINAL_GROUPS


def test_directory_with_two_files_for_a_split_is_ambiguous(tmp_path, cache):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    write_jsonl(tmp_path / "train.json", [{"prompt": "A", "chosen": "1", "rejected": "2"}])
    with pytest.raises(DataError, match="several 'train' files"):
        load_source(str(tmp_path), "train", cache_dir=cache)


def test_demo_resolves_to_package_demo_data(tmp_path, cache, monkeypatch):
    # point the module at a fake package so the test does not depend on the real demo files
    fake_pkg = tmp_path / "pkg"
    (fake_pkg / "data").mkdir(parents=True)
    (fake_pkg / "demo" / "data").mkdir(parents=True)
    write_jsonl(fake_pkg / "demo" / "data" / "train.jsonl", ORIGINAL_ROWS)
    monkeypatch.setattr(sources, "DEMO_DIR", fake_pkg / "demo" / "data")
    assert load_source("demo", "train", cache_dir=cache) == ORIGINAL_GROUPS
    with pytest.raises(DataError, match=r"no 'test' file in .*demo.*data"):
        load_source("demo", "test", cache_dir=cache)


def test_load_sources_concatenates_in_order(tmp_path, cache):
    path = write_jsonl(tmp_path / "train.jsonl", ORIGINAL_ROWS)
    specs = [f"shp:{HUB / 'shp'}", str(path), f"hh:{HUB / 'hh'}"]
    combined = load_sources(specs, "train", cache_dir=cache)
    expected = [g for s in specs for g in load_source(s, "train", cache_dir=cache)]
    assert combined == expected
    assert len(combined) == 3 + 2 + 2
    assert combined[3:5] == ORIGINAL_GROUPS
    check_invariants(combined)


def test_deterministic(tmp_path):
    specs = [f"hh:{HUB / 'hh'}", f"shp:{HUB / 'shp'}", f"se:{HUB / 'se'}"]
    first = load_sources(specs, "train", cache_dir=str(tmp_path / "c1"))
    second = load_sources(specs, "train", cache_dir=str(tmp_path / "c2"))
    again = load_sources(specs, "train", cache_dir=str(tmp_path / "c1"))  # from the datasets cache
    assert first == second == again
    check_invariants(first)


def test_module_imports_without_datasets():
    code = (
        "import sys, dpo_ds.data.sources; assert 'datasets' not in sys.modules, 'datasets imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------
# errors name the file, the row and the field


def _rows_with(bad_row):
    good = {"prompt": "Q", "responses": ["a", "b"], "pairs": [[0, 1]], "sft_target": "a"}
    return [good, good, {**good, **bad_row}]


@pytest.mark.parametrize(
    ("bad_row", "field", "got"),
    [
        ({"pairs": [[0, 5]]}, "pairs", "[[0, 5]]"),
        ({"pairs": [[1, 1]]}, "pairs", "[[1, 1]]"),
        ({"pairs": [[0, 1, 1]]}, "pairs", "[[0, 1, 1]]"),
        ({"pairs": [[0, "b"]]}, "pairs", "[[0, 'b']]"),
        ({"pairs": [[0, 1.5]]}, "pairs", "[[0.0, 1.5]]"),
        ({"responses": "a"}, "responses", "'a'"),
        ({"responses": []}, "responses", "[]"),
        ({"sft_target": None}, "sft_target", "None"),
        ({"prompt": 3}, "prompt", "3"),
        ({"truncation_mode": "middle"}, "truncation_mode", "'middle'"),
    ],
)
def test_bad_original_row(tmp_path, cache, bad_row, field, got):
    path = write_jsonl(tmp_path / "bad_train.jsonl", _rows_with(bad_row))
    with pytest.raises(DataError) as err:
        load_source(str(path), "train", cache_dir=cache)
    msg = str(err.value)
    assert f"bad_train.jsonl row 2 (0-based): field '{field}' must be" in msg
    assert msg.endswith(f"got {got}")


def test_bad_pairs_message_says_what_was_expected(tmp_path, cache):
    path = write_jsonl(tmp_path / "x.jsonl", _rows_with({"responses": ["a", "b", "c"], "pairs": [[0, 5]]}))
    with pytest.raises(DataError) as err:
        load_source(str(path), "train", cache_dir=cache)
    assert str(err.value) == (
        f"{path} row 2 (0-based): field 'pairs' must be a list of [chosen, rejected] index pairs into "
        "'responses' (3 responses), with chosen != rejected, got [[0, 5]]"
    )


def test_missing_value_in_flat_row(tmp_path, cache):
    rows = [{"prompt": "P", "chosen": "c", "rejected": "r"}, {"prompt": "P", "chosen": "c"}]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    with pytest.raises(
        DataError, match=r"flat.jsonl row 1 \(0-based\): field 'rejected' must be a string, got None"
    ):
        load_source(str(path), "train", cache_dir=cache)


def test_unrecognised_columns(tmp_path, cache):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "P", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_source(str(path), "train", cache_dir=cache)
    msg = str(err.value)
    assert "cols.jsonl" in msg and "['answer', 'prompt']" in msg
    assert "'responses'" in msg and "'chosen'" in msg


def test_hub_shaped_missing_column(tmp_path, cache):
    write_jsonl(tmp_path / "train.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}])
    with pytest.raises(DataError) as err:
        load_source(f"hh:{tmp_path}", "train", cache_dir=cache)
    msg = str(err.value)
    assert "train.jsonl" in msg and "['rejected']" in msg and "columns found ['chosen']" in msg


def test_hub_shaped_wrong_types(tmp_path, cache):
    shp_row = json.loads((HUB / "shp" / "train.json").read_text().splitlines()[0])
    write_jsonl(tmp_path / "train.json", [shp_row, {**shp_row, "score_B": "many"}])
    with pytest.raises(DataError, match=r"train.json row 1 \(0-based\): field 'score_B' must be a number"):
        load_source(f"shp:{tmp_path}", "train", cache_dir=cache)

    write_jsonl(tmp_path / "train.json", [{**shp_row, "labels": 2}])
    with pytest.raises(DataError, match=r"row 0 \(0-based\): field 'labels' must be 0 or 1"):
        load_source(f"shp:{tmp_path}", "train", cache_dir=cache)

    se_dir = tmp_path / "se"
    se_dir.mkdir()
    question = "<p>Is this question in the train split?</p>"
    assert not sources._se_held_out(question)
    answers = [{"text": "a", "pm_score": 1}, {"text": "b"}]
    write_jsonl(se_dir / "train.jsonl", [{"question": question, "answers": answers}])
    with pytest.raises(
        DataError, match=r"row 0 \(0-based\): field 'answers\[1\].pm_score' must be a number, got None"
    ):
        load_source(f"se:{se_dir}", "train", cache_dir=cache)


def test_missing_paths(tmp_path, cache):
    with pytest.raises(DataError, match=r"no local file or directory .*nope_train.jsonl exists"):
        load_source(str(tmp_path / "nope_train.jsonl"), "train", cache_dir=cache)
    with pytest.raises(DataError, match=r"data directory .*no_such_dir does not exist"):
        load_source(f"hh:{tmp_path / 'no_such_dir'}", "train", cache_dir=cache)
    with pytest.raises(
        DataError, match=r"no 'test' file in .*looked for test.jsonl, test.json, test.parquet"
    ):
        load_source(f"shp:{tmp_path}", "test", cache_dir=cache)


def test_unreadable_file(tmp_path, cache):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "P", "chosen": \n')
    with pytest.raises(DataError, match=r"train\.jsonl: line 1 \(row 0, 0-based\) is not valid JSON"):
        load_source(str(path), "train", cache_dir=cache)


def test_unknown_spec(cache):
    with pytest.raises(DataError) as err:
        load_source("anthropic", "train", cache_dir=cache)
    msg = str(err.value)
    assert "unknown data source 'anthropic'" in msg
    for form in ("'hh'", "'shp:DIR'", "'demo'", ".jsonl", ".parquet", "directory"):
        assert form in msg


@pytest.mark.parametrize(
    "spec, closest",
    [("ultrafedback", "ultrafeedback"), ("HH", "hh"), ("Anthropic/hh-rlhf", "hh"), ("sph", "shp"),
     ("ultrafedback:/data/uf", "ultrafeedback:/data/uf"), ("nothing_like_it", None)],
)  # fmt: skip
def test_a_spec_that_is_no_name_and_no_path_names_the_known_names(tmp_path, monkeypatch, spec, closest):
    """The known names are looked at before the filesystem: a mistyped name is told the names, the
    closest one, and that no local file or directory of that name exists either; the fingerprint
    (which looks for the files first of all) says the same."""
    from dpo_ds.config import load_config
    from dpo_ds.data.cache import fingerprint
    from dpo_ds.model.files import SHIPPED_MODELS

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"datasets=[{spec}]"])
    for attempt in (
        lambda: load_source(spec, "train"),
        lambda: fingerprint(cfg, SHIPPED_MODELS["tiny"], False),
    ):
        with pytest.raises(DataError) as err:
            attempt()
        msg = str(err.value)
        assert f"unknown data source {spec!r}" in msg
        assert "hh, shp, se, ultrafeedback, demo" in msg
        assert (f"did you mean {closest!r}?" in msg) == (closest is not None), msg
        assert f"no local file or directory {tmp_path / spec} exists" in msg


def test_two_names_in_one_spec_are_told_to_be_a_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"several sources are a list: datasets=\[hh,shp\]"):
        load_source("hh,shp", "train")


def test_a_file_without_a_data_suffix_is_named(tmp_path):
    (tmp_path / "rows.txt").write_text("{}\n")
    with pytest.raises(DataError, match=r"rows.txt exists, but a data file ends \.jsonl"):
        load_source(str(tmp_path / "rows.txt"), "train")


def test_bad_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_source("hh", "validation")


def test_hub_offline_fails_fast_with_a_clear_error(cache, monkeypatch):
    # the env var is read when datasets / huggingface_hub are imported, which may already have happened
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_source("hh", "train", cache_dir=cache)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "'Anthropic/hh-rlhf'" in msg and "offline" in msg and "'hh:DIR'" in msg


# ---------------------------------------------------------------------------------------------
# files that cannot be read: the file, the line, the row


def test_malformed_jsonl_line_names_file_and_row(tmp_path, cache):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "P", "chosen": "c", "rejected": "r"})
    path.write_text(good + "\n" + good + "\n" + '{"prompt": "Q", "chosen": "c" "rejected": "r"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: line 3 \(row 2, 0-based\) is not valid JSON"):
        load_source(str(path), "train", cache_dir=cache)


def test_invalid_utf8_names_file_and_row(tmp_path, cache):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "P", "chosen": "c", "rejected": "r"}).encode()
    path.write_bytes(good + b"\n\n" + b'{"prompt": "Q\xff\xfe", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: line 3 \(row 1, 0-based\) is not valid UTF-8"):
        load_source(str(path), "train", cache_dir=cache)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file_says_empty(tmp_path, cache, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"train\.jsonl is empty"):
        load_source(str(path), "train", cache_dir=cache)


def test_json_keyed_by_prompt_loads(tmp_path, cache):
    """The original code's in-memory shape, {prompt: {responses, pairs, sft_target}}, json.dump'ed."""
    data = {
        "Q1?": {"responses": ["a", "b", "c"], "pairs": [[0, 1], [0, 2]], "sft_target": "a"},
        "Q2?": {"responses": ["x", "y"], "pairs": [[1, 0]], "sft_target": "y"},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data, indent=2))
    groups = load_source(str(path), "train", cache_dir=cache)
    assert [(g.prompt, g.responses, g.pairs, g.sft_target) for g in groups] == [
        ("Q1?", ["a", "b", "c"], [(0, 1), (0, 2)], "a"),
        ("Q2?", ["x", "y"], [(1, 0)], "y"),
    ]
    path.write_text(json.dumps({"Q1?": {"responses": ["a"], "sft_target": "a"}}))
    with pytest.raises(DataError, match=r"entry 0 \(prompt 'Q1\?'\): missing \['pairs'\]"):
        load_source(str(path), "train", cache_dir=cache)
