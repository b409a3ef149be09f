"""A chat model on conversational data through the real launcher (2 CPU ranks, ZeRO-3): SFT on
`messages` rows, then DPO on TRL-shaped conversations from its checkpoint, with samples at eval.

The model directory is a tiny Llama around the ChatML byte-level BPE tokenizer (bos <|im_start|>,
eos <|im_end|>): the kind of tokenizer for which dpo_ds used to prepend <|im_start|> to every prompt.
"""

from __future__ import annotations

import json
import math

import pytest

from dpo_ds.demo.tokenizers import build_model_dir
from tests.launch import ROOT, metrics, run_many

pytestmark = pytest.mark.integration

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


def _conversations(n: int, offset: int) -> tuple[list[dict], list[dict]]:
    """(TRL preference rows, `messages` SFT rows): repeat a word, optionally under a system prompt."""
    prefs, chats = [], []
    for k in range(offset, offset + n):
        word, other = WORDS[k % len(WORDS)], WORDS[(k + 3) % len(WORDS)]
        turns = [{"role": "user", "content": f"Say {word} {k}."}]
        if k % 2:
            turns = [{"role": "system", "content": "Answer with one word."}] + turns
        answer = {"role": "assistant", "content": word}
        prefs.append(
            {"prompt": turns, "chosen": [answer], "rejected": [{"role": "assistant", "content": other}]}
        )
        chats.append({"messages": turns + [answer]})
    return prefs, chats


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_then_dpo_on_conversations(tmp_path):
    model = build_model_dir("chatml", tmp_path / "model")
    for split, (n, offset) in {"train": (48, 0), "test": (16, 1000)}.items():
        prefs, chats = _conversations(n, offset)
        _write(tmp_path / "prefs" / f"{split}.jsonl", prefs)
        _write(tmp_path / "chats" / f"{split}.jsonl", chats)
    common = [
        "--ds",
        str(ROOT / "ds_configs/zero3.json"),
        f"model.name_or_path={model}",
        "batch_size=8",
        "eval_batch_size=8",
        "n_eval_examples=16",
        "max_length=64",
        "max_prompt_length=48",
        "warmup_steps=0",
    ]
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft_args = [
        *common,
        "loss=sft",
        "model.init=random",  # the model dir has a config and a tokenizer, no weights
        "loss.sft_normalize=token",
        f"datasets=[{tmp_path / 'chats'}]",
        f"run_dir={sft_dir}",
        "lr=3e-3",
        "n_epochs=2",
        "do_first_eval=false",
    ]
    dpo_args = [
        *common,
        "loss=dpo",
        f"datasets=[{tmp_path / 'prefs'}]",
        f"run_dir={dpo_dir}",
        f"model.archive={sft_dir / 'LATEST' / 'policy.pt'}",
        "lr=1e-3",
        "n_epochs=2",
        "eval_every=48",
        "sample_during_eval=true",
        "n_eval_model_samples=2",
        "max_new_tokens=4",
    ]
    run_many(tmp_path / "logs", {"sft": sft_args, "dpo": dpo_args})  # one launcher run, SFT then DPO
    sft_train, _ = metrics(sft_dir)
    assert sft_train[-1]["loss/train"] < sft_train[0]["loss/train"]
    # per-token SFT loss of a random model: about ln(vocab) per token, not a sum over ~10 tokens
    assert sft_train[0]["loss/train"] == pytest.approx(math.log(1024), rel=0.15)

    train, evals = metrics(dpo_dir)
    assert (
        abs(evals[0]["loss/eval"] - math.log(2)) < 1e-5 and abs(train[0]["loss/train"] - math.log(2)) < 1e-5
    )
    assert train[-1]["loss/train"] < math.log(2)
    samples = [json.loads(line) for line in (dpo_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * len(evals)
    for s in samples:
        # the prompt the policy generated from is the chat template's, ending with the assistant
        # header, and starts with exactly one <|im_start|> (not an extra one in front of the turn)
        assert s["prompt"].startswith("<|im_start|>system\n") or s["prompt"].startswith("<|im_start|>user\n")
        assert s["prompt"].endswith("<|im_start|>assistant\n")
        assert "<|im_start|>" not in s["policy"] and "<|im_end|>" not in s["policy"]
