"""The docs' own checks: the history check finds hashes and dating words, the block runner finds blocks
and refuses a not-run marker on anything but GPU training and export lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.scripts import script

ROOT = Path(__file__).resolve().parents[2]


check_docs = script("check_docs")
doc_blocks = script("doc_blocks")


@pytest.mark.parametrize(
    "line, word",
    [
        ("measured at 1.35x last session", "last session"),
        ("the clean clone of aba4e85 gave", "aba4e85"),
        ("the step count was 38 before", "was 38"),
        ("it used to leave the ranks hanging", "used to leave"),
        ("measured before this change", "before this change"),
        ("the check no longer runs", "no longer"),
    ],
)
def test_history_and_hashes_are_found(line, word):
    assert [w for _, w in check_docs.hits(f"intro\n{line}\n")] == [word]
    assert check_docs.hits(f"intro\n{line}\n")[0][0] == 2


@pytest.mark.parametrize(
    "line",
    [
        "the loss is 0.6931 at step 0 (ln 2)",
        "`--ds zero3` with `model.lora.r=16`, 8 x 80 GB, 2026-12-06",
        "a tensor of shape (batch, 4096) in bfloat16; the file dead_end5.md",
        "ids such as 1a2b3 are too short to be hashes",
    ],
)
def test_plain_prose_passes(line):
    assert check_docs.hits(line) == []


def test_a_data_line_may_hold_a_hash():
    line = "| weights | 3f9a1c0e2b7d4a6f | <!-- history-check: data -->"
    assert check_docs.hits(line) == []
    assert check_docs.hits(line.replace("<!-- history-check: data -->", "")) != []


def test_the_shipped_docs_have_no_history():
    assert check_docs.main([str(p) for p in check_docs.doc_files()]) == 0


DOC = """# Title

```bash
pip install .
dpo-ds plan --config llama3_8b_full_dpo \\
    --gpus 8   # will it fit?
```

<!-- not-run: needs 8 GPUs (and the model's weights) -->
```bash
dpo-ds train --gpus 8 --config llama3_8b_full_dpo
dpo-ds export runs/x out
```

```python
print("not a shell block")
```
"""


def test_blocks_are_found_with_their_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    (tmp_path / "doc.md").write_text(DOC)
    blocks = doc_blocks.blocks_of(tmp_path / "doc.md")
    assert [(b.line, b.not_run) for b in blocks] == [
        (3, None),
        (10, "needs 8 GPUs (and the model's weights)"),
    ]
    assert blocks[0].commands == ["pip install .", "dpo-ds plan --config llama3_8b_full_dpo --gpus 8"]
    assert doc_blocks.misused_markers(blocks) == []


def test_a_not_run_marker_on_a_cpu_command_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    (tmp_path / "doc.md").write_text(DOC.replace("dpo-ds export runs/x out", "dpo-ds plan --config demo_dpo"))
    bad = doc_blocks.misused_markers(doc_blocks.blocks_of(tmp_path / "doc.md"))
    assert len(bad) == 1 and "dpo-ds plan --config demo_dpo" in bad[0] and "doc.md:10" in bad[0]


def test_a_failing_block_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    (tmp_path / "doc.md").write_text("```bash\necho one > out.txt\nfalse\necho two >> out.txt\n```\n")
    blocks = doc_blocks.blocks_of(tmp_path / "doc.md")
    assert doc_blocks.run(blocks, tmp_path) != 0
    assert (tmp_path / "out.txt").read_text() == "one\n"


def test_a_marked_block_is_announced_not_run(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    (tmp_path / "doc.md").write_text(
        DOC.replace("dpo-ds plan", "echo dpo-ds plan").replace("pip install .", "true")
    )
    assert doc_blocks.run(doc_blocks.blocks_of(tmp_path / "doc.md"), tmp_path) == 0
    out = capfd.readouterr().out
    assert "doc.md:10: not run (needs 8 GPUs (and the model's weights))" in out
    assert "dpo-ds plan --config llama3_8b_full_dpo --gpus 8" in out and "every block ran" in out


def test_a_not_run_block_may_not_chain_another_command(tmp_path, monkeypatch):
    monkeypatch.setattr(doc_blocks, "REPO", tmp_path)
    text = "<!-- not-run: GPUs -->\n```bash\nNCCL_DEBUG=INFO dpo-ds train --gpus 8 && rm -rf runs\n```\n"
    (tmp_path / "doc.md").write_text(text)
    assert len(doc_blocks.misused_markers(doc_blocks.blocks_of(tmp_path / "doc.md"))) == 1
    (tmp_path / "doc.md").write_text(text.replace(" && rm -rf runs", ""))  # a variable before it is fine
    assert doc_blocks.misused_markers(doc_blocks.blocks_of(tmp_path / "doc.md")) == []


def test_a_fence_closes_only_on_a_bare_fence_line():
    lines = ["````markdown", "```python", "x = 1", "```", "````", "```bash", "echo", "```"]
    assert list(doc_blocks.fenced(lines)) == [("markdown", 0, 4), ("bash", 5, 7)]
