#!/usr/bin/env python3
"""Structure check of dpo_ds/ and bench/ (stdlib only, reads the source with ast, imports nothing).

    python scripts/check_structure.py            # from anywhere; exit 1 if anything is found
    python scripts/check_structure.py --max-function-lines 100 --max-module-lines 600

Reports:
  (a) import cycles among the project's own modules (dpo_ds.* and bench.*). Every ast.Import and
      ast.ImportFrom anywhere in a file counts (module level, inside functions, under TYPE_CHECKING).
      Relative imports are resolved; `from dpo_ds.data import sources` is an import of the module
      dpo_ds.data.sources when that is a module or package, else of the package dpo_ds.data. An import
      is an edge to the most specific project module it names (parent packages' __init__ are not
      added as edges, as import-linter/grimp count them). bench/ has no __init__.py: its scripts are
      the modules bench.<name> (they import each other as `from bench import memory`). Each strongly
      connected component is printed with, for every import edge inside it, the shortest cycle
      through that edge (deduplicated), so every edge that could break the cycle is shown.
  (b) every function or method in dpo_ds/ over --max-function-lines lines (end_lineno - lineno + 1;
      a nested function counts inside its parent and is also listed by itself when over).
  (c) every module in dpo_ds/ over --max-module-lines lines.
  (d) imports by string: importlib.import_module("dpo_ds...") / import_module(...) / __import__("dpo_ds...")
      whose first argument is a string literal (or an f-string starting with) "dpo_ds" or "bench.",
      outside a module whose name contains "registry". These are not edges of (a).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dpo_ds", "bench")


# ----------------------------------------------------------------------------- modules


def discover(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under dpo_ds/ and bench/ (packages as their __init__.py)."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if any(part in ("__pycache__",) or part.startswith(".") for part in rel.parts):
                continue
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
            for i in range(1, len(parts)):  # folders without __init__.py: namespace packages (bench/)
                mods.setdefault(".".join(parts[:i]), root.joinpath(*parts[:i]))
    return mods


def is_package(name: str, mods: dict[str, Path]) -> bool:
    path = mods.get(name)
    return path is not None and (path.is_dir() or path.name == "__init__.py")


def most_specific(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a project module (None when not the project's)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def resolve_base(module: str, level: int, target: str | None, mods: dict[str, Path]) -> str | None:
    """The absolute module named by a (possibly relative) `from` import."""
    if level == 0:
        return target
    package = module if is_package(module, mods) else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    parts = parts[: len(parts) - (level - 1)]
    if target:
        parts += target.split(".")
    return ".".join(parts) or None


def imports_of(
    module: str, tree: ast.AST, mods: dict[str, Path], missing: list[tuple[int, str]] | None = None
) -> dict[str, int]:
    """Project modules imported anywhere in the tree -> first line number. Imports of dpo_ds/bench
    modules that do not exist are appended to `missing` as (line, name)."""
    out: dict[str, int] = {}
    bench_siblings = {m.split(".", 1)[1] for m in mods if m.startswith("bench.") and m.count(".") == 1}

    def add(name: str | None, line: int) -> None:
        if not name:
            return
        top = name.split(".")[0]
        if top not in PACKAGES and module.startswith("bench.") and top in bench_siblings:
            name = "bench." + name  # `import memory` from a bench script run with bench/ on sys.path
        target = most_specific(name, mods)
        if target is not None and target != name and missing is not None:
            missing.append((line, name))
        if target is not None and target != module:
            out.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_base(module, node.level, node.module, mods)
            if base is None:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if alias.name != "*" and full in mods else base, node.lineno)
    return out


# ----------------------------------------------------------------------------- (a) cycles


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                result.append(sorted(comp))
    return result


def shortest_path(graph: dict[str, set[str]], src: str, dst: str, allowed: set[str]) -> list[str] | None:
    prev: dict[str, str | None] = {src: None}
    queue = deque([src])
    while queue:
        node = queue.popleft()
        if node == dst:
            path = []
            cur: str | None = node
            while cur is not None:
                path.append(cur)
                cur = prev[cur]
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt in allowed and nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return None


def cycles_in(comp: list[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """For every edge u -> v inside the component, the shortest cycle through it; deduplicated."""
    allowed = set(comp)
    seen: set[tuple[str, ...]] = set()
    found = []
    for u in comp:
        for v in sorted(graph[u] & allowed):
            back = shortest_path(graph, v, u, allowed)
            if back is None:
                continue
            cyc = [u] + back[:-1] if v != u else [u]
            k = cyc.index(min(cyc))
            canon = tuple(cyc[k:] + cyc[:k])
            if canon not in seen:
                seen.add(canon)
                found.append(list(canon))
    return sorted(found, key=lambda c: (len(c), c))


# ----------------------------------------------------------------------------- (b)-(d)


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function or method over the limit."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1
                if n > limit:
                    out.append((name, child.lineno, n))
                visit(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def string_imports(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, call, target) of import_module/__import__ calls whose first argument names dpo_ds or bench."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        f = node.func
        fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if fname not in ("import_module", "__import__"):
            continue
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            text = arg.value
        elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            text = str(arg.values[0].value) + "{...}"
        else:
            continue
        if text == "dpo_ds" or text.startswith(("dpo_ds.", "bench.")) or text == "bench":
            out.append((node.lineno, fname, text))
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    ap.add_argument("--max-function-lines", type=int, default=100)
    ap.add_argument("--max-module-lines", type=int, default=600)
    args = ap.parse_args()
    root = args.root.resolve()

    mods = discover(root)
    trees: dict[str, ast.AST] = {}
    lines: dict[str, int] = {}
    errors = []
    for name, path in mods.items():
        if path.is_dir():
            continue
        text = path.read_text(encoding="utf-8")
        lines[name] = len(text.splitlines())
        try:
            trees[name] = ast.parse(text, filename=str(path))
        except SyntaxError as e:
            errors.append(f"{path.relative_to(root)}: SyntaxError: {e}")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    edge_line: dict[tuple[str, str], int] = {}
    missing: dict[str, list[tuple[int, str]]] = {}
    for name, tree in trees.items():
        for target, line in imports_of(name, tree, mods, missing.setdefault(name, [])).items():
            graph[name].add(target)
            edge_line[(name, target)] = line

    def rel(name: str) -> str:
        return str(mods[name].relative_to(root))

    problems = 0
    # (a)
    comps = [c for c in sccs(graph) if len(c) > 1 or c[0] in graph[c[0]]]
    comps.sort(key=lambda c: (len(c), c))
    n_cycles = 0
    print(
        f"(a) import cycles among {len(mods)} project modules ({sum(map(len, graph.values()))} import edges)"
    )
    for comp in comps:
        cycs = cycles_in(comp, graph)
        n_cycles += len(cycs)
        print(f"  component of {len(comp)}: {', '.join(comp)}")
        for cyc in cycs:
            hops = [f"{a} (line {edge_line[(a, b)]})" for a, b in zip(cyc, cyc[1:] + cyc[:1])]
            print("    " + " -> ".join(hops) + f" -> {cyc[0]}")
    if not comps:
        print("  none")
    problems += len(comps)

    # (b)
    limit = args.max_function_lines
    longs = []
    for name, tree in trees.items():
        if name.split(".")[0] == "dpo_ds":
            longs += [(rel(name), *f) for f in long_functions(tree, limit)]
    longs.sort(key=lambda r: -r[3])
    print(f"\n(b) functions in dpo_ds/ over {limit} lines: {len(longs)}")
    if longs:
        w = max(len(f"{p}:{ln}") for p, _, ln, _ in longs)
        for path, qual, ln, n in longs:
            print(f"  {n:5d}  {f'{path}:{ln}':<{w}}  {qual}")
    problems += len(longs)

    # (c)
    mlimit = args.max_module_lines
    big = sorted(
        ((n, rel(m)) for m, n in lines.items() if m.split(".")[0] == "dpo_ds" and n > mlimit), reverse=True
    )
    print(f"\n(c) modules in dpo_ds/ over {mlimit} lines: {len(big)}")
    for n, path in big:
        print(f"  {n:5d}  {path}")
    problems += len(big)

    # (d)
    dyn = []
    for name, tree in trees.items():
        if "registry" in name:
            continue
        dyn += [(rel(name), *s) for s in string_imports(tree)]
    print(
        f'\n(d) imports by string (import_module/__import__ of "dpo_ds..."/"bench...") outside *registry*: {len(dyn)}'
    )
    for path, line, fname, text in sorted(dyn):
        print(f"  {path}:{line}  {fname}({text!r})")
    problems += len(dyn)

    gone = sorted({(rel(m), ln, n) for m, hits in missing.items() for ln, n in hits})
    if gone:
        print(
            f"\n(note) imports of dpo_ds/bench modules that do not exist (not counted in the exit code): {len(gone)}"
        )
        for path, line, name in gone:
            print(f"  {path}:{line}  {name}")

    for e in errors:
        print(f"\n!! {e}")
    problems += len(errors)

    print(
        f"\nsummary: {len(comps)} import cycle component(s) ({n_cycles} cycle(s) shown), "
        f"{len(longs)} function(s) > {limit} lines, {len(big)} module(s) > {mlimit} lines, "
        f"{len(dyn)} string import(s)" + (f", {len(errors)} unparsable file(s)" if errors else "")
    )
    print("FAIL" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
