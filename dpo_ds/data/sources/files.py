"""Finding a source's files: a directory's {split} file, a local file's 'test' sibling, the hub
repository layout of a 'kind:DIR' source, and a file's identity (for fingerprints)."""

from __future__ import annotations

from pathlib import Path

from dpo_ds.data.sources.groups import DataError
from dpo_ds.data.sources.specs import HUB_NAMES, HUB_SPLITS, LOCAL_SUFFIXES, _hub_split


def file_identity(path: Path) -> str:
    """Path, size, mtime and a hash of the first and last MiB: what changes when the file does."""
    import hashlib

    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read(1 << 20))
    return f"{path.resolve()} {st.st_size} bytes mtime {st.st_mtime_ns} {h.hexdigest()[:16]}"


def _local_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _find_split_file(directory: Path, split: str) -> Path:
    if not directory.is_dir():
        what = "is a file, expected a directory" if directory.exists() else "does not exist"
        raise DataError(f"data directory {directory} {what}")
    found = [directory / f"{split}{s}" for s in LOCAL_SUFFIXES if (directory / f"{split}{s}").is_file()]
    if not found:
        looked = ", ".join(f"{split}{s}" for s in LOCAL_SUFFIXES)
        raise DataError(f"no '{split}' file in {directory}: looked for {looked}{_hub_layout_hint(directory)}")
    if len(found) > 1:
        raise DataError(
            f"several '{split}' files in {directory}: {', '.join(p.name for p in found)}; keep only one"
        )
    return found[0]


def _hub_layout_hint(directory: Path) -> str:
    """What to write instead when a plain directory is a hub repository's download (DIR/data/*.parquet)."""
    shards = sorted(p.name for p in directory.glob("data/*.parquet"))
    if not shards:
        return ""
    for kind, splits in HUB_SPLITS.items():
        if any(name.startswith(f"{hub}-") for hub in set(splits.values()) - {"train"} for name in shards):
            return (
                f". {directory} is shaped like the hub repository {HUB_NAMES[kind]} "
                f"({directory / 'data' / shards[0]}, ...): read it with '{kind}:{directory}'"
            )
    return (
        f". {directory} holds a hub repository's data/*.parquet ({shards[0]}, ...): read it with the hub "
        f"parser of its rows, as 'hh:DIR', 'shp:DIR', 'se:DIR' or 'ultrafeedback:DIR'"
    )


def _split_file_of(path: Path, split: str) -> Path:
    """A local file source's file of `split`: itself for train, its sibling with 'test' for 'train'."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if split == "test":
        if "train" not in path.name:
            raise DataError(
                f"no 'test' split for {path}: the test file is looked for as a sibling with 'train' "
                f"replaced by 'test' in the name, and {path.name!r} has no 'train' in it"
            )
        sibling = path.with_name(path.name.replace("train", "test"))
        if not sibling.is_file():
            raise DataError(f"no 'test' split for {path}: looked for {sibling}, which does not exist")
        path = sibling
    return path


def _hub_shaped_files(kind: str, directory: Path, split: str) -> tuple[list[Path], Path | None]:
    """(the hub repository layout's parquet shards, or [] and the split file) of a 'kind:DIR' source."""
    hub_split = _hub_split(kind, split)
    shards = sorted(directory.glob(f"data/{hub_split}-*.parquet")) if directory.is_dir() else []
    if shards and not any((directory / f"{hub_split}{s}").is_file() for s in LOCAL_SUFFIXES):
        return shards, None
    return [], _find_split_file(directory, hub_split)
