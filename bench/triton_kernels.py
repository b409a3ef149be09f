"""Compile every Triton kernel in dpo_ds for real GPU targets, without a GPU: registers, spills, shared
memory, PTX size and compile seconds per kernel x target x dtype.

    python bench/triton_kernels.py                          # sm_80 and sm_90, every spec combination
    python bench/triton_kernels.py --targets 90 --json R.json

Triton compiles for a GPUTarget with no device present: triton.compile(ASTSource(...), target=GPUTarget(
"cuda", 90, 32)) runs the whole pipeline down to PTX and, with the ptxas that ships in
triton/backends/nvidia/bin, a cubin. The kernels are found by scanning the package's source for @triton.jit
functions; each one needs an entry in its module's COMPILE_SPECS (format: dpo_ds/logprobs/triton_kernel.py),
or this prints which one lacks it and exits 1. tests/model/test_triton_compile.py runs this script with --json
and checks every result, so the table below is exactly what CI compiles.

TRITON_INTERPRET is removed from this process's environment before triton is imported: under the
interpreter @triton.jit returns an InterpretedFunction, which triton.compile cannot take (wrapping its .fn
in a JITFunction works only until a kernel calls another @triton.jit function, which stays interpreted).
Every compile goes to a fresh temporary TRITON_CACHE_DIR, so it is real and its time means something.

regs and spills are read from the cubin with cuobjdump --dump-resource-usage. spills = local memory bytes
per thread / 4, the number CompiledKernel.n_spills reports on a GPU (triton's driver divides
CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES by 4). shared = the kernel's static shared memory in bytes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)  # A100 and H100/H200 compute capabilities
SPEC_FORMAT = "dpo_ds/logprobs/triton_kernel.py"  # where the COMPILE_SPECS format is written down


@dataclass
class Kernel:
    """One @triton.jit function: its module, its name and COMPILE_SPECS entry (None: none found)."""

    module: str
    name: str
    fn: Any  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    spec: dict | None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class Combo:
    """One compilation of a kernel: concrete signature, constexpr values, tt.divisibility=16 arguments."""

    signature: dict[str, str]
    constexprs: dict[str, Any]
    divisible: tuple[str, ...]
    dtypes: dict[str, str]  # placeholder -> dtype, e.g. {"logits": "bf16"}
    variant: str  # key of the spec's divisible_by_16
    label: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.label = {
            "dtype": ",".join(self.dtypes.values()) or "-",
            "variant": self.variant,
            "constexprs": " ".join(f"{k}={v}" for k, v in self.constexprs.items()) or "-",
        }


def _is_jit_decorator(node: ast.expr) -> bool:
    """@triton.jit, @jit, @triton.jit(...), and wrappers such as @triton.autotune(...) around them."""
    target = node.func if isinstance(node, ast.Call) else node
    text = ast.unparse(target)
    return text == "jit" or text.startswith("triton.")


def _imports_triton(tree: ast.Module) -> bool:
    """Whether the module imports triton at import time (module level, also inside if/try blocks)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "triton"
        ):
            return True
        if isinstance(node, (ast.If, ast.Try)):
            stack += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]
    return False


def _param_is_constexpr(fn, name: str) -> bool:
    ann = inspect.signature(fn.fn).parameters[name].annotation
    return ann is not inspect.Parameter.empty and "constexpr" in str(ann)


def _check_spec(kernel: Kernel) -> list[str]:
    """What is wrong with a kernel's spec, as messages (empty: nothing)."""
    spec, where = kernel.spec, kernel.qualname
    sig = spec.get("signature", {})
    args = list(kernel.fn.arg_names)
    if list(sig) != args:
        return [f"{where}: spec signature lists {list(sig)}, the kernel's arguments are {args} (same order)"]
    problems = []
    for name, ty in sig.items():
        if (ty == "constexpr") != _param_is_constexpr(kernel.fn, name):
            problems.append(f"{where}: {name} is {ty!r} in the spec; tl.constexpr in the kernel must match")
    placeholders = {p for ty in sig.values() for p in re.findall(r"{(\w+)}", ty)}
    if placeholders != set(spec.get("dtypes", {})):
        problems.append(
            f"{where}: signature placeholders {placeholders} != dtypes keys {set(spec.get('dtypes', {}))}"
        )
    wanted = {n for n, ty in sig.items() if ty == "constexpr"}
    if set(spec.get("constexprs", {})) != wanted:
        problems.append(
            f"{where}: constexprs {set(spec.get('constexprs', {}))} != constexpr arguments {wanted}"
        )
    variants = spec.get("divisible_by_16") or {"-": ()}
    for variant, names in variants.items():
        bad = [n for n in names if n not in sig or sig[n] == "constexpr"]
        if bad:
            problems.append(f"{where}: divisible_by_16[{variant!r}] names {bad}, not runtime arguments")
    return problems


def find_kernels(package: str = "dpo_ds") -> tuple[list[Kernel], list[str]]:
    """Every @triton.jit function defined in `package`, with its spec, and the problems found.

    A module is imported only if it imports triton at module level or defines a @triton.jit function, so
    this imports no more than using those kernels would. The source scan is checked against the imported
    objects: a decorated function that is not a kernel object at module level (defined inside a function,
    say) is a problem too, as are a kernel without a COMPILE_SPECS entry and an entry without a kernel.
    """
    from triton.runtime.jit import JITFunction, KernelInterface

    try:
        from triton.runtime.interpreter import InterpretedFunction

        base_types = (JITFunction, InterpretedFunction)
    except ImportError:
        base_types = (JITFunction,)

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package")
    root = Path(list(spec.submodule_search_locations)[0])
    kernels: list[Kernel] = []
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        decorated = {
            node.name: node
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(_is_jit_decorator(d) for d in node.decorator_list)
        }
        if not decorated and not _imports_triton(tree):
            continue
        parts = path.relative_to(root.parent).with_suffix("").parts
        modname = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = importlib.import_module(modname)
        found = {}
        for obj in vars(module).values():
            if not isinstance(obj, KernelInterface):
                continue
            while not isinstance(obj, base_types) and hasattr(obj, "fn"):
                obj = obj.fn  # Autotuner / Heuristics wrap the JITFunction
            if isinstance(obj, base_types) and obj.fn.__module__ == modname:  # not a re-export
                found[obj.fn.__name__] = obj
        for name in sorted(set(decorated) - set(found)):
            problems.append(
                f"{modname}.{name} (line {decorated[name].lineno}): decorated @triton.jit in the source but "
                "no kernel object of that name at module level, so it cannot be compiled on its own"
            )
        specs = getattr(module, "COMPILE_SPECS", {})
        for name in found:  # definition order
            kernel = Kernel(modname, name, found[name], specs.get(name))
            if kernel.spec is None:
                problems.append(
                    f"{kernel.qualname}: @triton.jit function with no compile spec: add "
                    f"COMPILE_SPECS[{name!r}] beside it in {path.relative_to(root.parent)} "
                    f"(format: {SPEC_FORMAT})"
                )
            else:
                problems += _check_spec(kernel)
            kernels.append(kernel)
        for name in sorted(set(specs) - set(found)):
            problems.append(f"{modname}: COMPILE_SPECS[{name!r}] names no @triton.jit function in the module")
    return kernels, problems


def expand(spec: dict) -> list[Combo]:
    """Every combination a spec asks for: dtypes x constexpr values x divisibility variants."""
    dtypes = spec.get("dtypes", {})
    constexprs = spec.get("constexprs", {})
    variants = spec.get("divisible_by_16") or {"-": ()}
    combos = []
    for dt in itertools.product(*dtypes.values()):
        sub = dict(zip(dtypes, dt))
        signature = {k: v.format(**sub) for k, v in spec["signature"].items()}
        for values in itertools.product(*constexprs.values()):
            for variant, names in variants.items():
                combos.append(
                    Combo(signature, dict(zip(constexprs, values)), tuple(sorted(names)), sub, variant)
                )
    return combos


def _tool(name: str) -> str:
    import triton

    tool = getattr(triton.knobs.nvidia, name.replace("-", "_"))
    if tool is None:
        raise RuntimeError(f"{name} not found (triton ships one in triton/backends/nvidia/bin)")
    return tool.path


def cubin_facts(cubin: bytes, name: str) -> dict:
    """The cubin's architecture, registers and local bytes per thread, read with cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)

        def dump(flag: str) -> str:
            return subprocess.run(
                [_tool("cuobjdump"), flag, str(path)], capture_output=True, text=True, check=True
            ).stdout

        elf = re.search(r"\.(sm_\w+)\.cubin", dump("--list-elf"))
        usage = re.search(
            rf"Function {re.escape(name)}:\s*REG:(\d+).*?LOCAL:(\d+)", dump("--dump-resource-usage"), re.S
        )
    if elf is None or usage is None:
        raise RuntimeError(f"cuobjdump could not read the cubin of {name}")
    return {"cubin_arch": elf.group(1), "regs": int(usage.group(1)), "local_bytes": int(usage.group(2))}


def compile_one(kernel: Kernel, combo: Combo, capability: int) -> dict:
    """Compile one combination for sm_<capability>; a row of facts, with "error" set if it failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": kernel.qualname, "target": f"sm_{capability}", **combo.label, "error": None}
    index = {name: i for i, name in enumerate(kernel.fn.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in combo.divisible}
    try:
        src = ASTSource(fn=kernel.fn, signature=combo.signature, constexprs=combo.constexprs, attrs=attrs)
        start = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32))
        row["seconds"] = time.perf_counter() - start
        ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
        target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        row.update(
            ptx_bytes=len(ptx),
            cubin_bytes=len(cubin),
            ptx_target=target.group(1) if target else None,
            shared=compiled.metadata.shared,
            num_warps=compiled.metadata.num_warps,
        )
        if not ptx or not cubin:
            raise RuntimeError(f"triton.compile returned {len(ptx)} B of PTX and {len(cubin)} B of cubin")
        row.update(cubin_facts(cubin, compiled.metadata.name))
        row["spills"] = row["local_bytes"] // 4
    except Exception as e:  # one bad combination must not hide the others: report each
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def compile_all(kernels: list[Kernel], targets=TARGETS) -> list[dict]:
    """One row per kernel x target x spec combination (kernels without a spec are skipped: see problems)."""
    return [
        compile_one(k, combo, cap)
        for k in kernels
        if k.spec is not None
        for cap in targets
        for combo in expand(k.spec)
    ]


def print_table(rows: list[dict]) -> None:
    print(
        "| kernel | target | dtype | variant | constexprs | regs | spills | shared B | PTX KiB | cubin KiB "
        "| compile s |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["error"]:
            print(
                f"| {r['kernel'].rsplit('.', 1)[-1]} | {r['target']} | {r['dtype']} | {r['variant']} | "
                f"{r['constexprs']} | FAILED (below) |"
            )
            continue
        print(
            f"| {r['kernel'].rsplit('.', 1)[-1]} | {r['ptx_target']} | {r['dtype']} | {r['variant']} | "
            f"{r['constexprs']} | {r['regs']} | {r['spills']} | {r['shared']} | "
            f"{r['ptx_bytes'] / 1024:.1f} | {r['cubin_bytes'] / 1024:.1f} | {r['seconds']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    p.add_argument("--package", default="dpo_ds", help="package scanned for @triton.jit functions")
    p.add_argument("--json", type=Path, help="also write the rows and problems here")
    args = p.parse_args(argv)

    # Before triton is imported: the real JITFunction, and a cache that starts empty.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        import triton

        kernels, problems = find_kernels(args.package)
        interpreted = [k.qualname for k in kernels if type(k.fn).__name__ == "InterpretedFunction"]
        if interpreted:
            problems.append(
                f"{interpreted}: interpreter functions (triton was imported with TRITON_INTERPRET set)"
            )
            kernels = []
        start = time.perf_counter()
        rows = compile_all(kernels, args.targets)
        total = time.perf_counter() - start

    tools = {n: getattr(triton.knobs.nvidia, n) for n in ("ptxas", "ptxas_blackwell", "cuobjdump")}
    versions = ", ".join(f"{n} {t.version if t else 'MISSING'}" for n, t in tools.items())
    print(f"triton {triton.__version__} ({versions}); {len(kernels)} kernels, {len(rows)} compiles")
    print("variant: the arguments the JIT sees divisible by 16 (COMPILE_SPECS divisible_by_16)")
    print("spills: local memory bytes per thread / 4, as CompiledKernel.n_spills")
    print("target: the PTX .target (triton builds capability 90 as sm_90a)\n")
    print_table(rows)
    print(f"\ntotal compile time {total:.1f} s")
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(
            f"FAILED {r['kernel']} {r['target']} {r['dtype']} {r['variant']} {r['constexprs']}: {r['error']}"
        )
    for msg in problems:
        print(f"PROBLEM {msg}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "problems": problems, "triton": triton.__version__}, indent=1)
        )
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
