"""Fail on history in the user docs: commit hashes and words that date the text.

    python scripts/check_docs.py            # README.md, docs/**/*.md and bench/RESULTS.md (the site includes it)

User docs say what the product does, not how it came to: no commit hashes, no "last session", no
"was 38". Each hit is printed as file:line: the word, and the exit status is 1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# a commit hash: 7-40 hex digits holding both a digit and a letter, as a word of its own
HASH = re.compile(r"(?<![\w/.#-])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w-])")
HISTORY = [
    r"\b(last|earlier|previous|prior|this|next|one) session\b",
    r"\bsessions? ago\b",
    r"\b(was|were) (N|~?\d[\d.,]*)\b",
    r"\b(before|after) this (change|commit|round)\b",
    r"\bused to (be|leave|take|have|run|print|say|write|fail|hang|give|need)\b",
    r"\bno longer\b",
    r"\bpreviously\b",
    r"\bnew in\b",
    r"\b(at|on) commit\b",
    r"\bcommit [0-9a-f]{7}",
]
WORDS = re.compile("|".join(f"(?:{w})" for w in HISTORY), re.IGNORECASE)
# the hashes of files (sha256) in a table are data, not history; a line may say so
ALLOW = "<!-- history-check: data -->"


def doc_files(repo: Path = REPO) -> list[Path]:
    files = [repo / "README.md", repo / "bench" / "RESULTS.md"]
    files += sorted((repo / "docs").rglob("*.md"))
    return [f for f in files if f.exists()]


def hits(text: str) -> list[tuple[int, str]]:
    """(line number, the offending word) for each hash or history word of a markdown text."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if ALLOW in line:
            continue
        for m in list(HASH.finditer(line)) + list(WORDS.finditer(line)):
            out.append((n, m.group(0)))
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or doc_files()
    bad = 0
    for path in paths:
        for n, word in hits(path.read_text()):
            name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            print(f"{name}:{n}: {word!r} (history or a commit hash in a user doc)")
            bad += 1
    print(f"check_docs: {len(paths)} files, {bad} hit(s)" + (" -> FAIL" if bad else " -> OK"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
