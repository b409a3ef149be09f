"""The token cache through the real launcher (2 CPU ranks): built by both ranks from a mix of
conversational and plain-text sources, its ids equal the old path's (Tokenization.tokenize on every
example, in this process); train.py then maps it without reading the sources and trains the same
steps as the run that built it; a bad row in rank 1's share stops both ranks naming it."""

from __future__ import annotations

import json

import pytest

from dpo_ds.demo.tokenizers import build_model_dir
from tests.launch import ROOT, deepspeed_cmd, env, metrics, run_many, run_train

pytestmark = pytest.mark.integration


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    model = build_model_dir("chatml", root / "model")
    for split, n in (("train", 24), ("test", 8)):
        conv = [
            {"prompt": [{"role": "user", "content": f"Say word {k} " * (1 + k % 5)}],
             "chosen": [{"role": "assistant", "content": f"word {k}"}],
             "rejected": [{"role": "assistant", "content": "no"}]}
            for k in range(n)
        ]  # fmt: skip
        plain = [
            {"prompt": f"{k} plus {k} is", "chosen": f" {2 * k}", "rejected": f" {2 * k + 1}"}
            for k in range(n)
        ]
        _write(root / "conv" / f"{split}.jsonl", conv)
        _write(root / "plain" / f"{split}.jsonl", plain)
    return root, model


def _args(root, model, run_dir, *extra):
    return [
        "--ds", str(ROOT / "ds_configs/zero3.json"), "loss=dpo", f"model.name_or_path={model}", "model.init=random",
        f"datasets=[{root / 'conv'},{root / 'plain'}]", f"run_dir={run_dir}", f"data.cache_dir={root / 'cache'}",
        "batch_size=8", "eval_batch_size=8", "n_eval_examples=8", "max_length=48", "max_prompt_length=24",
        "lr=1e-3", "warmup_steps=0", "do_first_eval=false", "eval_every=100000", *extra,
    ]  # fmt: skip


def test_two_ranks_build_one_cache_with_the_old_paths_ids(setup):
    import subprocess

    from dpo_ds.config import load_config
    from dpo_ds.data import cache
    from dpo_ds.data.batches import flatten
    from dpo_ds.data.prepare import tokenization_of
    from dpo_ds.data.sources import load_sources
    from dpo_ds.model.files import load_tokenizer

    root, model = setup
    args = _args(root, model, root / "prep")[2:]  # the config keys, without --ds
    proc = subprocess.run(deepspeed_cmd(*args, ranks=2, module="dpo_ds.cli.prepare"), env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    results = [
        json.loads(x.split("DPO_DS_PREPARE ", 1)[1])
        for x in proc.stdout.splitlines()
        if "DPO_DS_PREPARE " in x
    ]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["built"] for r in results)
    assert "conversations rendered by the chat template" in out and "plain-text prompts" in out
    (path,) = [p for p in (root / "cache").iterdir() if p.name.startswith("tokens-")]
    manifest = json.loads((path / cache.MANIFEST).read_text())
    assert manifest["shards"]["train"] == ["train-00000-of-00002.arrow", "train-00001-of-00002.arrow"]
    stores = cache._map(path, manifest)
    # the old path, in this process: every example through Tokenization.tokenize
    cfg = load_config(None, args)
    rules = tokenization_of(cfg, load_tokenizer(model))
    for split in ("train", "test"):
        examples = flatten(load_sources(cfg.datasets, split), sft=False)
        assert len(stores[split]) == len(examples) == (48 if split == "train" else 16)
        for i, ex in enumerate(examples):
            want = rules.tokenize(ex.prompt, ex.responses, ex.truncation_mode, ex.origins)
            got = stores[split].seqs(i)
            assert [(s.input_ids, s.labels) for s in got] == [(s.input_ids, s.labels) for s in want], (
                split,
                i,
            )
    # what tokenization counted, said once as the two ranks' sum: the same lines as this process's count
    # of every example; and the data report, by rank 0 alone, in the run dir
    assert manifest["info"]["summary"] == rules.summary() and rules.summary()
    for line in rules.summary():
        assert out.count(line) == 1, (line, out[-3000:])
    report = json.loads((root / "prep" / "data_report.json").read_text())
    assert [report["total"][s]["examples"] for s in ("train", "test")] == [48, 16]
    assert [report["sources"][str(root / d)]["train"]["examples"] for d in ("conv", "plain")] == [24, 24]
    assert out.count("data report: preference pairs") == 1


@pytest.mark.parametrize(
    "layout", ["shared_prompt"]
)  # every layout batches a store alike: test_token_cache.py
def test_a_relaunch_maps_the_cache_and_trains_the_same_steps(setup, layout):
    root, model = setup
    extra = [f"data.layout={layout}"] + (["data.max_tokens_per_micro_batch=96"] if layout != "padded" else [])
    first, again = root / f"first-{layout}", root / f"again-{layout}"
    # two runs one after the other, each as a fresh launch's ranks (tests/multirun.py)
    logs = run_many(root / f"logs-{layout}", {"first": _args(root, model, first, *extra),
                                              "again": _args(root, model, again, *extra)})  # fmt: skip
    assert "mapped (fingerprint matches; the sources were not read)" in logs["again"]
    a, b = metrics(first)[0], metrics(again)[0]
    assert [r["loss/train"] for r in a] == [r["loss/train"] for r in b] and len(a) == 6


def test_a_bad_row_in_rank_1s_share_stops_both_ranks(setup, tmp_path):
    root, model = setup
    bad = tmp_path / "bad"
    rows = [
        {"prompt": f"{k} plus {k} is", "chosen": f" {2 * k}", "rejected": f" {2 * k + 1}"} for k in range(24)
    ]
    rows[20]["chosen"] = "ends <|im_end|> early"  # rows 12-23 are rank 1's: a special token in the text
    _write(bad / "train.jsonl", rows)
    _write(bad / "test.jsonl", rows[:8])
    args = _args(root, model, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}")
    args[args.index(f"datasets=[{root / 'conv'},{root / 'plain'}]")] = f"datasets=[{bad}]"
    proc = run_train(*args, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count(f"dpo_ds: error: {bad / 'train.jsonl'} row 20 (0-based), field 'chosen'") == 2, out[
        -3000:
    ]
    assert not list((tmp_path / "cache").glob("tokens-*"))  # nothing half-built is left to be found
