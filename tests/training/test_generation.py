"""Generation at eval through the real launcher (2 CPU ranks, ZeRO-3, a reference engine), on a ChatML
model whose eval prompts (a system turn and a user turn far over max_prompt_length) must be truncated.

Two runs, identical but for eval.gather_for_generation: the whole model gathered once per generation
(hooks off, each rank on its own) against DeepSpeed's per-module gathers (ranks in step). Greedy
samples of the policy and the reference must agree token for token; every sampled prompt must be a
conversation the template rendered, not a cut through its headers.
"""

from __future__ import annotations

import json
import re

import pytest

from dpo_ds.demo.tokenizers import build_model_dir
from tests.launch import ROOT, check, metrics, run_train

pytestmark = pytest.mark.integration

ROLE_HEADER = re.compile(r"<\|im_start\|>(system|user|assistant)\n")


def _rows(n: int, offset: int) -> list[dict]:
    rows = []
    for k in range(offset, offset + n):
        long_user = f"Document {k}: " + " ".join(
            f"line {j} of a pasted text about item {k}." for j in range(30)
        )
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": "You summarise."},
                    {"role": "user", "content": long_user},
                ],
                "chosen": [{"role": "assistant", "content": f"Item {k}."}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = build_model_dir("chatml", root / "model")
    for split, (n, offset) in {"train": (16, 0), "test": (8, 100)}.items():
        path = root / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, offset)))
    return root, model


def _run(root, model, gather: str):
    run_dir = root / f"run-{gather}"
    proc = check(
        run_train(
            "--ds",
            str(ROOT / "ds_configs/zero3.json"),
            "loss=dpo",
            f"model.name_or_path={model}",
            "model.init=random",
            f"datasets=[{root / 'data'}]",
            f"run_dir={run_dir}",
            "batch_size=8",
            "eval_batch_size=8",
            "n_eval_examples=8",
            "max_length=64",
            "max_prompt_length=40",
            "lr=1e-3",
            "warmup_steps=0",
            "n_epochs=1",
            "eval_every=8",
            "sample_during_eval=true",
            "n_eval_model_samples=5",  # not a multiple of the ranks: rank 1 pads its share
            "max_new_tokens=6",
            f"eval.gather_for_generation={gather}",
        )
    )
    return run_dir, proc.stdout + proc.stderr


def test_gathered_generation_equals_per_module_generation(setup):
    root, model = setup
    (gathered, log_g), (sharded, log_s) = _run(root, model, "true"), _run(root, model, "false")
    assert "generation (reference): the whole model gathered for it" in log_g
    assert "generation (policy): the whole model gathered for it" in log_g
    assert "generation (reference): per-module ZeRO-3 gathers" in log_s
    a = [json.loads(line) for line in (gathered / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (sharded / "samples.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 5 * 3  # evals at steps 0, 1 and 2
    assert a == b  # policy and reference, token for token
    assert any(s["policy"] != s["reference"] for s in a if s["step"] > 0)  # training moved the policy
    _, evals = metrics(gathered)
    assert all(e["eval/sample_seconds"] > 0 for e in evals)


def test_truncated_eval_prompts_are_rendered_conversations(setup):
    root, model = setup
    run_dir, log = root / "run-true", ""
    if not (run_dir / "samples.jsonl").exists():
        run_dir, log = _run(root, model, "true")
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        p = s["prompt"]
        assert p.startswith("<|im_start|>system\nYou summarise.<|im_end|>\n<|im_start|>user\n"), p
        assert p.endswith("<|im_end|>\n<|im_start|>assistant\n"), p
        assert p.count("<|im_start|>") == len(ROLE_HEADER.findall(p)) == 3, p  # every one opens a role
        # keep_end: the user text's end stays (its start is cut), within max_prompt_length
        assert (
            re.search(r"about item 1\d\d\.<\|im_end\|>\n<\|im_start\|>assistant\n$", p)
            and "Document" not in p
        )
