"""Source specs: the known hub names and their splits, the local suffixes, the bundled demo data,
and the forms `load_source` accepts."""

from __future__ import annotations

from pathlib import Path

HUB_NAMES = {
    "hh": "Anthropic/hh-rlhf",
    "shp": "stanfordnlp/SHP",
    "se": "HuggingFaceH4/stack-exchange-preferences",
    "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
}
# The hub split each dpo_ds split reads. stack-exchange has only 'train' (its 'test' is held out
# from it); ultrafeedback_binarized names its preference splits train_prefs / test_prefs.
HUB_SPLITS = {
    "se": {"train": "train", "test": "train"},
    "ultrafeedback": {"train": "train_prefs", "test": "test_prefs"},
}
# Suffixes tried, in this order, for {split}.* in a directory. json files may hold JSON lines.
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")

DEMO_DIR = Path(__file__).resolve().parent.parent.parent / "demo" / "data"
ACCEPTED_FORMS = (
    "'hh', 'shp', 'se', 'ultrafeedback' (Hugging Face hub); 'hh:DIR', 'shp:DIR', 'se:DIR', "
    "'ultrafeedback:DIR' (local copies shaped like the hub's rows); 'demo'; a local file ending "
    ".jsonl, .json, .parquet, .jsonl.gz or .json.gz; or a directory holding {split}.jsonl|json|parquet"
)


def _hub_split(kind: str, split: str) -> str:
    return HUB_SPLITS.get(kind, {}).get(split, split)


def known_names() -> list[str]:
    """The names a source spec may be, in the order the docs list them."""
    return [*HUB_NAMES, "demo"]


def closest_name(spec: str) -> str | None:
    """The known name a mistyped spec most likely meant ('ultrafedback' -> 'ultrafeedback', the hub's
    'Anthropic/hh-rlhf' -> 'hh'), kept to NAME:DIR form when spec has a colon; None if none is close."""
    import difflib

    word, sep, rest = spec.partition(":")
    candidates = {n: n for n in known_names()}
    candidates.update({repo.lower(): name for name, repo in HUB_NAMES.items()})
    candidates.update({repo.lower().split("/")[-1]: name for name, repo in HUB_NAMES.items()})
    close = difflib.get_close_matches(word.strip().lower(), candidates, n=1, cutoff=0.6)
    if not close:
        return None
    name = candidates[close[0]]
    return f"{name}:{rest}" if sep and name in HUB_NAMES else name
