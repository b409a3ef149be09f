"""ArchiveWriter writes, from tensors given one at a time, the file torch.save writes for the whole dict.

Round trip through torch.load (plain, weights_only, mmap), byte-for-byte identity with torch.save, a valid
zip (every CRC-32 checked), no file after any failure, and a peak memory of about one tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from dpo_ds.run import archive_writer
from dpo_ds.run.archive_writer import STATE, ArchiveWriter, TensorSpec

HEADER = {"step_idx": 3, "state": STATE, "metrics": {"loss": 0.69, "examples": 128}}
TIED = {"lm_head.weight": "embed.weight"}  # alias name -> the name whose storage it shares


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(5, 4, generator=g)
    return {
        "embed.weight": embed,
        "layer.w": torch.randn(6, 4, generator=g).t(),  # non-contiguous (4, 6)
        "layer.b": torch.randn(4, generator=g).to(torch.bfloat16),
        "count": torch.tensor(7),  # 0-d int64
        "ids": torch.arange(10),
        "empty": torch.empty(0, 3),
        "u16": torch.arange(5).to(torch.uint16),  # a newer dtype: pickled as _rebuild_tensor_v3
        "mask": torch.tensor([True, False, True]),
        "slice": torch.arange(20.0)[5:11],  # contiguous, but a window of a larger storage
        "conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),  # a lazy view: conj bit set
        "lm_head.weight": embed.detach(),  # tied: another tensor on the same storage, as state_dict() gives
    }


def _specs(state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype, TIED.get(k)) for k, v in state.items()]


def _write(path, state: dict[str, torch.Tensor]) -> None:
    with ArchiveWriter(path, HEADER, _specs(state)) as w:
        for name, tensor in state.items():
            if name not in TIED:
                w.write(name, tensor)


def _assert_state_equal(loaded: dict, state: dict) -> None:
    assert list(loaded) == list(state)
    for name, expected in state.items():
        got = loaded[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name


def test_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "policy.pt"
    _write(path, state)
    assert os.listdir(tmp_path) == ["policy.pt"]  # no temporary left beside it

    archive = torch.load(path, map_location="cpu", weights_only=True)
    assert list(archive) == ["step_idx", "state", "metrics"]
    assert archive["step_idx"] == 3 and archive["metrics"] == HEADER["metrics"]
    _assert_state_equal(archive["state"], state)
    loaded = archive["state"]
    assert (
        loaded["lm_head.weight"].untyped_storage().data_ptr()
        == loaded["embed.weight"].untyped_storage().data_ptr()
    )
    assert loaded["layer.w"].is_contiguous() and not loaded["layer.w"].requires_grad

    _assert_state_equal(torch.load(path, mmap=True, weights_only=True)["state"], state)
    plain = torch.load(path)["state"]  # no map_location: the recorded location must be "cpu", not "meta"
    assert {t.device.type for t in plain.values()} == {"cpu"}
    _assert_state_equal(plain, state)

    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # reads every member and checks its CRC-32 against the central directory


@pytest.mark.parametrize("alias_first", [False, True], ids=["alias-after-target", "alias-before-target"])
def test_bytes_equal_torch_save(tmp_path, monkeypatch, alias_first):
    # Small chunks so that each tensor's CRC-32 and pwrite run over several chunks.
    monkeypatch.setattr(archive_writer, "_CHUNK", 7)
    # torch.save keeps a view's whole storage and its conj bit; the writer stores values, so the same
    # file comes from tensors that own exactly their storage.
    state = {k: v.resolve_conj().contiguous().clone() for k, v in _state().items()}
    state["lm_head.weight"] = state["embed.weight"].detach()
    if alias_first:  # storage keys follow first use, so the alias's storage gets key 0
        state = {"lm_head.weight": state.pop("lm_head.weight"), **state}
    # Same basename: torch names the records "<stem>/..."
    (tmp_path / "save").mkdir()
    (tmp_path / "writer").mkdir()
    torch.save({**HEADER, "state": state}, tmp_path / "save" / "policy.pt")
    _write(tmp_path / "writer" / "policy.pt", state)
    expected = (tmp_path / "save" / "policy.pt").read_bytes()
    assert (tmp_path / "writer" / "policy.pt").read_bytes() == expected


def _missing(w, state):
    for name, tensor in list(state.items())[:-2]:
        w.write(name, tensor)


def _duplicate(w, state):
    w.write("embed.weight", state["embed.weight"])
    w.write("embed.weight", state["embed.weight"])


def _wrong_shape(w, state):
    w.write("layer.w", state["layer.w"].t())


def _wrong_dtype(w, state):
    w.write("layer.b", state["layer.b"].float())


def _unknown_name(w, state):
    w.write("nope", state["count"])


def _alias_written(w, state):
    w.write("lm_head.weight", state["lm_head.weight"])


def _raises_inside(w, state):
    w.write("embed.weight", state["embed.weight"])
    raise KeyboardInterrupt


def _error_caught_then_rest_written(w, state):
    # A caller that swallows a failed write still gets no file: the archive may hold part of it.
    try:
        w.write("layer.b", state["layer.b"].float())
    except ValueError:
        pass
    for name, tensor in state.items():
        if name not in TIED:
            w.write(name, tensor)


@pytest.mark.parametrize(
    "body, error",
    [
        (_missing, ValueError),
        (_duplicate, ValueError),
        (_wrong_shape, ValueError),
        (_wrong_dtype, ValueError),
        (_unknown_name, ValueError),
        (_alias_written, ValueError),
        (_raises_inside, KeyboardInterrupt),
        (_error_caught_then_rest_written, RuntimeError),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else "",
)
def test_failure_leaves_nothing(tmp_path, body, error):
    state = _state()
    path = tmp_path / "policy.pt"
    with pytest.raises(error):
        with ArchiveWriter(path, HEADER, _specs(state)) as w:
            body(w, state)
    assert os.listdir(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "policy.pt"
    path.write_bytes(b"previous checkpoint")
    state = _state()
    with pytest.raises(ValueError, match="never written"):
        with ArchiveWriter(path, HEADER, _specs(state)) as w:
            _missing(w, state)
    assert path.read_bytes() == b"previous checkpoint" and os.listdir(tmp_path) == ["policy.pt"]


def test_bad_declarations(tmp_path):
    path = tmp_path / "policy.pt"
    specs = [TensorSpec("a", (2,), torch.float32)]
    with pytest.raises(ValueError, match="exactly one value STATE"):
        ArchiveWriter(path, {"step_idx": 1}, specs)
    with pytest.raises(ValueError, match="declared twice"):
        ArchiveWriter(path, HEADER, specs + specs)
    with pytest.raises(ValueError, match="not a declared non-alias spec"):
        ArchiveWriter(path, HEADER, specs + [TensorSpec("b", (2,), torch.float32, alias_of="c")])
    with pytest.raises(ValueError, match="alias 'b' is"):
        ArchiveWriter(path, HEADER, specs + [TensorSpec("b", (2,), torch.bfloat16, alias_of="a")])
    # skip_data would leave a header tensor's bytes zero: refused, and nothing is left behind.
    with pytest.raises(ValueError, match="outside STATE"):
        with ArchiveWriter(path, {**HEADER, "metrics": {"loss": torch.tensor(0.5)}}, specs):
            pass
    assert os.listdir(tmp_path) == []


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from dpo_ds.run.archive_writer import STATE, ArchiveWriter, TensorSpec

    how, path = sys.argv[1], sys.argv[2]
    n, numel = 25, 4 << 20  # 25 fp32 tensors of 16 MiB: 400 MiB

    def tensors():
        for i in range(n):
            yield f"layers.{i}.weight", torch.full((numel,), float(i))  # made just before it is written

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    # the peak from here on, not since the process started (imports can peak above where they settle)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    if how == "writer":
        specs = [TensorSpec(f"layers.{i}.weight", (numel,), torch.float32) for i in range(n)]
        with ArchiveWriter(path, {"step_idx": 1, "state": STATE, "metrics": {}}, specs) as w:
            for name, t in tensors():
                w.write(name, t)
                del t
    else:
        torch.save({"step_idx": 1, "state": dict(tensors()), "metrics": {}}, path)
    growth = status_kib("VmHWM") - before
    assert torch.load(path, mmap=True)["state"][f"layers.{n - 1}.weight"][0] == n - 1
    print(growth)
    """
)


def _peak_growth_kib(how: str, path) -> int:
    # A fixed mmap threshold: by default glibc raises it when the first 16 MiB block is freed and serves
    # later ones from the heap, where fragmentation keeps freed blocks resident (RSS then creeps up with
    # the number of tensors, whoever allocates them). This measures the writer, not malloc's heuristics.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, how, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_memory_is_one_tensor_not_the_model(tmp_path):
    largest_kib = 16 << 10
    writer_kib = _peak_growth_kib("writer", tmp_path / "writer.pt")
    (tmp_path / "writer.pt").unlink()
    save_kib = _peak_growth_kib("torch.save", tmp_path / "save.pt")
    print(
        f"peak RSS growth writing 400 MiB (25 x 16 MiB fp32): ArchiveWriter {writer_kib / 1024:.1f} MiB, "
        f"torch.save of the built dict {save_kib / 1024:.1f} MiB"
    )
    assert writer_kib < 3 * largest_kib
    assert save_kib > 20 * largest_kib and writer_kib * 5 < save_kib
