"""Three kinds of real-world tokenizer, built offline in about a second each, with tiny Llama model
directories around them: what tests (and benches) use to check dpo_ds against the rules of the
tokenizers our users train with.

    chatml  byte-level BPE, ChatML template; bos_token <|im_start|>, eos_token <|im_end|>, and
            tokenizer(text) adds nothing (like SmolLM / Qwen instruct tokenizers).
    llama   SentencePiece BPE (trained with sentencepiece, converted by transformers from
            tokenizer.model as a Llama-2 checkpoint's is), Llama-2 chat template; tokenizer(text) puts
            <s> in front; the template writes <s> and </s> itself.
    gpt2    byte-level BPE whose one special token <|endoftext|> is bos, eos and unk at once
            (GPT-2 / Pythia); tokenizer(text) adds nothing; a template that ends turns with EOS.

The text they are trained on is Python's own documentation (pydoc_data.topics, ~465K characters),
which every Python installation has.

    python -m dpo_ds.demo.tokenizers OUT_DIR      # writes OUT_DIR/{chatml,llama,gpt2}/
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

KINDS = ("chatml", "llama", "gpt2")

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-2 chat: every user turn opens with <s>[INST], the system prompt sits inside the first one,
# every assistant turn closes with </s>.
LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + ' ' + eos_token }}"
    "{%- else %}{{- raise_exception('roles must be system (first), user or assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# GPT-2 has no template of its own; this one (Zephyr-like) ends every turn with the EOS token.
GPT2_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def _corpus() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def _byte_bpe(specials: list[str], vocab_size: int, corpus=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus if corpus is not None else _corpus(), trainer)
    return core


def build_tokenizer(kind: str, out: Path, vocab_size: int = 1024, corpus=None) -> Path:
    """Write a tokenizer of `kind` to `out` (created) and return `out`. corpus: texts to train the byte-level
    BPE kinds on (default: Python's documentation topics, enough for ~1-2k merges)."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    if kind == "chatml":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size, corpus),
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
        tok.chat_template = CHATML_TEMPLATE
        tok.save_pretrained(str(out))
    elif kind == "gpt2":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_byte_bpe(["<|endoftext|>"], vocab_size, corpus),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
        tok.chat_template = GPT2_TEMPLATE
        tok.save_pretrained(str(out))
    elif kind == "llama":
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus()),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,
            split_digits=True,
            max_sentence_length=1 << 20,
            minloglevel=2,
        )
        (out / "tokenizer.model").write_bytes(model.getvalue())
        # as a Llama-2 checkpoint ships it: AutoTokenizer converts tokenizer.model on load
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": LLAMA2_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return out


def build_model_dir(kind: str, out: Path, hidden: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """A tiny Llama model directory (config.json + the tokenizer of `kind`, no weights: dpo_ds
    initialises them from the seed), loadable as model.name_or_path."""
    from transformers import AutoTokenizer

    from dpo_ds.demo.make_assets import llama_config

    build_tokenizer(kind, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = llama_config(
        vocab=len(tok),
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=2 * hidden,
        max_positions=2048,
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=pad,
    )
    cfg.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for kind in KINDS:
        print(build_model_dir(kind, Path(argv[0]) / kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
