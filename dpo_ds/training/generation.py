"""Greedy generation at eval: the policy's and the reference's samples, and the checker's answers.

Prompts are the ids the model trained on (chat template or BOS rule, truncation): left-padded into
one batch, generation stops at EOS and at the template's end-of-turn token. Every rank generates
its share of the prompts, the same number of calls on the same number of prompts on every rank
(data.batches.rank_share), because under ZeRO-3 a generate is a collective: every forward gathers
parameters on every rank.

Under ZeRO-3, generating token by token through DeepSpeed's per-module gather/release costs a
parameter fetch and release per submodule per token. With eval.gather_for_generation the whole
model is gathered once for the generation and released after it (engine_gather.gathered_for_generation);
`auto` does so when a full copy of the model fits in the memory free on the device, and the log
says which was done. What is generated does not depend on it (greedy, same weights).

Where the reference's samples come from is the reference source's business (reference.py): its
`sampler()` gives the model to generate from, or None (precomputed, reference-free).
"""

from __future__ import annotations

import json
import logging
import time

import torch

from dpo_ds.data.batches import Batches, rank_share
from dpo_ds.dist import comm
from dpo_ds.engine import gather as engine_gather
from dpo_ds.training import metrics as metric_names
from dpo_ds.training.guards import score

log = logging.getLogger("dpo_ds")


class Generation:
    """Samples of policy and reference at each eval (samples.jsonl) and the checker's score."""

    def __init__(
        self,
        *,
        tokenizer,
        eval_data: Batches,
        max_new_tokens: int,
        gather: str,
        samples_path,
        n_samples: int,
        checker=None,
        n_checked: int = 0,
        rank: int,
        world: int,
        device: torch.device,
    ):
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.stop_ids = eval_data.tokenization.stop_ids
        self.max_new_tokens = max_new_tokens
        self.gather = gather  # eval.gather_for_generation: auto | true | false
        self.samples_path = samples_path
        self.n_samples = n_samples
        self.checker = checker
        self.n_checked = n_checked
        self.rank, self.world, self.device = rank, world, device
        self._said: set[tuple[str, str]] = set()  # what was logged about gathering

    @torch.no_grad()
    def evaluate(self, step: int, policy, reference) -> dict[str, float]:
        """The checker's score and the samples of this eval; metrics eval/checker_score and the seconds
        each took (eval/checker_seconds, eval/sample_seconds)."""
        metrics = {}
        if self.checker is not None:
            t0 = time.time()
            metrics[metric_names.CHECKER_SCORE] = self.check(policy)
            metrics["eval/checker_seconds"] = time.time() - t0
        if self.n_samples:
            t0 = time.time()
            self.write_samples(step, policy, reference)
            metrics["eval/sample_seconds"] = time.time() - t0
        return metrics

    def check(self, policy) -> float:
        """eval.checker's mean score of greedy generations on eval.n_checked held-out prompts. Every
        rank generates its share (the same count on every rank, as ZeRO-3 requires) and scores it."""
        items = self.eval_data.checked(self.n_checked)
        mine, n_real = rank_share(items, self.rank, self.world)
        answers = self.generate(policy, [ids for ids, _ in mine], "policy")
        scored = []
        for (_, ex), answer in list(zip(mine, answers))[:n_real]:
            row = {"prompt": ex.prompt, "chosen": ex.responses[0], "origin": (ex.origins or [""])[0]}
            if len(ex.responses) > 1:
                row["rejected"] = ex.responses[1]
            scored.append((ex.prompt, answer, row))
        total = checked_total(self.checker, scored)
        sums = comm.all_reduce_sum(
            torch.tensor([total, float(n_real)], dtype=torch.float64, device=comm.comm_device())
        )
        return (sums[0] / sums[1].clamp(min=1)).item()

    def write_samples(self, step: int, policy, reference) -> None:
        prompts = self.eval_data.prompts(self.n_samples)
        mine, n_real = rank_share(prompts, self.rank, self.world)  # equal work on every rank
        policy_out = self.generate(policy, mine, "policy")
        with reference.sampler() as ref:  # the reference's own model, or None (precomputed, none)
            ref_out = self.generate(ref, mine, "reference") if ref is not None else [None] * len(mine)
        # the prompt as the model saw it: the chat template's (or BOS's) special tokens shown
        rows = [
            {"step": step, "prompt": self.tokenizer.decode(p), "policy": a, "reference": b}
            for p, a, b in list(zip(mine, policy_out, ref_out))[:n_real]
        ]
        gathered = comm.all_gather_objects(rows)
        if self.rank == 0:
            with open(self.samples_path, "a") as f:
                for part in gathered:
                    for r in part:
                        f.write(json.dumps(r) + "\n")

    def generate(self, engine, prompts: list[list[int]], what: str) -> list[str]:
        """Greedy continuations of prompt ids, stopping at EOS or the template's end of turn."""
        tok = self.tokenizer
        width = max(len(x) for x in prompts)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device)
        with engine_gather.gathered_for_generation(engine, self.gather) as (lm, how, in_step):
            if (what, how) not in self._said:  # once per model, and again when the choice changes
                self._said.add((what, how))
                log.info(f"generation ({what}): {how}")
            out = lm.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=self.stop_ids,
                synced_gpus=self.world > 1 and in_step,  # every forward a collective: step together
            )
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


def checked_total(checker, scored) -> float:
    """The summed checker scores of this rank's (prompt, generation, row) triples. A checker that raises,
    or returns anything but a number in [0, 1], on any rank stops every rank alike with the same error:
    one rank raising alone would leave the others waiting in the next collective."""
    total, error = 0.0, None
    try:
        for prompt, generation, row in scored:
            total += score(checker, prompt, generation, row)
    except Exception as e:  # noqa: BLE001 - any error of the user's checker; raised on every rank below
        error = f"{type(e).__name__}: {e}"
    comm.fail_alike(error, lambda failed: ValueError(f"eval.checker failed: {comm.by_rank(failed)}"))
    return total
