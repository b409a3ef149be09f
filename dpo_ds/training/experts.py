"""Expert load at eval: how a Mixture-of-Experts policy routes the eval set, against how its reference does.

DPO moves the router as it moves everything else, and nothing in the loss watches routing: an expert the
reference used can go silent, or one expert can take most tokens, while the reward accuracy climbs. Each
eval sums, per layer and expert, the routed token assignments of the policy's forwards and of the
reference's (model/router.py's load: a token counts once per sequence it belongs to, as the router loss
counts it), over every rank, and reports:

    experts_eval/max_share       the largest fraction of a layer's tokens that one expert receives (top-k
                                 routing: a balanced layer gives k / E to each expert; 1 is every token)
    experts_eval/entropy         the mean over layers of the entropy of the experts' shares over log E
                                 (1: uniform; 0: one expert)
    experts_eval/unused          (layer, expert) pairs that received no token
    experts_eval/ref_*           the same three for the reference, where it is a model (not precomputed)
    experts_eval/silenced        (layer, expert) pairs the reference routed tokens to and the policy none

and warns when routing collapses: an expert the reference used is silenced, or one expert takes more than
COLLAPSE_SHARE of a layer's tokens where the reference's largest did not.
"""

from __future__ import annotations

import logging
import math

import torch

from dpo_ds.dist import comm
from dpo_ds.training import metrics as metric_names

log = logging.getLogger("dpo_ds")

COLLAPSE_SHARE = 0.5  # one expert receiving more than this fraction of a layer's tokens: routing collapsed


def token_shares(load: torch.Tensor, top_k: int) -> torch.Tensor:
    """(layers, experts) the fraction of each layer's routed tokens each expert receives."""
    tokens = load.sum(dim=-1, keepdim=True) / top_k
    return load / tokens.clamp(min=1e-12)


def summary(load: torch.Tensor, top_k: int) -> dict[str, float]:
    """max_share, entropy and unused of one model's (layers, experts) load."""
    experts = load.shape[-1]
    p = load / load.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=-1) / math.log(experts)
    return {
        "max_share": token_shares(load, top_k).max().item(),
        "entropy": entropy.mean().item(),
        "unused": float((load == 0).sum().item()),
    }


class ExpertLoad:
    """One eval's sums of the policy's and the reference's expert load, then its metrics and warnings."""

    def __init__(self, top_k: int | None):
        self.top_k = top_k
        self.policy: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None

    def add(self, policy_load: torch.Tensor | None, reference_load: torch.Tensor | None) -> None:
        if policy_load is not None:
            self.policy = policy_load.detach().double().cpu() + (0 if self.policy is None else self.policy)
        if reference_load is not None:
            self.reference = reference_load.detach().double().cpu() + (
                0 if self.reference is None else self.reference
            )

    def metrics(self, step: int, rank: int) -> dict[str, float]:
        """Summed over the ranks (every rank calls it, with a model of the same kind) and summarised."""
        if self.policy is None or self.top_k is None:
            return {}
        loads = [self.policy] + ([self.reference] if self.reference is not None else [])
        summed = comm.all_reduce_sum(torch.stack(loads).to(comm.comm_device())).cpu()
        policy = summed[0]
        out = {metric_names.key("experts", "eval", k): v for k, v in summary(policy, self.top_k).items()}
        if len(summed) > 1:
            reference = summed[1]
            out.update(
                {
                    metric_names.key("experts", "eval", f"ref_{k}"): v
                    for k, v in summary(reference, self.top_k).items()
                }
            )
            silenced = (reference > 0) & (policy == 0)
            out[metric_names.key("experts", "eval", "silenced")] = float(silenced.sum().item())
            if rank == 0:
                for line in collapse_warnings(policy, reference, self.top_k, step):
                    log.warning(line)
        return out


def collapse_warnings(policy: torch.Tensor, reference: torch.Tensor, top_k: int, step: int) -> list[str]:
    """One line per layer whose routing collapsed against the reference's."""
    mine, theirs = token_shares(policy, top_k), token_shares(reference, top_k)
    lines = []
    for layer in range(policy.shape[0]):
        gone = ((reference[layer] > 0) & (policy[layer] == 0)).nonzero().flatten().tolist()
        if gone:
            was = ", ".join(f"{e} ({theirs[layer, e].item():.1%})" for e in gone[:8])
            lines.append(
                f"eval at step {step}: layer {layer}: expert(s) {was} of the reference's tokens get none of the "
                f"policy's: DPO silenced them (experts_eval/silenced)"
            )
        top = int(mine[layer].argmax())
        if mine[layer, top] > COLLAPSE_SHARE >= theirs[layer].max():
            lines.append(
                f"eval at step {step}: layer {layer}: expert {top} receives {mine[layer, top].item():.1%} of the "
                f"policy's tokens (the reference's largest share: {theirs[layer].max().item():.1%}): routing collapses "
                f"onto one expert (experts_eval/max_share)"
            )
    return lines
