"""The planner outside its own bench: configurations that share neither model shape nor data with
bench/memory.py's rows (bench/plan_check.py --section outside runs them; tolerance -10% / +25% of the measured peak).

Models (config.json only; dpo_ds initialises the weights from the seed):
    m11    an 11.4M Llama: hidden 384, 6 layers, 6 heads of 64, MLP 1024, vocab 1024, the character tokenizer
    smol   SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads of 64, 3 KV heads, MLP 1536, tied embeddings,
           and a 49,152-entry ChatML byte-level BPE trained here on Python's own documentation and sources
    w8k    hidden 256, 4 layers, 8 heads of 32, MLP 768, an 8,192-entry BPE (untied)
    h128   hidden 512, 4 layers, 4 heads of 128, 2 KV heads, MLP 1408, an 8,192-entry BPE
Data (built here, nothing downloaded):
    letters  flat rows, prompts of 40-120 characters and responses of 100-400 (character tokens), so sequences
             up to ~512 tokens
    uf       UltraFeedback-binarized-shaped conversations (bench/data_prep.py's generator: English words,
             prompts of 40-200 words, answers of 50-350), rendered by the model's chat template
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# key -> (name, model, data, ranks, DeepSpeed JSON, steps, overrides)
ROWS = [
    ("o1", "m11 packed <=512 tokens, ZeRO-3, reference engine, batch 8", "m11", "letters", 2, "zero3", 3,
     ["data.layout=packed", "batch_size=8", "max_length=512", "max_prompt_length=128"]),
    ("o2", "smol (49k BPE data) LoRA r=16, packed, max_length 256, batch 8", "smol", "uf", 2, "zero3", 3,
     ["data.layout=packed", "model.lora.r=16", "batch_size=8", "max_length=256", "max_prompt_length=128"]),
    ("o3", "m11 as o1 with sequence parallelism 2", "m11", "letters", 2, "zero3", 3,
     ["data.layout=packed", "batch_size=8", "max_length=512", "max_prompt_length=128",
      "parallel.sequence_parallel_size=2"]),
    ("o4", "w8k ZeRO-2, padded, max_length 384, batch 8", "w8k", "uf", 2, "zero2", 3,
     ["data.layout=padded", "batch_size=8", "max_length=384", "max_prompt_length=128"]),
    ("o5", "h128 bf16 policy and reference, shared_prompt, ZeRO-3, max_length 256", "h128", "uf", 2, "zero3", 3,
     ["data.layout=shared_prompt", "batch_size=8", "max_length=256", "max_prompt_length=128",
      "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]),
    ("o6", "w8k checkpointing, fused_linear, precomputed reference, packed, max_length 512", "w8k", "uf", 2,
     "zero3", 3, ["data.layout=packed", "batch_size=8", "max_length=512", "max_prompt_length=128",
                  "model.gradient_checkpointing=true", "model.logprob_impl=fused_linear",
                  "model.reference_mode=precomputed"]),
    ("o7", "m11 eager attention (its scores kept), padded <=512 tokens, ZeRO-3, reference engine", "m11", "letters",
     2, "zero3", 3, ["data.layout=padded", "model.attn_implementation=eager", "batch_size=8", "max_length=512",
                     "max_prompt_length=128"]),
]  # fmt: skip

# model -> (hidden, layers, heads, kv heads, head dim, MLP, vocab, tokenizer, tied)
MODELS = {
    "m11": (384, 6, 6, 6, 64, 1024, 1024, "char", False),
    "smol": (576, 30, 9, 3, 64, 1536, 49152, "chatml", True),
    "w8k": (256, 4, 8, 8, 32, 768, 8192, "chatml", False),
    "h128": (512, 4, 4, 2, 128, 1408, 8192, "chatml", False),
}
ROWS_OF_DATA = 200  # train rows of each data set; the planner reads them all (dpo-ds plan --data-sample 200)
QUICK = {  # --quick: the same code paths at a fraction of the size (a smoke, not the figures)
    "smol": (128, 2, 4, 2, 32, 256, 4096, "chatml", True),
}


def build_model(out: Path, name: str, quick: bool = False) -> Path:
    from transformers import AutoTokenizer

    from dpo_ds.demo.make_assets import char_model_dir, llama_config

    hidden, layers, heads, kv, head_dim, inter, vocab, tok, tied = (QUICK if quick else {}).get(
        name, MODELS[name]
    )
    shape = dict(
        hidden=hidden, layers=layers, heads=heads, intermediate=inter, head_dim=head_dim, max_positions=4096
    )
    if tok == "char":
        char_model_dir(out, vocab=vocab, **shape)
    else:
        from bench.data_prep import corpus
        from dpo_ds.demo.tokenizers import build_tokenizer

        build_tokenizer("chatml", out, vocab_size=vocab, corpus=corpus())
        t = AutoTokenizer.from_pretrained(str(out))
        ids = dict(bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id)
        llama_config(vocab=max(vocab, len(t)), **ids, **shape).save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(num_key_value_heads=kv, tie_word_embeddings=tied)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_data(out: Path, kind: str, n: int, seed: int = 0) -> Path:
    if kind == "uf":
        from bench.data_prep import make_data

        make_data(out, n, seed=seed)
        return out
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    out.mkdir(parents=True)
    for split, rows in (("train", n), ("test", 8)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(rows):

                def text(lo, hi):
                    return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))

                f.write(json.dumps({"prompt": f"p{i:05d} " + text(40, 120), "chosen": text(100, 400),
                                    "rejected": text(100, 400)}) + "\n")  # fmt: skip
    return out


def specs(quick: bool = False) -> list[dict]:
    """memory.train_row's specs: the row's overrides after memory.row_overrides' defaults (the last value of a
    key wins), its model and data named by the keys of MODELS and build_data; each planned from its data as
    `dpo-ds plan --data-sample` plans it."""
    out = []
    for key, name, model, data, ranks, ds, steps, overrides in ROWS:
        batch = next(int(o.split("=")[1]) for o in overrides if o.startswith("batch_size="))
        out.append({"key": key, "name": name, "ranks": ranks, "ds": ds, "steps": steps, "long": False,
                    "model_key": model, "data_key": data, "data_sample": ROWS_OF_DATA,
                    "overrides": [*overrides, f"n_examples={batch * steps}"]})  # fmt: skip
    return out
