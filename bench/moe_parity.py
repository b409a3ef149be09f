"""Mixture-of-Experts DPO with the router's load-balancing loss, dpo_ds against TRL 1.16's DPOTrainer: the
same Qwen3-MoE weights, 5 steps, per-step losses and aux losses side by side.

    pip install -r bench/requirements-trl.txt    # trl==1.16.0
    python bench/moe_parity.py                   # ~1-2 min on a 2-core CPU

Both frameworks train a random Qwen3-MoE (hidden 64, 2 layers, 8 experts top-2, moe_intermediate 32, the
shipped char tokenizer; router weights drawn with std 0.2 instead of the 0.02 init, so that routing is far
from uniform; safetensors written once) in fp32 on the same 8 preference pairs: batch 8 (every step is
the whole set, so the order batches are drawn in does not matter), sigmoid DPO with beta 0.1, torch AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), constant lr 1e-3, no warmup, no clipping (max_grad_norm
1e6), no dropout, the tokenizer's own BOS rule in both (this tokenizer puts <s> in front of a prompt:
TRL's tokenizer(text) and dpo_ds's data.add_bos=auto alike; EOS after each response in both). dpo_ds runs
`dpo_ds/train.py --ds <ZeRO-2 JSON>` in one process, padded layout; TRL runs in this process.

The router loss is on in both, with the coefficient written into the model's config.json
(router_aux_loss_coef, --coef, default 0.01: ten times Qwen3-MoE's 0.001) and neither framework told
otherwise: TRL's router_aux_loss_coef=None and dpo_ds's loss.router_aux_coef=null both resolve to the
config's own. The objective both optimise is DPO loss + coef x aux. TRL logs `loss` with coef x aux inside
and `aux_loss` beside it; dpo_ds logs loss/train without it (ln 2 at step 1) and aux_loss/train. Compared:
    total  TRL loss                  against dpo_ds loss/train + coef x aux_loss/train
    aux    TRL aux_loss              against dpo_ds aux_loss/train
    DPO    TRL loss - coef x aux     against dpo_ds loss/train
Checked besides: TRL's resolved coefficient is --coef and its reference forwards ran without router
logits (no output_router_logits, no aux_loss in their outputs); TRL's policy and reference hold exactly the
weights written (compared tensor by tensor before training); dpo_ds's launch log names the config's own
coefficient; both put the same non-pad tokens through the policy at every step (the BOS/EOS rules agree)
and step 1's summed log-probs agree to 1e-4; the DPO loss of step 1 is ln 2 in both (dpo_ds's reference
gives the initial policy's log-probs) and the aux of step 1 agrees (dpo_ds's policy routes as the written
weights do). That the router term matters at this tolerance is measured, not assumed: dpo_ds is run a
second time with loss.router_aux_coef=0 and its DPO losses must move by more than 10x the tolerance.

Target: every compared value within 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._trl_parity import make_rows, report, run_dpo_ds, trl_logs, trl_trainer, write_pairs  # noqa: E402

TOLERANCE = 1e-5
LOGP_TOLERANCE = 1e-4  # summed log-probs of ~30-60 tokens (magnitude ~50): fp32 sums of that size
ROUTER_STD = 0.2  # router weight init; Qwen3-MoE's own 0.02 gives logits of std ~0.16: near-uniform routing


def make_model(model_dir: Path, seed: int, coef: float) -> None:
    """A random Qwen3-MoE around the shipped char tokenizer, saved as safetensors (weights both load)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from dpo_ds.demo.make_assets import HERE

    src = HERE / "model"  # the char tokenizer (vocab 100, <s> in front of a text)
    model_dir.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, model_dir / f.name)
    base = json.loads((src / "config.json").read_text())
    config = Qwen3MoeConfig(
        vocab_size=base["vocab_size"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=coef, output_router_logits=False,
        max_position_embeddings=256, rms_norm_eps=1e-6, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=base["bos_token_id"], eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
    )  # fmt: skip
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, ROUTER_STD)  # (experts, hidden)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    # the weights as a model holds them: transformers saves the fused experts split per expert
    torch.save(model.state_dict(), model_dir.parent / "initial_state.pt")


def run_trl(work: Path, model_dir: Path, rows: list[dict], args) -> dict:
    import torch

    logs = trl_logs()
    trainer = trl_trainer(work, model_dir, rows, args, logs, router_aux_loss_coef=None)
    checks = {
        "coef": trainer.router_aux_loss_coef,
        "aux_enabled": trainer.aux_loss_enabled,
    }
    # the policy and the reference (its own model, loaded from the same directory) before any step: exactly
    # the weights make_model saved
    initial = torch.load(model_dir.parent / "initial_state.pt")

    def same(module) -> bool:
        state = module.state_dict()
        return set(state) == set(initial) and all(torch.equal(state[k], v) for k, v in initial.items())

    checks["policy_and_ref_equal_saved"] = same(trainer.model) and same(trainer.ref_model)
    # every reference forward: was it asked for router logits, did it return an aux_loss?
    ref_calls = []
    ref_forward = trainer.ref_model.forward

    def watched(*a, **kw):
        out = ref_forward(*a, **kw)
        ref_calls.append((bool(kw.get("output_router_logits")), getattr(out, "aux_loss", None) is not None))
        return out

    trainer.ref_model.forward = watched
    trainer.train()
    checks["ref_calls"] = len(ref_calls)
    checks["ref_without_router"] = bool(ref_calls) and not any(a or b for a, b in ref_calls)
    tokens = [b - a for a, b in zip([0, *logs.num_tokens], logs.num_tokens)]
    return {"loss": logs.loss, "aux": logs.aux, "tokens": tokens, "logps": logs.logps, "checks": checks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--coef", type=float, default=0.01, help="router_aux_loss_coef written into config.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep model, data and logs here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpo_ds_moe_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = work / "model", work / "data"
    make_model(model_dir, args.seed, args.coef)
    rows = make_rows(args.pairs)
    write_pairs(data_dir, rows)

    ours = run_dpo_ds(work, "dpo_ds", model_dir, data_dir, args)
    off = run_dpo_ds(work, "dpo_ds_router_off", model_dir, data_dir, args, ["loss.router_aux_coef=0"])
    theirs = run_trl(work, model_dir, rows, args)
    coef, checks = args.coef, theirs["checks"]

    print(
        f"\nMoE DPO parity with the router loss: random Qwen3-MoE hidden 64, 2 layers, 8 experts top-2, char "
        f"tokenizer; router_aux_loss_coef {coef:g} (the config's own, in both); {args.pairs} pairs per step, "
        f"{args.steps} steps, AdamW lr {args.lr}, fp32; dpo_ds padded layout, ZeRO-2, one process\n"
    )
    print(
        "| step | TRL loss | dpo_ds loss/train + coef x aux | diff | TRL aux_loss | dpo_ds aux_loss/train | diff "
        "| TRL loss - coef x aux | dpo_ds loss/train | diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    diffs = []
    for k, (tl, ta, ol, oa) in enumerate(
        zip(theirs["loss"], theirs["aux"], ours["loss"], ours["aux"]), start=1
    ):
        total, dpo = ol + coef * oa, tl - coef * ta
        d = (abs(tl - total), abs(ta - oa), abs(dpo - ol))
        diffs.extend(d)
        print(
            f"| {k} | {tl:.7f} | {total:.7f} | {d[0]:.1e} | {ta:.7f} | {oa:.7f} | {d[1]:.1e} "
            f"| {dpo:.7f} | {ol:.7f} | {d[2]:.1e} |"
        )
    worst = max(diffs, default=math.nan)
    moved = max((abs(a - b) for a, b in zip(ours["loss"], off["loss"])), default=0.0)
    ln2 = math.log(2)
    first = (
        (ours["loss"] or [math.nan])[0],
        (theirs["loss"] or [math.nan])[0] - coef * (theirs["aux"] or [0])[0],
    )
    said = f"coefficient {coef:g} (the model config's own)" in ours["log"]
    # the same tokens in both (BOS/EOS rules): every step's non-pad token count, and step 1's summed log-probs
    logp_diff = max(
        (abs(a - b) for a, b in zip((ours["logps"] or [()])[0], (theirs["logps"] or [()])[0])),
        default=math.nan,
    )
    results = {
        f"same number of steps ({args.steps}) logged by both": len(ours["loss"])
        == len(theirs["loss"])
        == args.steps,
        f"every compared value within {TOLERANCE:g} (max {worst:.1e})": worst <= TOLERANCE,
        f"the same non-pad tokens every step (dpo_ds {ours['tokens']}, TRL {theirs['tokens']})": ours[
            "tokens"
        ]
        == theirs["tokens"],
        f"step 1's mean summed log-probs of chosen and rejected agree to {LOGP_TOLERANCE:g} (max {logp_diff:.1e})": (
            logp_diff <= LOGP_TOLERANCE
        ),
        f"DPO loss of step 1 is ln 2 in both (dpo_ds {first[0]:.7f}, TRL {first[1]:.7f})": all(
            abs(x - ln2) <= 1e-6 for x in first
        ),
        f"TRL's coefficient resolved to the config's {coef:g} ({checks['coef']}), aux loss on": checks["coef"]
        == coef
        and checks["aux_enabled"],
        f"dpo_ds's coefficient resolved to the config's {coef:g} (its launch log)": said,
        "TRL's policy and reference = the saved weights, exactly": checks["policy_and_ref_equal_saved"],
        f"TRL's {checks['ref_calls']} reference forwards ran without router logits": checks[
            "ref_without_router"
        ],
        f"the router term moves dpo_ds's DPO losses by more than {10 * TOLERANCE:g} (coef 0 run: {moved:.1e})": moved
        > 10 * TOLERANCE,
    }
    ok = report(results, f"every per-step value within {TOLERANCE:g} of TRL's")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
