"""`python -m dpo_ds.cli.prepare` (what `dpo-ds prepare` runs) on the shipped demo data, one process
without a launcher: it builds the token cache, prints the data report as a table and writes its JSON
into the run dir the same config trains into."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launch import DEMO, single_process_env


def test_prepare_reports_the_demo_data(tmp_path):
    run = tmp_path / "run"
    keys = [
        "datasets=[demo]",
        "model.name_or_path=demo",
        "max_length=16",
        "max_prompt_length=8",
        f"run_dir={run}",
    ]
    proc = subprocess.run([sys.executable, "-m", "dpo_ds.cli.prepare", *keys], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=single_process_env(OMP_NUM_THREADS="1"))  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("DPO_DS_PREPARE ")]
    result = json.loads(line.split(" ", 1)[1])
    assert result["report"] == str(run / "data_report.json")
    report = json.loads((run / "data_report.json").read_text())
    # counted here from the shipped files: every row of the original format, its pairs
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (DEMO / f"{split}.jsonl").read_text().splitlines()]
        pairs = sum(len(r["pairs"]) for r in rows)
        prompts = {r["prompt"] for r in rows}
        total = report["total"][split]
        assert (total["rows"], total["pairs"], total["examples"], total["prompts"]) == (
            len(rows),
            pairs,
            pairs,
            len(prompts),
        )
        assert report["sources"]["demo"][split] == total  # one source: it is the total
    assert "data report: preference pairs, max_length 16, max_prompt_length 8" in out
    assert f"(the data report, written to {run / 'data_report.json'})" in out
    assert "tokenizing train:" not in out  # a share of seconds logs no progress
