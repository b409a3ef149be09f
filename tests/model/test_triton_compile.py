"""Every Triton kernel in dpo_ds compiles for real GPU targets (sm_80, sm_90) in every dtype the host code
launches it with, on this GPU-less machine; and the compile specs saying how are the ones the host launches.

The compile specs live beside each kernel (COMPILE_SPECS in its module; format in
dpo_ds/logprobs/triton_kernel.py), so a change to a kernel's arguments is made next to its spec. Four checks:
  - every @triton.jit function found in dpo_ds has a spec that fits its arguments (found by scanning the
    source, so a kernel added later without a spec fails here, named);
  - a package with a kernel but no spec is reported, not passed over;
  - the specs are what the JIT would compile for the real host launches: each launch, specialised by triton's
    own binder, must be one spec combination, and every combination must be launched (a wrong dtype, int
    width, constexpr value or alignment in a spec fails here even where it would still compile);
  - bench/triton_kernels.py, run in a subprocess without TRITON_INTERPRET (conftest sets it in this process,
    and the interpreter's functions cannot be compiled), compiles every kernel x target x combination; each
    must give non-empty PTX and cubin built for the sm asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo_ds.model.logprobs import interpreter_requested

triton = pytest.importorskip("triton", reason="triton is not installed: there is nothing to compile")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "triton_kernels.py"


def _load_bench():
    # bench/ is not a package; the script is imported by path so the test checks exactly what it compiles.
    spec = importlib.util.spec_from_file_location("bench_triton_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tk = _load_bench()


def test_every_triton_kernel_in_dpo_ds_has_a_compile_spec():
    kernels, problems = tk.find_kernels("dpo_ds")
    assert not problems, "\n".join(problems)
    names = {k.qualname for k in kernels}
    # The scan must see the kernels we know of: an empty result would pass everything below vacuously.
    assert {
        "dpo_ds.model.logprobs.triton_kernel._logprobs_fwd_kernel",
        "dpo_ds.model.logprobs.triton_kernel._logprobs_bwd_kernel",
    } <= names, names


def test_a_kernel_without_a_spec_is_reported(tmp_path, monkeypatch):
    """A kernel without a spec, a spec not fitting its kernel, a kernel inside a function: each named."""
    pkg = tmp_path / "speclesspkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels.py").write_text(
        "import triton\nimport triton.language as tl\n\n"
        "COMPILE_SPECS = {'_specced': {'signature': {'x_ptr': '*fp32', 'wrong': 'i32'}}}\n\n"
        "@triton.jit\ndef _orphan(x_ptr, n):\n    pass\n\n"
        "@triton.jit\ndef _specced(x_ptr, n):\n    pass\n\n"
        "def _factory():\n    @triton.jit\n    def _nested(x_ptr):\n        pass\n\n    return _nested\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        kernels, problems = tk.find_kernels("speclesspkg")
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "speclesspkg"]:
            del sys.modules[name]
    text = "\n".join(problems)
    assert "speclesspkg.kernels._orphan: @triton.jit function with no compile spec" in text, text
    assert "speclesspkg.kernels._specced: spec signature lists ['x_ptr', 'wrong']" in text, text
    assert "speclesspkg.kernels._nested (line" in text, text
    assert len(problems) == 3, text


def _drive_logprobs(device: torch.device) -> None:
    """Every way dpo_ds launches the log-prob kernels: each logits dtype, a vocab that is a multiple of 16
    and one that is not, forward and backward (also in place), with the default block size."""
    from dpo_ds.model.logprobs import token_logprobs

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for vocab in (64, 50):
            for inplace in (False, True):
                leaf = torch.randn(3, vocab, device=device, dtype=dtype, requires_grad=True)
                logits = leaf * 1 if inplace else leaf  # inplace_backward overwrites its input: a non-leaf
                labels = torch.tensor([1, -100, vocab - 1], device=device)
                token_logprobs(logits, labels, impl="triton", inplace_backward=inplace).sum().backward()


# module with kernels -> a function that runs the host code launching them all
HOST_DRIVERS = {"dpo_ds.model.logprobs.triton_kernel": _drive_logprobs}


def _binder(fn):
    """Triton's own launch binder for a kernel: args -> (params, [(type, attr) or ("constexpr", value)])."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn, **fn.kwargs)  # an InterpretedFunction
    return create_function_from_signature(jit.signature, jit.params, BaseBackend)


def _differences(arg_names, specialization, combo) -> list[str]:
    """How a launch (triton's specialization of its arguments) differs from a spec combination."""
    diffs = []
    for name, (kind, value) in zip(arg_names, specialization):
        if kind != combo.signature[name]:
            diffs.append(f"{name} launched as {kind}, spec says {combo.signature[name]}")
        elif kind == "constexpr" and value != combo.constexprs[name]:
            diffs.append(f"{name}={value} launched, spec says {combo.constexprs[name]}")
        elif kind != "constexpr" and ("D" in value) != (name in combo.divisible):
            diffs.append(f"{name} {'is' if 'D' in value else 'is not'} divisible by 16 in the launch")
    return diffs


def test_compile_specs_are_what_the_host_code_launches(monkeypatch):
    """Record each launch the host code makes (kernel.run, through triton's binder); match it to a spec."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not interpreter_requested():
        pytest.fail("no CUDA and TRITON_INTERPRET unset: conftest should have set it before triton's import")
    kernels, problems = tk.find_kernels("dpo_ds")
    assert not problems, "\n".join(problems)
    launches: dict[str, list] = {k.qualname: [] for k in kernels}
    for k in kernels:
        binder, run = _binder(k.fn), k.fn.run

        def recording_run(*args, grid, warmup, _k=k, _binder=binder, _run=run, **kwargs):
            _, specialization, _ = _binder(*args, **kwargs)
            launches[_k.qualname].append(specialization)
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(k.fn, "run", recording_run)  # the host code calls kernel[grid](...) -> .run

    modules = sorted({k.module for k in kernels})
    undriven = [m for m in modules if m not in HOST_DRIVERS]
    assert not undriven, f"{undriven}: add a host driver to HOST_DRIVERS in {Path(__file__).name}"
    for m in modules:
        HOST_DRIVERS[m](device)

    errors = []
    for k in kernels:
        combos = tk.expand(k.spec)
        used = set()
        if not launches[k.qualname]:
            errors.append(f"{k.qualname}: never launched by HOST_DRIVERS[{k.module!r}]")
        for specialization in launches[k.qualname]:
            diffs = [_differences(k.fn.arg_names, specialization, c) for c in combos]
            used.update(i for i, d in enumerate(diffs) if not d)
            if all(diffs):
                nearest = min(range(len(combos)), key=lambda i: len(diffs[i]))
                errors.append(
                    f"{k.qualname}: a host launch is no spec combination; nearest {combos[nearest].label}: "
                    + "; ".join(diffs[nearest])
                )
        for i, c in enumerate(combos):
            if i not in used and all(k.qualname not in e for e in errors):  # else that error says it better
                errors.append(f"{k.qualname}: spec combination {c.label} is never launched by the host code")
    assert not errors, "\n".join(dict.fromkeys(errors))


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """All combinations in one subprocess (about 0.1 s of CPU each): PTX and cubin, for the right sm."""
    out = tmp_path / "compiled.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--json", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and out.exists(), (
        f"bench/triton_kernels.py exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    result = json.loads(out.read_text())
    assert not result["problems"], "\n".join(result["problems"])

    kernels, _ = tk.find_kernels("dpo_ds")
    expected = {
        (k.qualname, f"sm_{cap}", c.label["dtype"], c.label["variant"], c.label["constexprs"])
        for k in kernels
        for cap in tk.TARGETS
        for c in tk.expand(k.spec)
    }
    rows = {(r["kernel"], r["target"], r["dtype"], r["variant"], r["constexprs"]): r for r in result["rows"]}
    assert set(rows) == expected, f"compiled {sorted(set(rows) ^ expected)} differ from the specs"
    assert {key[1] for key in rows} == {"sm_80", "sm_90"}

    bad = []
    for key, r in rows.items():
        sm = re.compile(rf"{key[1]}a?")  # triton builds capability 90 as sm_90a (wgmma, setmaxnreg)
        if r["error"]:
            bad.append(f"{key}: {r['error']}")
        elif not (r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0):
            bad.append(f"{key}: empty PTX ({r['ptx_bytes']} B) or cubin ({r['cubin_bytes']} B)")
        elif not (sm.fullmatch(r["ptx_target"] or "") and sm.fullmatch(r["cubin_arch"] or "")):
            bad.append(f"{key}: PTX .target {r['ptx_target']}, cubin {r['cubin_arch']}; wanted {key[1]}")
    assert not bad, "\n".join(bad)
    print(f"{len(rows)} compiles of {len(kernels)} kernels in {seconds:.1f} s (subprocess, including import)")
