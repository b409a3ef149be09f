"""The loop: policy log-probs, reference log-probs, objective, backward/step; then "eval? save? stop?".

The trainer asks; it does not decide: the objective (objectives.py) says what the loss is and
whether it needs a reference; the reference source (reference.py) answers with a live engine's
log-probs, a precomputed table's, or None; the guards (guards.py) say whether a step was bad or the
run must stop; the checkpointer (run/save.py) owns the save protocol; generation.py owns samples and
the checker. Every rank runs the same forwards in the same order (policy, then reference, then
generation at eval), which ZeRO-3 requires: parameters are gathered collectively on each module call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import torch

from dpo_ds.config import Config, to_dict
from dpo_ds.data.batches import Batches
from dpo_ds.dist import comm
from dpo_ds.dist import memory as dist_memory
from dpo_ds.engine import step as engine_step
from dpo_ds.model.lm import sequence_logps
from dpo_ds.run.dir import RunDir
from dpo_ds.run.save import Checkpointer
from dpo_ds.training import metrics as metric_names
from dpo_ds.training.experts import ExpertLoad
from dpo_ds.training.generation import Generation
from dpo_ds.training.guards import DisplacementGuard, NonFiniteGuard, TrainingStopped
from dpo_ds.training.objectives import shift_stats
from dpo_ds.training.reference import initial_eval_logps

log = logging.getLogger("dpo_ds")

__all__ = ["MetricsSink", "Trainer", "TrainingStopped"]


class MetricsSink:
    """metrics.jsonl on rank 0, and wandb when enabled (offline mode needs no account)."""

    def __init__(self, cfg: Config, run_dir: RunDir, rank: int):
        self.rank = rank
        self.path = run_dir.metrics
        self.pending: list[str] = []  # records the disk refused, written with the next ones
        self.refused: str | None = None
        self.wandb = None
        if rank == 0 and cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.exp_name,
                mode=cfg.wandb.mode,
                dir=str(run_dir.root),
                config=to_dict(cfg),
            )

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.pending.append(json.dumps(record) + "\n")
        self.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def flush(self) -> str | None:
        """Append the records not yet on disk: None once they are, else why not. A full disk does not end
        the run: the records are held and written with the next ones, and no checkpoint is saved while any
        is held (Trainer.save), so a resume never skips a step's record."""
        if self.rank != 0 or not self.pending:
            return None
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:
                f.write("".join(self.pending))
        except OSError as e:
            try:
                os.truncate(self.path, size)  # no half-written line left behind
            except OSError:
                pass
            if self.refused is None:
                log.warning(
                    f"{self.path.name}: cannot append ({type(e).__name__}: {e}); its records are held until "
                    f"the disk takes them, and no checkpoint is saved meanwhile"
                )
            self.refused = f"{type(e).__name__}: {e}"
            return f"{self.path} holds {len(self.pending)} record(s) the disk refused ({self.refused})"
        if self.refused is not None:
            log.info(f"{self.path.name}: the {len(self.pending)} held record(s) are written")
        self.refused = None
        self.pending.clear()
        return None

    def close(self) -> None:
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        *,
        policy,
        objective,
        reference,
        train_data: Batches,
        eval_data: Batches,
        generation: Generation,
        checkpoints: Checkpointer,
        sink: MetricsSink,
        watchdog,
        preemption,
        rank: int,
        device: torch.device,
        memory: dict | None = None,
    ):
        self.cfg = cfg
        self.policy = policy  # the DeepSpeed engine being trained
        self.objective = objective  # objectives.py: the loss and what it needs
        self.reference = reference  # reference.py: a live engine, a precomputed table, or nothing
        self.train_data, self.eval_data = train_data, eval_data
        self.generation = generation  # generation.py: samples and the checker at each eval
        self.checkpoints = checkpoints  # run.save.Checkpointer: the save protocol
        self.last_save_ok = False  # the latest save's outcome (save()), for the preemption's last line
        self.sink = sink
        self.watchdog, self.preemption = watchdog, preemption  # watchdog.py
        self.rank, self.device = rank, device
        self.memory = (
            memory or {}
        )  # memory before and after the models were built (and max over ranks), at step 1
        self.nonfinite = NonFiniteGuard(cfg.guard.max_bad_steps, checkpoints.run_dir.latest_target)
        moving = bool(
            cfg.model.reference_sync_steps
        )  # TR-DPO: the guard reads the eval, against the initial reference
        self.displacement = DisplacementGuard(
            cfg.guard.max_chosen_drop_per_token, cfg.guard.action, ("eval",) if moving else ("train", "eval")
        )
        self.initial_eval = None  # TR-DPO: reference.initial_eval_logps, made at the start of train()
        self.preempted = False
        self.stop_reason = ""  # guard.action=stop: why the run ended early
        self._eval_batches = None
        routing = engine_step.routing(
            policy
        )  # an MoE's (model/router.py): its expert load is watched at eval
        self.top_k = routing.top_k if routing is not None else None

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(
        self, batch: dict, load: ExpertLoad | None = None, evaluating: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses (examples,) and per-example statistics for one micro-batch; an MoE's expert
        load of both models added to `load` when given (at eval)."""
        b = batch.to(self.device)
        policy = sequence_logps(self.policy, b)  # per sequence: summed log-probs and token counts
        reference = self.reference.logps(b)
        if load is not None:
            load.add(policy.load, getattr(self.reference, "last_load", None))
        losses, stats = self.objective(policy, reference, b)
        if evaluating and self.initial_eval is not None:  # TR-DPO's eval: displacement from the start
            stats.update(shift_stats(policy, self.initial_eval.logps(b)))
        return losses, stats

    def _reduce(self, sums: dict[str, torch.Tensor], count: int, split: str) -> dict[str, float]:
        """Means over all examples of all ranks, named as in the original: rewards_train/chosen..."""
        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names] + [torch.tensor(float(count))]).to(comm.comm_device())
        vec = comm.all_reduce_sum(vec.double()).cpu()
        total = vec[-1].item()
        out = {}
        for i, k in enumerate(names):
            out[metric_names.of_stat(k, split)] = vec[i].item() / max(total, 1)
        return out

    @staticmethod
    def _accumulate(sums: dict, losses: torch.Tensor, stats: dict) -> None:
        # the objective may name the loss it reports ("loss" in stats) apart from the one it optimises
        for k, v in {"loss": losses.detach(), **stats}.items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.double().sum().cpu()

    # ------------------------------------------------------------------ loop

    def train(self, start_step: int = 0) -> dict:
        cfg = self.cfg
        n_steps = self.train_data.n_steps(cfg.n_epochs, cfg.n_examples)
        examples = start_step * cfg.batch_size
        if cfg.model.reference_sync_steps:  # before any sync (or read back on resume)
            self._eval_batches = self._eval_batches or self.eval_data.eval_batches(cfg.n_eval_examples)
            self.initial_eval = initial_eval_logps(
                cfg.run_dir, self.reference, self._eval_batches, self.device
            )
        if start_step == 0 and cfg.do_first_eval:
            self.evaluate(step=0, examples=0, save=False)
        last_eval_bucket = examples // cfg.eval_every
        bar = self._progress_bar(n_steps, start_step)
        eval_metrics: dict = {}
        self.policy.train()
        dist_memory.reset_peak_memory()
        t_last = time.time()
        for step in self.train_data.train_steps(cfg.n_epochs, cfg.n_examples, start_step):
            number = step.index + 1
            with self.watchdog.phase(f"training step {number}"):
                metrics = self._step(step)
                # one collective for both decisions, so every rank takes the same branch; inside the
                # step's deadline, as a peer that stops between steps leaves this rank waiting here
                bad, preempted = comm.any_rank_flagged(
                    not math.isfinite(metrics[metric_names.LOSS_TRAIN]), self.preemption.requested
                )
            if step.index == start_step:
                metrics.update(self.memory)
            self._sync_reference(number, metrics)
            examples = step.examples_after
            bad = bad or not math.isfinite(metrics[metric_names.GRAD_NORM])
            stop = self.nonfinite.check(number, bad, metrics, self._weights_broken)
            stop_reason = self.displacement.should_stop(metrics, "train", number)
            self.sink.write({"step": number, **metrics})  # the bad step is on record too
            if stop is not None:
                raise stop
            if bar is not None:
                bar.update(1)
                if number % cfg.log_every == 0 or time.time() - t_last > 60:
                    t_last = time.time()
                    line = self._line(number, examples, metrics, "train")
                    bar.write(line) if not bar.disable else log.info(line)
            saved = stop_reason is not None and self._stop_early(stop_reason, number, examples, metrics)
            bucket = examples // cfg.eval_every
            if bucket > last_eval_bucket and not self.stop_reason:
                last_eval_bucket = bucket
                eval_metrics = self.evaluate(number, examples, save=True)
                saved = True
                self.policy.train()
            every = cfg.checkpoint.save_every
            if (every and number % every == 0 or preempted) and not saved:
                self.save(number, examples, metrics)
            if self.stop_reason:
                break
            if preempted:
                kept = (  # this step's save was made above, by the eval, save_every or the preemption
                    "saved"
                    if self.last_save_ok
                    else "this step not saved (said above); LATEST is the last good checkpoint"
                )
                log.warning(
                    f"preempted at step {number} ({self.preemption.signal_name or 'a signal on another rank'}): "
                    f"{kept}; continue with resume_from=auto"
                )
                self.preempted = True
                break
        if bar is not None:
            bar.close()
        done = self.preempted or self.stop_reason
        if not done and not (eval_metrics and eval_metrics.get(metric_names.EXAMPLES) == examples):
            eval_metrics = self.evaluate(n_steps, examples, save=True, final=True)
        self.sink.close()
        return eval_metrics

    def _progress_bar(self, n_steps: int, start_step: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        # a bar only on a terminal; in a log file (slurm, CI) the periodic log lines say the same
        return tqdm(
            total=n_steps, initial=start_step, desc=self.cfg.loss.name, dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )  # fmt: skip

    def _step(self, step) -> dict:
        """Forward, backward and optimizer step of one global batch; this rank's share."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        t0 = time.time()
        # (logical tokens: prompt + response of every sequence, as a padded layout or TRL runs them;
        #  tokens actually computed; row slots incl. padding)
        tokens = torch.zeros(3, dtype=torch.float64)
        lr = engine_step.current_lr(self.policy)  # the rate this step uses; step() advances the schedule
        for k, micro in enumerate(step.micro_batches):
            tokens += torch.tensor([micro.logical_tokens, micro.computed_tokens, micro.input_ids.numel()])
            losses, stats = self.micro_batch(micro)
            # normalised over this rank's examples in the whole step; DeepSpeed then averages the
            # ranks, which see equal numbers of examples: the mean over the global batch. A step with
            # a non-finite gradient norm is discarded by DeepSpeed's ZeRO optimizers (guards.NonFiniteGuard).
            loss = losses.sum() / step.n_local
            engine_step.backward(self.policy, loss, last_micro_batch=k == len(step.micro_batches) - 1)
            self._accumulate(sums, losses, stats)
        metrics = self._reduce(sums, step.n_local, "train")
        real, computed, slots = comm.all_reduce_sum(tokens.to(comm.comm_device())).tolist()
        seconds = max(time.time() - t0, 1e-9)
        metrics.update(
            {
                metric_names.GRAD_NORM: engine_step.grad_norm(self.policy),
                metric_names.LR: lr,
                "examples_per_second": cfg.batch_size / seconds,
                "throughput/step_seconds": seconds,
                # all ranks; "real" counts a shared prompt once per response, so layouts compare
                "throughput/real_tokens_per_second": real / seconds,
                "throughput/computed_tokens_per_second": computed / seconds,
                "throughput/padding_fraction": 1 - computed / max(slots, 1),
                # peak since training started (the build phase excluded), and after the step: rank 0's,
                # and the largest of any rank with its rank (memory/peak_gib_max, ..._max_rank)
                **dist_memory.memory_across_ranks(
                    {
                        metric_names.MEMORY_PEAK: dist_memory.peak_memory_gib(),
                        metric_names.MEMORY_NOW: dist_memory.memory_now_gib(),
                    }
                ),
                metric_names.EXAMPLES: step.examples_after,
                metric_names.UPDATES: step.index + 1,
            }
        )
        return metrics

    def _sync_reference(self, number: int, metrics: dict) -> None:
        """TR-DPO (model.reference_sync_steps=N): after every N-th optimizer step the reference moves toward the
        policy (training/reference.LiveReference.sync), as TRL's SyncRefModelCallback does at its step's end."""
        every = self.cfg.model.reference_sync_steps
        if not every or number % every:
            return
        with self.watchdog.phase(f"reference sync after step {number}"):
            self.reference.sync(self.policy, self.cfg.model.reference_mixup_alpha)
        metrics["reference/syncs"] = number // every

    def _weights_broken(self) -> bool:
        """After a non-finite step: whether a stage-0 optimizer applied it (ZeRO 1-3 discard it)."""
        if engine_step.zero_stage(self.policy) != 0:
            return False
        (broken,) = comm.any_rank_flagged(not engine_step.local_weights_finite(self.policy))
        return broken

    def _line(self, step: int, examples: int, m: dict, split: str) -> str:
        keys = [metric_names.of_stat(k, split) for k in ("loss", "rewards/accuracies", "rewards/margins")]
        keys += [metric_names.of_stat(k, split) for k in ("logps/chosen", "logps/chosen_shift_per_token")]
        keys += (
            [metric_names.GRAD_NORM, metric_names.LR] if split == "train" else [metric_names.CHECKER_SCORE]
        )
        parts = [f"{k} {m[k]:.4g}" for k in keys if k in m]
        return f"[{split}] step {step} examples {examples} | " + " | ".join(parts)

    # ------------------------------------------------------------------ eval, save, stop

    def evaluate(self, step: int, examples: int, save: bool, final: bool = False) -> dict:
        with self.watchdog.phase(f"eval at step {step}", deadline=False):  # named in a hang report
            metrics, stop_reason = self._evaluate(step, examples)
        if stop_reason is not None and self._stop_early(stop_reason, step, examples, metrics):
            return metrics  # saved already
        if save:
            self.save(step, examples, metrics, final=final)
        return metrics

    @torch.no_grad()
    def _evaluate(self, step: int, examples: int) -> tuple[dict, str | None]:
        self.policy.eval()
        if self._eval_batches is None:
            self._eval_batches = self.eval_data.eval_batches(self.cfg.n_eval_examples)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        load = ExpertLoad(self.top_k)
        for micro_batches, n_local in self._eval_batches:
            for micro in micro_batches:
                losses, stats = self.micro_batch(micro, load, evaluating=True)
                self._accumulate(sums, losses, stats)
            count += n_local
        metrics = self._reduce(sums, count, "eval") if count else {}
        metrics.update(load.metrics(step, self.rank))  # an MoE's routing against the reference's
        metrics[metric_names.EXAMPLES] = examples
        metrics.update(self.generation.evaluate(step, self.policy, self.reference))  # checker, samples
        stop_reason = self.displacement.should_stop(metrics, "eval", step)
        self.sink.write({"step": step, **metrics})
        if self.rank == 0:
            log.info(self._line(step, examples, metrics, "eval"))
        return metrics, stop_reason

    def _stop_early(self, reason: str, step: int, examples: int, metrics: dict) -> bool:
        """guard.action=stop fired (every rank alike: the metrics it reads are reduced over all ranks):
        say why, save, and end the loop. Returns whether it saved."""
        self.sink.write({"step": step, "guard/stopped": reason})
        self.stop_reason = reason
        return self.save(step, examples, metrics)

    def save(self, step: int, examples: int, metrics: dict, final: bool = False) -> bool:
        """Whether the step was written; the answer is also kept (last_save_ok) for the preemption's last line,
        whichever path (an eval, save_every, the preemption itself) made the save."""
        if not self.nonfinite.may_save:  # decided alike on every rank
            log.warning(f"not saving step-{examples}: step {step} had a non-finite loss or gradient norm")
            self.last_save_ok = False
        else:
            unwritten = comm.decided_by_rank0(self.sink.flush)  # rank 0's metrics on disk first
            self.last_save_ok = self.checkpoints.save(
                self.policy, step, examples, metrics, final=final, blocked=unwritten
            )
        return self.last_save_ok
