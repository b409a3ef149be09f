"""Before/after table for the demo: the SFT model vs the DPO model on the held-out prompts.

    python -m dpo_ds.demo.evaluate --sft runs/demo-sft/LATEST --dpo runs/demo-dpo/LATEST

Runs on one process on a consolidated copy of each policy (LATEST/policy.pt), so no rank can
hang. Greedy generations are checked by a program: the answer must be the exact 3-digit sum.
Reward accuracy / margin are DPO's implicit rewards beta * log(pi / pi_ref) with the SFT model as
the reference (the DPO run's beta); "prefers chosen" is log pi(correct) > log pi(wrong) under each
model alone, so the SFT row has a number too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from dpo_ds.data.collate import collate_padded
from dpo_ds.data.tokenize import Tokenization
from dpo_ds.demo import checker
from dpo_ds.demo.make_data import OUT as DATA
from dpo_ds.model.files import load_tokenizer, resolve_model_dir
from dpo_ds.model.lm import LogprobLM, sequence_logps
from dpo_ds.run.dir import find_step_dir, run_dir_of


def load_policy(path: Path, model_dir: Path):
    """A run's policy as one plain model: its policy.pt, or a LoRA run's base with its adapter merged."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.cli.export import merged_model
    from dpo_ds.model.adapters import is_adapter_dir
    from dpo_ds.model.files import load_config
    from dpo_ds.run.archive import read_archive

    step = find_step_dir(path)
    if is_adapter_dir(step):
        return merged_model(model_dir, step, torch.float32, runnable=True).eval()
    lm = AutoModelForCausalLM.from_config(load_config(model_dir), dtype=torch.float32)
    lm.load_state_dict(read_archive(str(path))["state"], strict=True)
    return lm.eval()


def tokenization(tok) -> Tokenization:
    # the demo configs' lengths; prompts and answers are far shorter, so nothing is cut
    return Tokenization(tok, max_length=64, max_prompt_length=32)


@torch.no_grad()
def greedy(lm, tok, prompts: list[str], new_tokens: int = 4, batch: int = 250) -> list[str]:
    """Greedy answers; prompts rendered as training renders them (the tokenizer's BOS rule)."""
    rules = tokenization(tok)
    outs = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        ids = torch.tensor([rules.render(p, [])[0] for p in chunk])  # equal lengths: no padding
        gen = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=rules.stop_ids,
        )
        outs += [tok.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in gen]
    return outs


@torch.no_grad()
def pair_logps(lm, tok, rows: list[dict], batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    model = LogprobLM(lm, "naive")
    rules = tokenization(tok)
    chosen, rejected = [], []
    for i in range(0, len(rows), batch):
        exs = [
            rules.tokenize(r["prompt"], [r["responses"][c], r["responses"][j]], "keep_end")
            for r in rows[i : i + batch]
            for c, j in r["pairs"]
        ]
        b = collate_padded(exs, tok.pad_token_id)
        seqs = sequence_logps(model, b)
        chosen.append(seqs.chosen)
        rejected.append(seqs.rejected)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(sft_path: Path, dpo_path: Path, beta: float, model: str = "demo", split: str = "test") -> dict:
    torch.manual_seed(0)
    model_dir = resolve_model_dir(model)
    tok = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    carry = torch.tensor([r["carry"] for r in rows])
    results = {}
    ref = None
    for name, path in (("SFT", sft_path), ("DPO", dpo_path)):
        lm = load_policy(path, model_dir)
        answers = greedy(lm, tok, prompts)
        correct = torch.tensor([checker.exact_sum(p, a) for p, a in zip(prompts, answers)], dtype=torch.float)
        pc, pr = pair_logps(lm, tok, rows)
        if ref is None:
            ref = (pc, pr)  # the SFT model is DPO's reference
        chosen_r, rejected_r = beta * (pc - ref[0]), beta * (pr - ref[1])
        results[name] = {
            "greedy_accuracy": correct.mean().item(),
            "carry_accuracy": correct[carry].mean().item(),
            "no_carry_accuracy": correct[~carry].mean().item(),
            "prefers_chosen": (pc > pr).float().mean().item(),
            "reward_accuracy": (chosen_r > rejected_r).float().mean().item() if name != "SFT" else None,
            "reward_margin": (chosen_r - rejected_r).mean().item() if name != "SFT" else None,
            "examples": [f"{p}{a}" for p, a in list(zip(prompts, answers))[:4]],
        }
    results["n_prompts"] = len(rows)
    results["n_carry"] = int(carry.sum())
    return results


def table(r: dict) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"held-out prompts: {r['n_prompts']} ({r['n_carry']} with a carry)",
        "",
        "| model | greedy accuracy | carry (hard) | no carry (easy) | prefers chosen | reward accuracy | reward margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("SFT", "DPO"):
        m = r[name]
        lines.append(
            f"| {name} | {f(m['greedy_accuracy'])} | {f(m['carry_accuracy'])} | {f(m['no_carry_accuracy'])} | "
            f"{f(m['prefers_chosen'])} | {f(m['reward_accuracy'])} | {f(m['reward_margin'])} |"
        )
    gain = (r["DPO"]["greedy_accuracy"] - r["SFT"]["greedy_accuracy"]) * 100
    lines += [
        "",
        f"DPO - SFT greedy accuracy: {gain:+.1f} points; samples: SFT {r['SFT']['examples']}, "
        f"DPO {r['DPO']['examples']}",
    ]
    return "\n".join(lines)


def targets(r: dict) -> list[tuple[str, bool]]:
    return [
        (
            "DPO greedy accuracy >= SFT + 25 points",
            r["DPO"]["greedy_accuracy"] >= r["SFT"]["greedy_accuracy"] + 0.25,
        ),
        ("DPO easy-case accuracy >= 0.9", r["DPO"]["no_carry_accuracy"] >= 0.9),
        ("DPO held-out reward accuracy >= 0.9", r["DPO"]["reward_accuracy"] >= 0.9),
    ]


def main(argv=None, prog: str = "python -m dpo_ds.demo.evaluate") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sft", type=Path, required=True, help="SFT run's LATEST (or its policy.pt)")
    ap.add_argument("--dpo", type=Path, required=True, help="DPO run's LATEST (or its policy.pt)")
    ap.add_argument("--beta", type=float, default=None, help="default: the DPO run's loss.beta")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    beta = args.beta
    if beta is None:
        cfg_file = run_dir_of(find_step_dir(args.dpo)).config
        beta = yaml.safe_load(cfg_file.read_text())["loss"]["beta"]
    torch.set_num_threads(2)
    r = evaluate(args.sft, args.dpo, beta)
    print(table(r))
    ok = True
    for name, passed in targets(r):
        ok &= passed
        print(f"  [{'PASS' if passed else 'MISS'}] {name}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
