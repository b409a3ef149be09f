"""Model directories: shipped models, weight files and their shards, tokenizers, HF configs.

No deepspeed here: engine/build.py decides how a model is built (zero.Init or not) and wrapped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parent.parent  # dpo_ds/
# Model directories that ship with the package: standard HF directories (config.json + tokenizer
# files) without weights; weights are initialised from the config with the run's seed.
SHIPPED_MODELS = {
    "demo": PACKAGE / "demo" / "model",
    "tiny": PACKAGE / "demo" / "tiny",
    "tiny_moe": PACKAGE / "demo" / "tiny_moe",  # a Qwen3-MoE of 8 experts, top-2 (docs/training/moe.md)
}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model directory or archive that cannot be used; the message names the path or key."""


def resolve_model_dir(name_or_path: str) -> Path:
    if name_or_path in SHIPPED_MODELS:
        return SHIPPED_MODELS[name_or_path]
    path = Path(name_or_path)
    if not path.is_dir() and hub_id(name_or_path):
        path = hub_cached(name_or_path) or path
    if not path.is_dir():
        how = (
            f"`hf download {name_or_path}` puts it in the hub cache, where dpo_ds finds it by this id"
            if hub_id(name_or_path)
            else "fetch one with `hf download REPO --local-dir DIR` first"
        )
        raise ModelError(
            f"model.name_or_path={name_or_path!r} is not a directory{' nor in the hub cache' if hub_id(name_or_path) else ''}; "
            f"dpo_ds reads local Hugging Face model directories, hub ids already downloaded, or one of "
            f"{sorted(SHIPPED_MODELS)} ({how}; nothing is downloaded at run time)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path={name_or_path!r}: {path / 'config.json'} is missing")
    return path


def hub_id(name: str) -> bool:
    """`org/name`, as the hub names repositories (not a path that exists)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(name).exists()


def hub_cached(repo_id: str, cache_dir: str | None = None) -> Path | None:
    """The hub cache's snapshot of a model repository (`hf download REPO` put it there), or None. Never
    downloads: every rank must see the same files, so fetching is the user's step before the launch."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({f for p in WEIGHT_PATTERNS for f in model_dir.glob(p)})


def has_weights(model_dir: Path) -> bool:
    return bool(weight_files(model_dir))


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def missing_shards(model_dir: Path) -> list[str]:
    """Shard files a weight index names that are not in the directory (an interrupted download)."""
    import json

    missing = []
    for name in WEIGHT_INDEXES:
        index = model_dir / name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(
                f"{index}: not a weight index with a 'weight_map' ({type(e).__name__}: {e})"
            ) from None
        missing += [s for s in shards if not (model_dir / s).is_file()]
    return missing


def start_from_weights(model_dir: Path, init: str, archive: str | None) -> bool:
    """Whether the models load the directory's own weights (else the archive's, or a seeded init).

    Training from random weights must be asked for (model.init=random), or be one of the shipped
    demo configs, which are seeded by design: a directory with config.json and a tokenizer but no
    weights (an interrupted download) would otherwise train from noise without a word."""
    if archive is not None or init == "random":
        return False
    if model_dir in SHIPPED_MODELS.values():
        return False  # demo / tiny: configs without weights, initialised from the seed
    missing = missing_shards(model_dir)
    if missing:
        raise ModelError(
            f"model.name_or_path={model_dir}: its weight index names {len(missing)} shard(s) that are not there: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; finish the download"
        )
    if not has_weights(model_dir):
        raise ModelError(
            f"model.name_or_path={model_dir} holds no weights (no {', '.join(WEIGHT_PATTERNS)}): an "
            f"interrupted download? Fetch them, give model.archive=..., or set model.init=random to train "
            f"from a random initialisation on purpose"
        )
    return True


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer in {model_dir} has no eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, any id will do
    return tok


def load_config(model_dir: Path):
    """The HF config with every dropout set to 0: DPO compares log-probs of two models, and
    dropout would make even policy == reference disagree."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return config


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def random_init_state(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """Full fp32 state of a freshly initialised model, identical on every rank for a seed.

    Built outside any zero.Init on CPU so policy and reference (and every rank) get the same numbers.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_config(model_dir), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_not_quantized(model_dir: Path) -> None:
    """A checkpoint whose config.json declares a quantization (gpt-oss's released MXFP4 weights, a GPTQ/AWQ
    export, bitsandbytes) is refused by name: dpo_ds trains and compares full-precision weights, and
    DeepSpeed's ZeRO partitions no quantized tensor."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelError(
            f"model.name_or_path={model_dir}: its weights are quantized ({method}, quantization_config in "
            f"config.json); dpo_ds trains full-precision weights: dequantize them once and point at that directory "
            f"(for gpt-oss's mxfp4: from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True), "
            f"dtype=torch.bfloat16).save_pretrained(DIR))"
        )
