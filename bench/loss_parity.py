"""Our preference losses against TRL's, on random per-sequence log-probs: one table, a few seconds on CPU.

    pip install -r bench/requirements-trl.txt      # trl==1.16.0, a bench-only extra
    python bench/loss_parity.py [--pairs 64] [--seed 0]

For each of our losses with a TRL counterpart, prints the largest |ours - TRL| over the pairs, for the
per-pair losses and for the logged rewards, and the conventions in which the two differ.

How TRL is called (its code is run, never copied): TRL 1.16's DPOTrainer computes its losses inline in
`_compute_loss(model, inputs)`, from a model forward. We call that method unbound, one pair at a time (it
returns the batch mean), with a stub `self` holding the fields it reads and a stub model whose per-token
log-probs sum, over the completion mask, to the random per-sequence log-probs; the reference log-probs
go in as precomputed (`ref_chosen_logps`). SimPO lives in CPOTrainer (`cpo_loss`, loss_type="simpo",
cpo_alpha=0), ORPO's odds-ratio term in ORPOTrainer (`odds_ratio_loss`); both are plain methods of
per-sequence log-probs, which those trainers average per token before the call, as we do here.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_ds.model.lm import length_weights, reduce_sequences  # noqa: E402
from dpo_ds.model.logprobs import token_logprobs  # noqa: E402
from dpo_ds.training.losses import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    chosen_nll,
    discopop_loss,
    dpo_loss,
    dpo_norm_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_length_normalized_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    simpo_loss,
    sppo_hard_loss,
    wpo_weights,
)

BETA, EPS, GAMMA, SIMPO_BETA, LAMBDA, ALPHA = 0.1, 0.1, 0.5, 2.0, 0.1, 0.2


def random_pairs(n: int, seed: int, equal_lengths: bool = False) -> dict[str, torch.Tensor]:
    """Per-sequence summed log-probs (float64) and response lengths like real data: 1-300 tokens,
    per-token mean log-prob in (-3, -0.05), the reference a few nats away from the policy."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 301, (2, n), generator=g)
    if equal_lengths:
        counts[0] = 50
    means = -(0.05 + 2.95 * torch.rand(2, n, generator=g, dtype=torch.float64))
    logps = means * counts
    ref = logps + 3 * torch.randn(2, n, generator=g, dtype=torch.float64)
    return {"pc": logps[0], "pr": logps[1], "rc": ref[0], "rr": ref[1], "nc": counts[0], "nr": counts[1]}


def trl_dpo(
    loss_types: list[str], d: dict, *, beta: float, label_smoothing: float = 0.0, weights=None,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
    ld_alpha: float | None = None,
):  # fmt: skip
    """TRL DPOTrainer._compute_loss on one batch: (mean loss, mean chosen reward, mean rejected reward). With
    per-token values in d (WPO's rows: "lp_c", "lp_r" log p and "sq_c", "sq_r" log sum p^2, (pairs, width - 1)
    each), its model stub returns those and TRL weighs the pairs (use_weighting=True)."""
    from trl import DPOTrainer

    b = d["pc"].shape[0]
    logps = torch.cat([d["pc"], d["pr"]])  # (2b,) batch is [chosen, rejected]
    counts = torch.cat([d["nc"], d["nr"]])
    width = int(counts.max()) + 1  # one prompt token, then the response
    completion_mask = (torch.arange(width)[None, :] >= 1) & (torch.arange(width)[None, :] <= counts[:, None])
    shift = completion_mask[:, 1:].to(logps.dtype)  # (2b, width - 1): position t scores token t + 1
    per_token = shift * (logps / counts)[:, None]  # sums to logps over the response, 0 elsewhere
    wpo = "lp_c" in d
    if wpo:  # the given per-token values; TRL zeroes log p outside the completion itself (labels -100)
        per_token = shift * torch.cat([d["lp_c"], d["lp_r"]])[:, : width - 1]
    outputs = SimpleNamespace(
        log_sum_sq_probs=torch.cat([d["sq_c"], d["sq_r"]])[:, : width - 1] if wpo else None,
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        aux_loss=None,
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=True,
        ref_model=None,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=wpo,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": d["rc"],
        "ref_rejected_logps": d["rr"],
    }
    loss = DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False)
    m = stub._metrics["train"]
    return float(loss), m["rewards/chosen"][-1], m["rewards/rejected"][-1]


def per_pair(fn, d: dict):
    """Run a batch-level function on each pair alone: the per-pair values, stacked."""
    rows = [fn({k: v[i : i + 1] for k, v in d.items()}) for i in range(d["pc"].shape[0])]
    return [torch.tensor([r[j] for r in rows], dtype=torch.float64) for j in range(3)]


def trl_cpo(loss_type: str, pc, pr, *, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0):
    from trl.experimental.cpo import CPOTrainer

    stub = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=simpo_gamma,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    return CPOTrainer.cpo_loss(stub, pc, pr)


def trl_orpo_odds_ratio_term(mean_c, mean_r, *, lam: float):
    from trl.experimental.orpo import ORPOTrainer

    stub = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(stub, mean_c, mean_r)
    return -losses, cr, rr  # TRL's loss is nll - mean(losses): the term added is -losses


def new_losses(d: dict, rows: list, dpo_family, counts: dict) -> None:
    """The losses of 2026's issue: dpo_norm, exo_pair, nca_pair, bco_pair, sppo_hard, discopop and the
    f-divergences per pair; aot and aot_unpaired, which sort over the batch, on the whole batch at once."""
    pc, pr, rc, rr = (d[k] for k in ("pc", "pr", "rc", "rr"))
    norm_beta, exo_eps, tau = 5.0, 1e-3, 0.05
    dpo_family(dpo_norm_loss(pc, pr, rc, rr, beta=norm_beta, **counts), f"dpo_norm beta={norm_beta}",
               "sigmoid_norm", "same (loss=sigmoid_norm is accepted too)", beta=norm_beta)  # fmt: skip
    # TRL takes log(eps) and log1p(-eps) of a float32 tensor: the difference is bounded by their float32 rounding
    e32 = torch.tensor(exo_eps, dtype=torch.float32)
    bound = abs(math.log(exo_eps) - float(torch.log(e32))) + abs(
        math.log1p(-exo_eps) - float(torch.log1p(-e32))
    )
    dpo_family(exo_pair_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=exo_eps), f"exo_pair label_smoothing={exo_eps}",
               "exo_pair", f"same up to TRL's float32 log(eps) (bound {bound:.1e})", beta=BETA,
               label_smoothing=exo_eps)  # fmt: skip
    for name, fn in (("nca_pair", nca_pair_loss), ("bco_pair", bco_pair_loss), ("sppo_hard", sppo_hard_loss)):
        dpo_family(fn(pc, pr, rc, rr, beta=BETA), name, name, "same", beta=BETA)
    dpo_family(discopop_loss(pc, pr, rc, rr, beta=BETA, discopop_tau=tau), f"discopop discopop_tau={tau}", "discopop",
               "same", beta=BETA, discopop_tau=tau)  # fmt: skip
    for kind in ("forward_kl", "js_divergence"):
        dpo_family(dpo_loss(pc, pr, rc, rr, beta=BETA, f_divergence=kind), f"dpo f_divergence={kind}", "sigmoid",
                   f"same (f_divergence_type={kind})", beta=BETA, f_divergence_type=kind)  # fmt: skip
    # alpha-divergence: TRL 1.16 clamps its exponent by dtype and knows no float64, so the row runs in float32;
    # one-token responses, so that the stub's per-token split of each log-prob sums back exactly in float32
    g = torch.Generator().manual_seed(1)
    d32 = {k: -(0.05 + 2.95 * torch.rand(pc.shape[0], generator=g)) for k in ("pc", "pr", "rc", "rr")}
    d32.update(nc=torch.ones(pc.shape[0], dtype=torch.long), nr=torch.ones(pc.shape[0], dtype=torch.long))
    c32 = dict(chosen_tokens=d32["nc"], rejected_tokens=d32["nr"])
    alpha = 0.3
    ours = dpo_norm_loss(d32["pc"], d32["pr"], d32["rc"], d32["rr"], beta=norm_beta, f_divergence="alpha_divergence",
                         f_alpha=alpha, **c32)  # fmt: skip
    theirs = per_pair(lambda x: trl_dpo(["sigmoid_norm"], x, beta=norm_beta, f_divergence_type="alpha_divergence",
                                        f_alpha_divergence_coef=alpha), d32)  # fmt: skip
    rows.append((f"dpo_norm f_divergence=alpha_divergence f_alpha={alpha}, float32", "DPOTrainer sigmoid_norm",
                 maxdiff(ours[0], theirs[0]), max(maxdiff(ours[1], theirs[1]), maxdiff(ours[2], theirs[2])),
                 "same, in float32 (TRL's clamp table has no float64), one-token responses"))  # fmt: skip
    # LD-DPO: TRL weighs the policy's per-token log-probs in its forward; dpo_ds's model wrapper does
    # (model.lm.length_weights), here on the per-token values TRL's stub is given (each sequence's log-prob spread
    # evenly over its tokens); the reference's sums go in precomputed to both
    ld = 0.3
    counts_all = torch.cat([d["nc"], d["nr"]])
    per_token = torch.cat([torch.full((int(n),), float(v) / int(n), dtype=torch.float64)
                           for v, n in zip(torch.cat([pc, pr]), counts_all, strict=True)])  # fmt: skip
    target_seq = torch.repeat_interleave(torch.arange(counts_all.numel()), counts_all)
    target_pos = torch.cat([torch.arange(int(n)) for n in counts_all])
    weighted = torch.zeros(counts_all.numel(), dtype=torch.float64).index_add(
        0,
        target_seq,
        per_token * length_weights(target_seq, target_pos, counts_all.numel(), ld, dtype=torch.float64),
    )
    wc, wr = weighted[: pc.shape[0]], weighted[pc.shape[0] :]
    dpo_family(dpo_loss(wc, wr, rc, rr, beta=BETA), f"dpo loss.ld_alpha={ld}", "sigmoid",
               f"same (ld_alpha={ld})", beta=BETA, ld_alpha=ld)  # fmt: skip
    for name, fn, eps in (("aot", aot_loss, 0.0), ("aot_unpaired", aot_unpaired_loss, 0.1)):
        ours = fn(pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
        t_loss, t_cr, t_rj = trl_dpo([name], d, beta=BETA, label_smoothing=eps)
        rows.append((f"{name} label_smoothing={eps}, batch mean of {pc.shape[0]} pairs", f"DPOTrainer {name}",
                     maxdiff(ours[0].mean(), t_loss), max(maxdiff(ours[1].mean(), t_cr), maxdiff(ours[2].mean(), t_rj)),
                     "same; both sort over the batch they are given: dpo_ds's is one rank's micro-batch"))  # fmt: skip


def wpo_rows(rows: list, pairs: int, seed: int) -> None:
    """WPO: random logits (fp64), their per-token log p and log sum_v p_v^2 by plain torch, given to TRL's loss code
    (use_weighting=True) and to dpo_ds's (the model wrapper's per-sequence sums, losses.wpo_weights); and the same
    with dpo_ds's per-token values from its own fp32 log-prob paths on those logits."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 512, 41  # one prompt token, responses of 1-40 tokens
    counts = torch.randint(1, width, (2, pairs), generator=g)
    logits = 3 * torch.randn(2, pairs, width - 1, vocab, generator=g, dtype=torch.float64)
    # responses drawn from the logits themselves, as near on-policy as WPO assumes: weights of order 0.1-1
    labels = torch.multinomial(torch.softmax(logits, -1).reshape(-1, vocab), 1, generator=g).reshape(
        2, pairs, -1
    )
    mask = (
        torch.arange(width - 1)[None, None, :] < counts[:, :, None]
    )  # position t scores response token t + 1
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    sq = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)  # log sum_v p_v^2, TRL's older formula
    ref = (lp * mask).sum(-1) + 3 * torch.randn(2, pairs, generator=g, dtype=torch.float64)
    d = {"pc": (lp[0] * mask[0]).sum(-1), "pr": (lp[1] * mask[1]).sum(-1), "rc": ref[0], "rr": ref[1],
         "nc": counts[0], "nr": counts[1], "lp_c": lp[0], "lp_r": lp[1], "sq_c": sq[0], "sq_r": sq[1]}  # fmt: skip
    theirs = per_pair(lambda x: trl_dpo(["sigmoid"], x, beta=BETA), d)
    seq = torch.arange(2 * pairs)[:, None].expand(2 * pairs, width - 1)[mask.reshape(2 * pairs, -1)]
    for name, (tok_lp, tok_sq) in (
        ("dpo loss.wpo=true", (lp, sq)),
        ("dpo loss.wpo=true, per-token values from model.logprob_impl=chunked (float32)",
         token_logprobs(logits.float(), labels, impl="chunked", with_sq=True)),
    ):  # fmt: skip
        flat = mask.reshape(2 * pairs, -1)
        logps, n = reduce_sequences(tok_lp.reshape(2 * pairs, -1)[flat].double(), seq, 2 * pairs)
        aligned = reduce_sequences((tok_lp - tok_sq).reshape(2 * pairs, -1)[flat].double(), seq, 2 * pairs)[0]
        pc, pr = logps[:pairs], logps[pairs:]
        weights = wpo_weights(aligned[:pairs], aligned[pairs:], n[:pairs], n[pairs:])
        losses, cr, rj = dpo_loss(pc, pr, d["rc"], d["rr"], beta=BETA)
        spread = f"; weights {float(weights.min()):.2f}-{float(weights.max()):.2f}"
        rows.append((name + spread, "DPOTrainer sigmoid use_weighting=True", maxdiff(losses * weights, theirs[0]),
                     max(maxdiff(cr, theirs[1]), maxdiff(rj, theirs[2])),
                     "same (TRL's weights, given the same per-token values)" if "float32" not in name else
                     "same, up to dpo_ds's float32 per-token log p and log sum p^2"))  # fmt: skip


def maxdiff(a, b) -> float:
    return float(
        (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max()
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import trl

    d = random_pairs(args.pairs, args.seed)
    pc, pr, rc, rr, nc, nr = (d[k] for k in ("pc", "pr", "rc", "rr", "nc", "nr"))
    counts = dict(chosen_tokens=nc, rejected_tokens=nr)
    rows = []  # (ours, TRL, max |loss diff|, max |reward diff|, notes)

    def dpo_family(ours, name, trl_type, note, **kw):
        losses, cr, rj = ours
        t_loss, t_cr, t_rj = per_pair(lambda x: trl_dpo([trl_type], x, **kw), d)
        rows.append(
            (
                name,
                f"DPOTrainer {trl_type}",
                maxdiff(losses, t_loss),
                max(maxdiff(cr, t_cr), maxdiff(rj, t_rj)),
                note,
            )
        )

    dpo_family(dpo_loss(pc, pr, rc, rr, beta=BETA), "dpo", "sigmoid", "same", beta=BETA)
    dpo_family(
        ipo_loss(pc, pr, rc, rr, beta=BETA), "ipo (default, ipo_normalize=sum)", "ipo",
        "DIFFERENT BY DESIGN: TRL divides each log-ratio by its length; ours is the paper's summed h",
        beta=BETA,
    )  # fmt: skip
    dpo_family(
        ipo_length_normalized_loss(pc, pr, rc, rr, beta=BETA, **counts), "ipo ipo_normalize=length", "ipo",
        "same (TRL's per-token convention)", beta=BETA,
    )  # fmt: skip
    dpo_family(hinge_loss(pc, pr, rc, rr, beta=BETA), "hinge", "hinge", "same", beta=BETA)
    dpo_family(
        robust_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=EPS),
        f"robust label_smoothing={EPS}", "robust", "same", beta=BETA, label_smoothing=EPS,
    )  # fmt: skip
    dpo_family(apo_zero_loss(pc, pr, rc, rr, beta=BETA), "apo_zero", "apo_zero", "same", beta=BETA)
    dpo_family(apo_down_loss(pc, pr, rc, rr, beta=BETA), "apo_down", "apo_down", "same", beta=BETA)

    new_losses(d, rows, dpo_family, counts)
    wpo_rows(rows, args.pairs, args.seed)

    # cDPO: TRL 1.16's DPOTrainer "sigmoid" has no label smoothing; CPOTrainer's "sigmoid" is the same
    # equation on whatever it is given, so feed it the log-ratios
    ours = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=EPS)
    theirs = trl_cpo("sigmoid", pc - rc, pr - rr, beta=BETA, label_smoothing=EPS)
    rows.append((
        f"dpo label_smoothing={EPS} (cDPO)", "CPOTrainer.cpo_loss sigmoid", maxdiff(ours[0], theirs[0]),
        max(maxdiff(ours[1], theirs[1]), maxdiff(ours[2], theirs[2])),
        "DPOTrainer 1.16 has no cDPO; CPO's smoothed sigmoid fed log pi - log pi_ref",
    ))  # fmt: skip

    ours = simpo_loss(pc, pr, beta=SIMPO_BETA, gamma=GAMMA, **counts)
    theirs = trl_cpo("simpo", pc / nc, pr / nr, beta=SIMPO_BETA, simpo_gamma=GAMMA)
    rows.append((
        f"simpo beta={SIMPO_BETA} gamma={GAMMA}", "CPOTrainer.cpo_loss simpo", maxdiff(ours[0], theirs[0]),
        max(maxdiff(ours[1], theirs[1]), maxdiff(ours[2], theirs[2])),
        "same; loss.gamma = TRL's simpo_gamma (the margin itself, not gamma/beta); cpo_alpha=0",
    ))  # fmt: skip

    ours = orpo_loss(pc, pr, orpo_lambda=LAMBDA, **counts)
    theirs = trl_orpo_odds_ratio_term(pc / nc, pr / nr, lam=LAMBDA)
    rows.append((
        f"orpo orpo_lambda={LAMBDA}, odds-ratio term", "ORPOTrainer.odds_ratio_loss",
        maxdiff(ours[0] - chosen_nll(pc, nc), theirs[0]),
        max(maxdiff(ours[1], theirs[1]), maxdiff(ours[2], theirs[2])),
        "TRL casts to float32 here; its NLL term (not callable) averages all chosen tokens of the batch, "
        "ours each response's tokens (equal iff chosen lengths are equal); TRL's beta is our orpo_lambda",
    ))  # fmt: skip

    # weighted sum [dpo, sft]: batch means, as TRL returns them
    for equal in (False, True):
        e = random_pairs(args.pairs, args.seed + 1, equal_lengths=equal)
        ours = dpo_loss(e["pc"], e["pr"], e["rc"], e["rr"], beta=BETA)[0] + ALPHA * chosen_nll(
            e["pc"], e["nc"]
        )
        theirs = trl_dpo(["sigmoid", "sft"], e, beta=BETA, weights=[1.0, ALPHA])[0]
        rows.append((
            f"loss=[dpo,sft] weights=[1,{ALPHA}], batch mean" + (", equal chosen lengths" if equal else ""),
            f"DPOTrainer [sigmoid, sft] loss_weights=[1,{ALPHA}]", maxdiff(ours.mean(), theirs), float("nan"),
            "same" if equal else "DIFFERENT BY DESIGN: TRL's sft term is a mean over all chosen tokens "
            "of the batch, ours (RPO) a mean over pairs of each pair's per-token NLL",
        ))  # fmt: skip

    print(f"trl {trl.__version__}, torch {torch.__version__}; {args.pairs} random pairs (float64)", end="")
    print(f", seed {args.seed}")
    print(f"beta {BETA} (SimPO {SIMPO_BETA}), label_smoothing {EPS}, gamma {GAMMA}, orpo_lambda {LAMBDA}")
    print(
        "losses: per pair (TRL's DPOTrainer called once per pair), except the [dpo,sft] rows: batch means\n"
    )
    print("| ours | TRL | max abs loss diff | max abs reward diff | conventions |")
    print("|---|---|---|---|---|")
    for name, theirs, dl, dr, note in rows:
        dr_s = "-" if math.isnan(dr) else f"{dr:.1e}"
        print(f"| {name} | {theirs} | {dl:.1e} | {dr_s} | {note} |")
    print("\nEvery dpo_ds preference loss has a TRL counterpart above (TRL's cDPO only in CPOTrainer).")
    worst = max(
        dl for name, _, dl, _, note in rows if note.startswith("same") and "float32" not in name + note
    )
    print(f"largest |ours - TRL| of the losses that agree by design, float64: {worst:.1e} (target 1e-10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
