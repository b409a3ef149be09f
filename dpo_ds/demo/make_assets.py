"""Build the shipped model directories: a character-level HF tokenizer and tiny Llama configs.

    python -m dpo_ds.demo.make_assets        # rewrites dpo_ds/demo/{model,tiny}/

No downloads: the tokenizer is a `tokenizers` WordLevel model over printable ASCII, one token per
character, saved as a standard tokenizer.json that AutoTokenizer loads. Like Llama's, it puts <s>
in front of a text by default (`tokenizer(text)`), which is the rule dpo_ds follows for BOS. Weights are not shipped;
dpo_ds initialises them from config.json with the run's seed.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable + newline


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()  # join characters back without spaces
    bos = vocab["<s>"]
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_config(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    bos: int | None,
    eos: int | None,
    pad: int | None,
    max_positions: int = 1024,
    head_dim: int | None = None,
):
    """A LlamaConfig with untied embeddings and no dropout (the demo's, the tests' and the benches'
    models; the weights come from the run's seed)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def char_model_dir(out: Path, *, vocab: int | None = None, **shape):
    """`out`: the shipped character tokenizer (dpo_ds/demo/model) and a llama_config of `shape`
    (hidden, layers, heads, intermediate, max_positions...) with its special ids; `vocab` may exceed the
    tokenizer's (the benches' 32k-vocab models). No weights. Returns the config."""
    import shutil

    src = HERE / "model"
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    base = json.loads((src / "config.json").read_text())
    ids = dict(bos=base["bos_token_id"], eos=base["eos_token_id"], pad=base["pad_token_id"])
    cfg = llama_config(vocab=vocab or base["vocab_size"], **ids, **shape)
    cfg.save_pretrained(str(out))
    return cfg


def tiny_moe_config(*, vocab: int, bos: int | None, eos: int | None, pad: int | None):
    """The shipped tiny_moe: a Qwen3-MoE of 8 experts, top-2, with tiny's width (docs/training/moe.md)."""
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )  # fmt: skip
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return cfg


def main() -> None:
    tok = build_tokenizer()
    specs = {"model": (128, 2, 4, 512), "tiny": (64, 2, 4, 128), "tiny_moe": None}
    for name, shape in specs.items():
        out = HERE / name
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out))
        ids = dict(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
        if shape is None:
            cfg = tiny_moe_config(vocab=len(tok), **ids)
        else:
            hidden, layers, heads, inter = shape
            cfg = llama_config(
                vocab=len(tok), hidden=hidden, layers=layers, heads=heads, intermediate=inter, **ids
            )
        cfg.save_pretrained(str(out))
        # keep the directory byte-stable across runs: drop the version stamp transformers writes
        cfg_path = out / "config.json"
        saved = json.loads(cfg_path.read_text())
        saved.pop("transformers_version", None)
        cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
