"""Generate the bundled `demo` preference data: 2-digit addition with a planted SFT mistake.

    python -m dpo_ds.demo.make_data          # rewrites dpo_ds/demo/data/{train,test}.jsonl

Prompt "05+38=", answer "043" (fixed width). The SFT targets (`sft_target`) on carry problems are
the forgot-the-carry answer ("033") 60% of the time, so SFT alone leaves a systematic mistake that a
program can count. Every prompt has one preference pair (`pairs` [[0, 1]]):
  carry problems:    correct vs forgot-the-carry (the pairs name the mistake)
  no-carry problems: correct vs correct + 10 ("anchor" pairs: without them DPO lowers the
                     rejected answers' probability by breaking generation altogether)
The file format is the original DPO code's: per prompt `responses`, `pairs`, `sft_target`.
Deterministic for a seed: the same bytes on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"


def fmt(n: int) -> str:
    return f"{n:03d}"


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def forgot_carry(a: int, b: int) -> int:
    """The sum computed digit by digit with the units carry dropped."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def prompt_of(a: int, b: int) -> str:
    return f"{a:02d}+{b:02d}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def row(a: int, b: int, sft_wrong: bool) -> dict:
    correct = a + b
    wrong = forgot_carry(a, b) if has_carry(a, b) else correct + 10
    return {
        "prompt": prompt_of(a, b),
        "responses": [fmt(correct), fmt(wrong)],
        "pairs": [[0, 1]],
        "sft_target": fmt(wrong) if sft_wrong else fmt(correct),
        "carry": has_carry(a, b),
    }


def generate(seed: int = 0, n_test: int = 1000, p_wrong: float = 0.6) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    test, train = problems[:n_test], problems[n_test:]
    out = {"train": [], "test": []}
    for a, b in train:
        out["train"].append(row(a, b, sft_wrong=has_carry(a, b) and rng.random() < p_wrong))
    for a, b in test:
        out["test"].append(row(a, b, sft_wrong=False))  # held-out SFT targets are the truth
    return out


def write(data: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    write(generate(args.seed), args.out)
    print(f"wrote {args.out}/train.jsonl and test.jsonl")


if __name__ == "__main__":
    main()
