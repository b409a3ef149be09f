"""Write a `torch.save` archive while the tensors arrive one at a time.

policy.pt is `torch.save({'step_idx', 'state', 'metrics'})`. Building that dict needs the whole model in
one process's RAM (280 GB for a 70B model in fp32); under ZeRO-3 the parameters can instead be gathered
one at a time. ArchiveWriter writes the same file from them and holds at most the current tensor.

How (torch 2.13):
1. `torch.save` runs under `torch.serialization.skip_data()` on the skeleton dict whose state values are
   placeholders. torch writes data.pkl, its small records and one record per storage, reserving each
   storage's bytes without writing them (`write_record_metadata`), so torch still owns the zip layout:
   record names and order, 64-byte alignment, zip64.
2. A placeholder pickles exactly as `torch.save` pickles a contiguous CPU tensor (`_rebuild_tensor_v2`
   of a TypedStorage, or `_rebuild_tensor_v3` for the newer dtypes), with a storage on the meta device:
   the right size, no memory. A pickler hook records which storage key torch gave each placeholder and
   writes the location "cpu" instead of "meta", so `torch.load` without map_location gives CPU tensors.
3. write() puts the tensor's bytes at its record's offset with os.pwrite (through the page cache, not
   this process's heap) and patches that record's CRC-32, which torch left 0, in the data descriptor
   after the bytes and in the central directory. torch.load does not check CRCs but zipfile does.
4. On exit: the `.data/serialization_id` record (names hash + combined CRCs, computed by torch from the
   zeroed records) is recomputed, the file is fsynced and renamed into place.
5. The file's checksum (engine/checksum.py) is computed on the way: the records arrive in file order, so
   each write hashes the few metadata bytes since the last record (read back, after their CRCs are
   patched) and then the tensor's bytes from memory. Only a write out of file order makes the writer read
   the file once more at the end.

The result is byte-for-byte the file `torch.save(dict, path)` writes for the same dict of contiguous,
detached CPU tensors (tests/test_archive_writer.py checks this).

FakeTensors (`skip_data(materialize_fake_tensors=True)`) also work, but the first FakeTensorMode in a
process imports torch._dynamo, sympy and triton (+150 MB RSS, about 1 s), and the location pickled for
each FakeTensor is a new string, so data.pkl differs from torch.save's (load-equivalent, not identical).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import shutil
import struct
import tempfile
import types
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo_ds.engine import checksum


class _StatePlaceholder:
    def __repr__(self) -> str:
        return "STATE"


# The skeleton's value that stands for the state dict: {'step_idx': 3, 'state': STATE, 'metrics': m}.
STATE = _StatePlaceholder()

# One string object for every storage, as torch's location_tag returns one constant for CPU storages:
# pickle's memo then refers back to it, so data.pkl is the same bytes as torch.save's.
_CPU = "cpu"

# Bytes per pwrite / crc32 call: bounds each syscall (Linux writes at most ~2 GiB per call).
_CHUNK = 64 << 20

_SERIALIZATION_ID = ".data/serialization_id"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # Another spec's name whose storage this one shares (tied weights); it is never write()n itself.
    alias_of: str | None = None


@dataclass
class _Record:
    """One zip member: where its bytes are and where its CRC-32 is recorded."""

    offset: int
    nbytes: int
    crc: int
    crc_at: tuple[int, ...]  # the data descriptor's (or local header's) CRC field, the central directory's
    # miniz writes a data descriptor after each non-empty member (not after an empty one); torch's
    # serialization id combines the CRCs it sees pass by in descriptors, so an empty member's is left out.
    has_descriptor: bool


class ArchiveWriter:
    """Write `path` as `torch.save(skeleton with STATE replaced by {spec.name: tensor, in spec order})`.

        with ArchiveWriter(path, {'step_idx': 3, 'state': STATE, 'metrics': m}, specs) as w:
            for name, tensor in produced_one_at_a_time:
                w.write(name, tensor)

    The skeleton's key order is the file's, so the state can sit between other keys as in policy.pt;
    exactly one top-level value must be STATE and no other value may hold a tensor. An alias spec loads
    as a tensor sharing its target's storage, like two state_dict() names of one tied parameter; only
    the target is written. write() takes a tensor on any device, of the declared shape and dtype, any
    strides; it copies the bytes to the file and keeps no reference.

    `path` is replaced atomically (written in a temporary directory beside it, fsynced, os.replace) only
    if every non-alias spec was written exactly once and no write() failed; otherwise __exit__ raises
    (or lets the block's exception through), `path` is left as it was (absent, or the previous file) and
    no temporary remains.

    The file is byte-for-byte what torch.save writes for the same dict of contiguous CPU tensors that do
    not require grad (a state_dict()'s). Tensors load with requires_grad=False.
    """

    def __init__(self, path: str | os.PathLike, skeleton: Mapping[str, Any], specs: Sequence[TensorSpec]):
        self.path = Path(path)
        state_keys = [k for k, v in skeleton.items() if v is STATE]
        if len(state_keys) != 1:
            raise ValueError(
                f"{self.path}: the skeleton must have exactly one value STATE (where the state dict goes); "
                f"found {len(state_keys)} among keys {list(skeleton)}"
            )
        self._skeleton = dict(skeleton)
        self._state_key = state_keys[0]
        self._specs = _check_specs(self.path, specs)
        self._written: set[str] = set()
        self._records: dict[str, _Record] = {}  # non-alias spec name -> its storage's record
        self._layout: dict[str, _Record] = {}  # every zip member, in central-directory (= write) order
        self._error: BaseException | None = None
        self._tmp_dir: Path | None = None
        self._fd: int | None = None
        self._hash = checksum.new_hash()
        self._hashed_to = 0  # the file's bytes [0, _hashed_to) are in _hash
        self._in_order = True  # False once a write lands before _hashed_to: hash the file at the end
        self.digest: str | None = None  # the written file's checksum

    def __enter__(self) -> ArchiveWriter:
        # Same basename in a private directory: torch names the records "<stem>/...", so the temporary
        # file gets the records torch.save(path) would write, and os.replace stays on one filesystem.
        self._tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        tmp = self._tmp_dir / self.path.name
        try:
            keys = self._save_skeleton(tmp)
            self._layout = _zip_layout(tmp)
            self._records = {name: self._layout[f"data/{key}"] for name, key in keys.items()}
            self._fd = os.open(tmp, os.O_RDWR)
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self.path}: write({name!r}) outside the `with ArchiveWriter(...)` block")
        try:
            self._write(name, tensor)
        except BaseException as e:
            # The file may hold part of this tensor: a caller that catches the error must not get it renamed
            # into place.
            self._error = e
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._discard()
        return False

    def _save_skeleton(self, tmp: Path) -> dict[str, str]:
        """torch.save the skeleton with placeholders; return the storage key torch gave each non-alias spec."""
        storages: dict[str, torch.UntypedStorage] = {}
        state = {}
        for spec in self._specs.values():
            owner = spec.alias_of or spec.name
            if owner not in storages:
                numel = 1
                for d in spec.shape:
                    numel *= d
                storages[owner] = torch.UntypedStorage(numel * spec.dtype.itemsize, device="meta")
            state[spec.name] = _Placeholder(storages[owner], spec.shape, spec.dtype)
        obj = {k: state if k == self._state_key else v for k, v in self._skeleton.items()}
        owner_of = {s._cdata: name for name, s in storages.items()}
        keys: dict[str, str] = {}
        with torch.serialization.skip_data():
            torch.save(obj, str(tmp), pickle_module=_pickle_module(self.path, owner_of, keys))
        if keys.keys() != storages.keys():
            # The hook did not see every storage (a torch that pickles differently): refuse rather than
            # write a file whose tensors load on the meta device or hold zeros.
            raise RuntimeError(
                f"{self.path}: torch.save reported storages for {sorted(keys)} but {sorted(storages)} were "
                f"expected; this writer needs torch.save's persistent_id hook (torch 2.x)"
            )
        return keys

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"{self.path}: {name!r} is not one of the {len(self._specs)} declared tensors")
        if spec.alias_of is not None:
            raise ValueError(
                f"{self.path}: {name!r} is an alias of {spec.alias_of!r} and shares its bytes; "
                f"write {spec.alias_of!r} only"
            )
        if name in self._written:
            raise ValueError(f"{self.path}: {name!r} was already written")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{self.path}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}; "
                f"declared {spec.shape} {spec.dtype}"
            )
        record = self._records[name]
        # A lazily conjugated / negated view holds the un-applied values; contiguous() gives the row-major
        # bytes the pickled strides describe. Only this one tensor is copied, and only when needed.
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        if len(data) != record.nbytes:
            raise RuntimeError(f"{self.path}: {name!r} has {len(data)} bytes; its record has {record.nbytes}")
        crc = 0
        for start in range(0, len(data), _CHUNK):
            chunk = data[start : start + _CHUNK]
            crc = zlib.crc32(chunk, crc)
            _pwrite_all(self._fd, chunk, record.offset + start)
        self._set_crc(record, crc)
        self._written.add(name)
        if self._in_order and record.offset >= self._hashed_to:
            self._hash_to(record.offset)  # the headers since the last record, their CRCs patched
            for start in range(0, len(data), _CHUNK):
                self._hash.update(data[start : start + _CHUNK])
            self._hashed_to = record.offset + len(data)
        else:
            self._in_order = False

    def _hash_to(self, end: int) -> None:
        """Feed the file's bytes [_hashed_to, end) to the hash, read back."""
        while self._hashed_to < end:
            chunk = os.pread(self._fd, min(_CHUNK, end - self._hashed_to), self._hashed_to)
            if not chunk:
                raise RuntimeError(f"{self.path}: ends at {self._hashed_to} bytes, expected {end}")
            self._hash.update(chunk)
            self._hashed_to += len(chunk)

    def _set_crc(self, record: _Record, crc: int) -> None:
        record.crc = crc
        for at in record.crc_at:
            _pwrite_all(self._fd, struct.pack("<I", crc), at)

    def _finish(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self.path}: not written, because a write() failed: {self._error!r}")
        missing = [s.name for s in self._specs.values() if s.alias_of is None and s.name not in self._written]
        if missing:
            raise ValueError(
                f"{self.path}: not written: {len(missing)} declared tensor(s) never written, "
                f"first {missing[:5]}"
            )
        self._write_serialization_id()
        os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        if self._in_order:
            self._hash_to(size)
        os.close(self._fd)
        self._fd = None
        tmp = self._tmp_dir / self.path.name
        self.digest = checksum.digest_of(self._hash) if self._in_order else checksum.file_digest(tmp)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        checksum.record(self.path, self.digest)

    def _write_serialization_id(self) -> None:
        """Redo torch's id from the real CRCs: it identifies the content, and torch computed it from zeros
        (so every checkpoint of one architecture would share it)."""
        record = self._layout.get(_SERIALIZATION_ID)
        if record is None:
            return
        old = os.pread(self._fd, record.nbytes, record.offset)
        if len(old) != 40 or not old.isdigit():
            return  # a format this code does not know: leave torch's id, it is not checked on load
        # c10 PyTorchStreamWriter: 20 digits of the combined record-name hashes (unchanged: same names),
        # then 20 digits of hash_combine over the CRC-32 in each earlier data descriptor, in write order.
        combined = 0
        for other in self._layout.values():
            if other is not record and other.has_descriptor:
                combined = _hash_combine(combined, other.crc)
        new = old[:20] + b"%020d" % combined
        if record.offset < self._hashed_to:
            self._in_order = False  # bytes already hashed change
        _pwrite_all(self._fd, new, record.offset)
        self._set_crc(record, zlib.crc32(new))

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None


class _Placeholder:
    """Pickles as torch.save pickles a contiguous, detached CPU tensor of `shape` and `dtype` whose
    storage is `storage` (Tensor._reduce_ex_internal), with a meta storage that has a size but no bytes."""

    def __init__(self, storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype):
        self.storage, self.shape, self.dtype = storage, shape, dtype

    def __reduce_ex__(self, protocol):
        # Fresh size and stride tuples on every call, as torch's tuple(self.size()) and self.stride():
        # a shared tuple would be memoized by pickle and change data.pkl's bytes. Strides follow torch's
        # rules for size-0 and size-1 dims.
        size = tuple(d for d in self.shape)
        stride = torch.empty(self.shape, device="meta").stride()
        hooks = collections.OrderedDict()  # torch pickles an empty backward-hooks dict for every tensor
        if self.dtype in torch.storage._new_dtypes():
            return (
                torch._utils._rebuild_tensor_v3,
                (self.storage, 0, size, stride, False, hooks, self.dtype),
            )
        storage = torch.storage.TypedStorage(wrap_storage=self.storage, dtype=self.dtype, _internal=True)
        return (torch._utils._rebuild_tensor_v2, (storage, 0, size, stride, False, hooks))


def _pickle_module(path: Path, owner_of: dict[int, str], keys: dict[str, str]) -> types.ModuleType:
    """A pickle_module for torch.save whose Pickler wraps torch's persistent_id: it records the storage key
    of each placeholder's storage in `keys` and pickles its location as "cpu"."""

    class Pickler(pickle.Pickler):
        def __init__(self, *args, **kwargs):
            # torch's _save subclasses this and defines persistent_id; an instance attribute set before
            # pickle.Pickler.__init__ (which looks the method up) takes its place.
            torch_persistent_id = self.persistent_id

            def persistent_id(obj):
                pid = torch_persistent_id(obj)
                if pid is None:
                    return None
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise RuntimeError(
                        f"{path}: torch.save's storage reference is {pid!r}; expected 5 fields"
                    )
                storage = obj._untyped_storage if isinstance(obj, torch.storage.TypedStorage) else obj
                owner = owner_of.get(storage._cdata)
                if owner is None:
                    # skip_data would reserve zeros for it: tensors belong in the specs
                    raise ValueError(
                        f"{path}: the skeleton holds a tensor outside STATE; declare it as a spec"
                    )
                keys[owner] = pid[2]
                return (pid[0], pid[1], pid[2], _CPU, pid[4])

            self.persistent_id = persistent_id
            super().__init__(*args, **kwargs)

    module = types.ModuleType(f"{__name__}._pickle")
    module.Pickler = Pickler
    return module


def _check_specs(path: Path, specs: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"{path}: spec {spec.name!r} is declared twice")
        shape = tuple(int(d) for d in spec.shape)
        if any(d < 0 for d in shape) or not isinstance(spec.dtype, torch.dtype):
            raise ValueError(f"{path}: spec {spec.name!r} has shape {spec.shape} dtype {spec.dtype!r}")
        out[spec.name] = dataclasses.replace(spec, shape=shape)
    for spec in out.values():
        if spec.alias_of is None:
            continue
        target = out.get(spec.alias_of)
        if target is None or target.alias_of is not None:
            raise ValueError(
                f"{path}: spec {spec.name!r} is an alias of {spec.alias_of!r}, which is not a declared "
                f"non-alias spec"
            )
        if (target.shape, target.dtype) != (spec.shape, spec.dtype):
            raise ValueError(
                f"{path}: alias {spec.name!r} is {spec.shape} {spec.dtype} but {target.name!r} is "
                f"{target.shape} {target.dtype}"
            )
    return out


def _zip_layout(path: Path) -> dict[str, _Record]:
    """Every member of the archive at `path`, by name without torch's "<stem>/" prefix, in central-directory
    order. Each header is checked for its signature so that a layout this code misreads raises instead of
    being overwritten."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        cd_start = z.start_dir  # offset of the central directory, found via the (zip64) end record
    layout: dict[str, _Record] = {}
    with open(path, "rb") as f:
        f.seek(cd_start)
        cd = f.read()
        pos = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise RuntimeError(f"{path}: member {info.filename} is compressed; torch stores members raw")
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", cd, pos + 28)
            if (
                cd[pos : pos + 4] != b"PK\x01\x02"
                or cd[pos + 46 : pos + 46 + name_len].decode() != info.orig_filename
            ):
                raise RuntimeError(f"{path}: central directory entry for {info.filename} not where expected")
            central_crc_at = cd_start + pos + 16
            pos += 46 + name_len + extra_len + comment_len

            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise RuntimeError(f"{path}: no local header for {info.filename} at {info.header_offset}")
            offset = info.header_offset + 30 + sum(struct.unpack_from("<HH", local, 26))
            has_descriptor = bool(info.flag_bits & 0x08)
            if has_descriptor:
                # The CRC follows the bytes, in a data descriptor (zip64 or not, the CRC is its 2nd field).
                f.seek(offset + info.file_size)
                if f.read(4) != b"PK\x07\x08":
                    raise RuntimeError(f"{path}: no data descriptor after {info.filename}")
                local_crc_at = offset + info.file_size + 4
            else:
                local_crc_at = info.header_offset + 14
            layout[info.filename.split("/", 1)[1]] = _Record(
                offset, info.file_size, info.CRC, (local_crc_at, central_crc_at), has_descriptor
            )
    return layout


def _hash_combine(seed: int, value: int) -> int:
    # c10/util/hash.h hash_combine on a 64-bit size_t
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & mask)) & mask


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
