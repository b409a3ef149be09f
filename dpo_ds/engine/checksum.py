"""Checksums of checkpoint files, computed from the bytes while they are written (no second read).

A file whose size and zip directory are intact can still hold wrong bytes (a flipped block on a disk, a
network filesystem or a copy): torch.load returns the damaged tensor without a word. Every file of a step
dir gets a digest at save, recorded in its manifest, and a resume reads each file once to compare.

xxh3-128 (the xxhash package, which `datasets` already needs): about 16 GB/s on one core of the 2-core
CI machine against sha256's 1.6 GB/s, so verifying is bounded by the disk, not the hash. It detects
accidents, not tampering.

Writers that produce a checksum record it here under the file's path (the `ledger`); the save protocol
takes it back when it writes the manifest. A file some library wrote by itself (peft's adapter_config.json,
DeepSpeed's copy of zero_to_fp32.py: kilobytes) is hashed from the page cache right after.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ALGORITHM = "xxh3_128"
_READ_CHUNK = 8 << 20
_LEDGER: dict[str, str] = {}


def new_hash():
    import xxhash

    return xxhash.xxh3_128()


def digest_of(h) -> str:
    return f"{ALGORITHM}:{h.hexdigest()}"


class HashingFile:
    """A binary file opened for writing whose every write() also feeds the hash (torch.save writes its
    zip in one forward pass, so the digest is the file's)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close() / the with block
        self._h = new_hash()

    def write(self, data) -> int:
        self._h.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def digest(self) -> str:
        return digest_of(self._h)

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_torch(obj, path: str | os.PathLike, **kwargs) -> str:
    """torch.save(obj, path, **kwargs) with the file's checksum computed on the way; recorded in the ledger
    and returned."""
    with HashingFile(path) as f:
        torch.save(obj, f, **kwargs)
        f.flush()
        digest = f.digest()
    record(path, digest)
    return digest


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """data into path, its checksum recorded and returned."""
    with HashingFile(path) as f:
        f.write(data)
        digest = f.digest()
    record(path, digest)
    return digest


def record(path: str | os.PathLike, digest: str) -> None:
    _LEDGER[os.path.abspath(path)] = digest


def forget_under(directory: str | os.PathLike) -> None:
    """Drop what the ledger holds for files under directory (a step dir removed before it is written again)."""
    prefix = os.path.join(os.path.abspath(directory), "")
    for path in [p for p in _LEDGER if p.startswith(prefix)]:
        del _LEDGER[path]


def take(path: str | os.PathLike) -> str | None:
    """The checksum a writer recorded for path (removed from the ledger), or None."""
    return _LEDGER.pop(os.path.abspath(path), None)


def taken_or_read(path: str | os.PathLike) -> str:
    """The recorded checksum of path, or (a file no hashing writer wrote) the file read once."""
    return take(path) or file_digest(path)


def file_digest(path: str | os.PathLike) -> str:
    """The checksum of the file as it is on disk now: the whole file read once."""
    h = new_hash()
    with open(Path(path), "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return digest_of(h)
