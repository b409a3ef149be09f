"""The bundled demo: 2-digit addition data with a planted SFT mistake, and the shipped model dirs.

The data checks recompute every answer from the prompt, so they hold for whatever seed wrote the
files; the byte-for-byte checks pin the shipped files to `make_data` / `make_assets`.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpo_ds.demo import make_assets, make_data
from dpo_ds.model.files import SHIPPED_MODELS, load_config

SHIPPED_DATA = make_data.OUT


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED_DATA / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[dict]]:
    return {split: _rows(split) for split in ("train", "test")}


def _parse(prompt: str) -> tuple[int, int]:
    # independent of make_data.parse_prompt: "05+38=" -> (5, 38)
    assert len(prompt) == 6 and prompt[2] == "+" and prompt[5] == "=", prompt
    return int(prompt[:2]), int(prompt[3:5])


def _carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def _forgot_carry(a: int, b: int) -> int:
    # tens digits added without the units' carry, units digit kept: 25+99 -> 114, not 124
    return (a // 10 + b // 10) * 10 + (a + b) % 10


# ----------------------------------------------------------------------------- generation


def test_generate_is_deterministic_per_seed():
    a, b = make_data.generate(0), make_data.generate(0)
    assert a == b
    c = make_data.generate(1)
    assert c != a
    # a different seed changes both the split and the planted mistakes, not just their order
    assert {r["prompt"] for r in c["test"]} != {r["prompt"] for r in a["test"]}


def test_write_reproduces_shipped_files(tmp_path):
    make_data.write(make_data.generate(0), tmp_path)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (SHIPPED_DATA / f"{split}.jsonl").read_bytes(), (
            split
        )


# ----------------------------------------------------------------------------- task properties


def test_sizes_and_disjoint_split(shipped):
    train, test = shipped["train"], shipped["test"]
    assert len(train) == 9000 and len(test) == 1000
    train_prompts = {r["prompt"] for r in train}
    test_prompts = {r["prompt"] for r in test}
    assert len(train_prompts) == 9000 and len(test_prompts) == 1000  # no duplicate prompts
    assert not train_prompts & test_prompts
    # together they are every 2-digit addition exactly once
    assert train_prompts | test_prompts == {f"{a:02d}+{b:02d}=" for a in range(100) for b in range(100)}


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_name_the_mistake(shipped, split):
    rows = shipped[split]
    n_carry = 0
    for i, r in enumerate(rows):
        a, b = _parse(r["prompt"])
        carry = _carry(a, b)
        n_carry += carry
        assert r["carry"] is carry, (i, r)
        assert r["pairs"] == [[0, 1]], (i, r)
        chosen, rejected = r["responses"]
        assert chosen == f"{a + b:03d}", (i, r)  # fixed width 3
        if carry:
            assert rejected == f"{_forgot_carry(a, b):03d}", (i, r)
            assert int(rejected) == a + b - 10  # dropping the carry always costs exactly 10
        else:
            assert rejected == f"{a + b + 10:03d}", (i, r)
    assert n_carry / len(rows) == pytest.approx(0.45, abs=0.03)


def test_sft_targets_planted_mistake(shipped):
    wrong_carry = n_carry = 0
    for i, r in enumerate(shipped["train"]):
        a, b = _parse(r["prompt"])
        correct, forgot = f"{a + b:03d}", f"{_forgot_carry(a, b):03d}"
        if _carry(a, b):
            n_carry += 1
            assert r["sft_target"] in (correct, forgot), (i, r)
            wrong_carry += r["sft_target"] == forgot
        else:
            assert r["sft_target"] == correct, (i, r)  # no-carry rows are never wrong
    assert 0.55 <= wrong_carry / n_carry <= 0.65, wrong_carry / n_carry
    for i, r in enumerate(shipped["test"]):
        a, b = _parse(r["prompt"])
        assert r["sft_target"] == f"{a + b:03d}", (i, r)  # held-out targets are the truth


def test_generate_follows_p_wrong():
    # the planted rate is a parameter, not an accident of the shipped seed
    for p in (0.0, 1.0):
        train = make_data.generate(3, p_wrong=p)["train"]
        carry = [r for r in train if r["carry"]]
        wrong = sum(r["sft_target"] != r["responses"][0] for r in carry)
        assert wrong == (len(carry) if p == 1.0 else 0)


# ----------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_model_dirs_load(name):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = SHIPPED_MODELS[name]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    assert config.model_type == ("qwen3_moe" if name == "tiny_moe" else "llama")
    assert config.vocab_size == len(tok)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    # character level: one token per character, decoded back without spaces
    text = "05+38=043\nHuman: hi!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin"))  # no weights shipped

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(load_config(model_dir))
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = lm(input_ids=x).logits
    assert logits.shape == (1, len(ids), config.vocab_size)
    assert torch.isfinite(logits).all()


def test_make_assets_regenerates_shipped_dirs(tmp_path, monkeypatch):
    # main() writes {HERE}/{model,tiny}/ next to its module; point it at a temporary folder instead
    here = make_assets.HERE
    monkeypatch.setattr(make_assets, "HERE", tmp_path)
    make_assets.main()
    for name, shipped_dir in SHIPPED_MODELS.items():
        assert shipped_dir.parent == here  # the shipped dirs are the ones make_assets writes
        fresh = tmp_path / shipped_dir.name
        shipped_files = sorted(p.name for p in shipped_dir.iterdir() if p.is_file())
        assert sorted(p.name for p in fresh.iterdir()) == shipped_files, name
        for f in shipped_files:
            assert (fresh / f).read_bytes() == (shipped_dir / f).read_bytes(), f"{name}/{f}"
