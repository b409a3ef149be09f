"""Run every ```bash block of README.md and docs/getting-started.md, as a reader would paste them.

    python scripts/doc_blocks.py README.md docs/getting-started.md     # run them (CI does)
    python scripts/doc_blocks.py --list README.md docs/getting-started.md

The blocks of one file run in order in one bash process (`set -euo pipefail`), so a `cd` or a venv
activated in one block holds in the next, starting in the repository root. HOME is a scratch folder,
so `~/...` in a block never touches the real home; pip's cache stays the real one.

A block that cannot run on a CPU machine carries `<!-- not-run: reason -->` on the line before its
fence. Only the GPU training and export lines may: every command in such a block must be `dpo-ds train`,
`dpo-ds export`, or a launcher line (`deepspeed`, `torchrun`, `srun`) running dpo_ds's trainer, or the
check fails. No substitution is made in the blocks that run: the real-model blocks that run here (the
install and `dpo-ds plan`) read only the model's config.json, which the wheel ships, so the commands run
exactly as printed. Exit status: 0 when every block ran and exited 0; 1 otherwise, naming the block.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")  # an opening fence and its language; indented too
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->\s*$")
# the only lines a not-run block may hold: a run on GPUs and the export of its result
GPU_ONLY = re.compile(
    r"^(?:[A-Za-z_]\w*=\S*\s+)*(dpo-ds (train|export)\b|(deepspeed|torchrun|srun)\b.*dpo_ds)[^;&|]*$"
)


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the opening fence
    text: str
    not_run: str | None  # the reason, when marked

    @property
    def commands(self) -> list[str]:
        """The block's commands: comments and blank lines dropped, continuation lines joined."""
        joined = re.sub(r"\s*\\\n\s*", " ", self.text)
        lines = [ln.split(" #")[0].strip() for ln in joined.splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]


def fenced(lines: list[str]) -> Iterator[tuple[str, int, int]]:
    """(language, index of the opening fence, index of the closing one) of each fenced block of a
    markdown file's lines; a fence that is never closed is a ValueError naming its line."""
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        close = re.compile(rf"^\s*{re.escape(m.group(1))}\s*$")  # a closing fence holds nothing else
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
        if end is None:
            raise ValueError(f"line {i + 1}: a code fence that is never closed")
        yield m.group(2).lower(), i, end
        i = end + 1


def blocks_of(path: Path) -> list[Block]:
    """The fenced bash/sh blocks of a markdown file, each with its not-run reason, if any."""
    lines = path.read_text().splitlines()
    out = []
    for lang, i, end in fenced(lines):
        if lang in ("bash", "sh", "shell"):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.match(prev.strip())
            text = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Block(str(path.relative_to(REPO)), i + 1, text, marker.group(1) if marker else None))
    return out


def misused_markers(blocks: list[Block]) -> list[str]:
    """A not-run marker on a block holding anything but GPU training and export lines."""
    bad = []
    for b in blocks:
        if b.not_run is None:
            continue
        others = [c for c in b.commands if not GPU_ONLY.match(c)]
        if others:
            bad.append(
                f"{b.path}:{b.line}: not-run block holds {others[0]!r}; only GPU training and export lines may be marked"
            )
    return bad


def script_for(blocks: list[Block]) -> str:
    """One bash script: each runnable block in turn, announced, in one shell."""
    parts = ["set -euo pipefail", f"cd {str(REPO)!r}"]
    for b in blocks:
        where = f"{b.path}:{b.line}"
        if b.not_run is not None:
            parts.append("echo " + shlex.quote(f"== {where}: not run ({b.not_run})"))
            continue
        parts.append("echo " + shlex.quote(f"== {where}"))
        parts.append(f"DOC_BLOCK={shlex.quote(where)}")
        parts.append(b.text)
    parts.append("echo '== every block ran'")
    return "\n".join(parts) + "\n"


def run(blocks: list[Block], home: Path) -> int:
    env = dict(os.environ)
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    env["HOME"] = str(home)
    # a venv of the caller's (CI's .venv) is not the reader's: each file starts from the system python
    if "VIRTUAL_ENV" in env:
        venv_bin = str(Path(env.pop("VIRTUAL_ENV")) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    trap = "trap 'echo \"== FAILED in the block at ${DOC_BLOCK:-?} (exit $?)\" >&2' ERR\n"
    return subprocess.run(["bash", "-c", trap + script_for(blocks)], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--list", action="store_true", help="print the blocks and their markers, run nothing")
    args = ap.parse_args(argv)
    per_file = {f: blocks_of(f.resolve()) for f in args.files}
    bad = [m for bs in per_file.values() for m in misused_markers(bs)]
    for m in bad:
        print(m, file=sys.stderr)
    if bad:
        return 1
    if args.list:
        for bs in per_file.values():
            for b in bs:
                print(f"{b.path}:{b.line}: " + (f"not run ({b.not_run})" if b.not_run else "runs"))
                print("    " + "\n    ".join(b.commands))
        return 0
    with tempfile.TemporaryDirectory(prefix="doc-blocks-home-") as home:
        for f, bs in per_file.items():
            rc = run(bs, Path(home))
            if rc:
                print(f"doc blocks of {f}: exit {rc}", file=sys.stderr)
                return 1
    print(
        f"doc blocks: {sum(len(bs) for bs in per_file.values())} blocks of {len(per_file)} files, each ran or is marked not-run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
