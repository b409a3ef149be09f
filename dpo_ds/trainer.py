"""The loop: policy log-probs, reference log-probs, objective, backward/step, eval, save.

The trainer asks; it does not decide: the objective (objectives.py) says what the loss is and
whether it needs a reference, the reference source (reference.py) answers with a live engine's
log-probs, a precomputed table's, or None. Every rank runs the same forwards in the same order
(policy, then reference, then generation at eval), which ZeRO-3 requires: parameters are gathered
collectively on each module call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import torch

from dpo_ds import checkpoint, engines
from dpo_ds.checkpoint import RunDir
from dpo_ds.config import Config, to_dict
from dpo_ds.data.batches import Batches
from dpo_ds.data.collate import to_device
from dpo_ds.guards import DisplacementGuard
from dpo_ds.model import sequence_logps

log = logging.getLogger("dpo_ds")


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite steps in a row, saves failing in a row); raised on every rank."""


class MetricsSink:
    """metrics.jsonl on rank 0, and wandb when enabled (offline mode needs no account)."""

    def __init__(self, cfg: Config, run_dir: RunDir, rank: int):
        self.rank = rank
        self.path = run_dir.metrics
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        policy,
        objective,
        reference,
        train_data: Batches,
        eval_data: Batches,
        tokenizer,
        run_dir: RunDir,
        rank: int,
        world: int,
        device: torch.device,
        memory: dict | None = None,
    ):
        self.cfg = cfg
        self.policy = policy
        self.objective = objective  # objectives.py: the loss and what it needs
        self.memory = (
            memory or {}
        )  # memory before and after the models were built (and max over ranks), at step 1
        self.reference = reference  # reference.py: a live engine, a precomputed table, or nothing
        self.train_data = train_data
        self.eval_data = eval_data
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.rank = rank
        self.world = world
        self.device = device
        self.watchdog = None  # set by train.py: watchdog.Watchdog and watchdog.Preemption
        self.preemption = None
        self.data_digest = ""  # what a resume is checked against (run_state.json)
        self.preempted = False
        self.bad_steps_total = 0
        self.bad_in_a_row = 0
        self.failed_saves = 0
        self.saves = 0
        self.displacement = DisplacementGuard(cfg.guard.max_chosen_drop_per_token)
        self.generation = None  # set by train.py: generation.Generation (samples, checker)
        self.stop_reason = ""  # guard.action=stop: why the run ended early
        self.sink = MetricsSink(cfg, run_dir, rank)

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-example losses (examples,) and per-example statistics for one micro-batch."""
        b = to_device(batch, self.device)
        policy = sequence_logps(self.policy, b)  # per sequence: summed log-probs and token counts
        return self.objective(policy, self.reference.logps(b), b)

    def _reduce(self, sums: dict[str, torch.Tensor], count: int, split: str) -> dict[str, float]:
        """Means over all examples of all ranks, named as in the original: rewards_train/chosen..."""
        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names] + [torch.tensor(float(count))]).to(engines.comm_device())
        vec = engines.all_reduce_sum(vec.double()).cpu()
        total = vec[-1].item()
        out = {}
        for i, k in enumerate(names):
            group, _, field = k.partition("/")
            out[f"{group}_{split}/{field}" if field else f"{k}/{split}"] = vec[i].item() / max(total, 1)
        return out

    @staticmethod
    def _accumulate(sums: dict, losses: torch.Tensor, stats: dict) -> None:
        for k, v in [("loss", losses.detach())] + list(stats.items()):
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.double().sum().cpu()

    # ------------------------------------------------------------------ loop

    def train(self, start_step: int = 0) -> dict:
        cfg = self.cfg
        n_steps = self.train_data.n_steps(cfg.n_epochs, cfg.n_examples)
        examples = start_step * cfg.batch_size
        if start_step == 0 and cfg.do_first_eval:
            self.evaluate(step=0, examples=0, save=False)
        last_eval_bucket = examples // cfg.eval_every
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            # a bar only on a terminal; in a log file (slurm, CI) the periodic log lines say the same
            bar = tqdm(
                total=n_steps,
                initial=start_step,
                desc=cfg.loss.name,
                dynamic_ncols=True,
                disable=not sys.stderr.isatty(),
            )
        eval_metrics: dict = {}
        self.policy.train()
        engines.reset_peak_memory()
        t_last = time.time()
        for step in self.train_data.train_steps(cfg.n_epochs, cfg.n_examples, start_step):
            with self.watchdog.phase(f"training step {step.index + 1}"):
                metrics = self._step(step)
                # one collective for both decisions, so every rank takes the same branch; inside the
                # step's deadline, as a peer that stops between steps leaves this rank waiting here
                bad, preempted = self._agree(
                    not math.isfinite(metrics["loss/train"]), self.preemption.requested
                )
            if step.index == start_step:
                metrics.update(self.memory)
            examples = step.examples_after
            bad = bad or not math.isfinite(metrics["grad_norm"])
            stop = self._guard(step.index + 1, bad, metrics)
            displaced = self.displacement.check(metrics, "train")
            self.sink.write({"step": step.index + 1, **metrics})  # the bad step is on record too
            if stop is not None:
                raise stop
            if bar is not None:
                bar.update(1)
                if (step.index + 1) % cfg.log_every == 0 or time.time() - t_last > 60:
                    t_last = time.time()
                    line = self._line(step.index + 1, examples, metrics, "train")
                    bar.write(line) if not bar.disable else log.info(line)
            saved = False
            if displaced:
                saved = self._displaced(displaced, step.index + 1, examples, metrics)
            bucket = examples // cfg.eval_every
            if bucket > last_eval_bucket and not self.stop_reason:
                last_eval_bucket = bucket
                eval_metrics = self.evaluate(step.index + 1, examples, save=True)
                saved = True
                self.policy.train()
            every = cfg.checkpoint.save_every
            if (every and (step.index + 1) % every == 0 or preempted) and not saved:
                self.save(step.index + 1, examples, metrics)
            if self.stop_reason:
                break
            if preempted:
                log.warning(
                    f"preempted at step {step.index + 1} ({self.preemption.signal_name or 'a signal on another rank'}): "
                    f"saved; continue with resume_from=auto"
                )
                self.preempted = True
                break
        if bar is not None:
            bar.close()
        done = self.preempted or self.stop_reason
        if not done and not (eval_metrics and eval_metrics.get("counters/examples") == examples):
            eval_metrics = self.evaluate(n_steps, examples, save=True, final=True)
        self.sink.close()
        return eval_metrics

    def _step(self, step) -> dict:
        """Forward, backward and optimizer step of one global batch; this rank's share."""
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        t0 = time.time()
        # (logical tokens: prompt + response of every sequence, as a padded layout or TRL runs them;
        #  tokens actually computed; row slots incl. padding)
        tokens = torch.zeros(3, dtype=torch.float64)
        lr = engines.current_lr(self.policy)  # the rate this step uses; step() advances the schedule
        for k, micro in enumerate(step.micro_batches):
            computed = (micro["seq_ids"] >= 0).sum().item()
            tokens += torch.tensor([micro["logical_tokens"], computed, micro["input_ids"].numel()])
            losses, stats = self.micro_batch(micro)
            # normalised over this rank's examples in the whole step; DeepSpeed then averages the
            # ranks, which see equal numbers of examples: the mean over the global batch. A step with
            # a non-finite gradient norm is discarded by DeepSpeed's ZeRO optimizers (see _guard).
            loss = losses.sum() / step.n_local
            engines.backward(self.policy, loss, last_micro_batch=k == len(step.micro_batches) - 1)
            self._accumulate(sums, losses, stats)
        metrics = self._reduce(sums, step.n_local, "train")
        real, computed, slots = engines.all_reduce_sum(tokens.to(engines.comm_device())).tolist()
        seconds = max(time.time() - t0, 1e-9)
        metrics.update(
            {
                "grad_norm": engines.grad_norm(self.policy),
                "lr": lr,
                "examples_per_second": cfg.batch_size / seconds,
                "throughput/step_seconds": seconds,
                # all ranks; "real" counts a shared prompt once per response, so layouts compare
                "throughput/real_tokens_per_second": real / seconds,
                "throughput/computed_tokens_per_second": computed / seconds,
                "throughput/padding_fraction": 1 - computed / max(slots, 1),
                # peak since training started (the build phase excluded), and after the step: rank 0's,
                # and the largest of any rank with its rank (memory/peak_gib_max, ..._max_rank)
                **engines.memory_across_ranks(
                    {"memory/peak_gib": engines.peak_memory_gib(), "memory/now_gib": engines.memory_now_gib()}
                ),
                "counters/examples": step.examples_after,
                "counters/updates": step.index + 1,
            }
        )
        return metrics

    @staticmethod
    def _agree(*flags: bool) -> list[bool]:
        """Whether any rank raised each flag (one all-reduce)."""
        t = torch.tensor([float(f) for f in flags], device=engines.comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _guard(self, step: int, bad: bool, metrics: dict) -> TrainingStopped | None:
        """Count steps whose loss or gradient norm is not finite, decided alike on every rank. Under
        ZeRO 1-3 DeepSpeed discards such a step (its gradient norm is not finite); a stage-0
        optimizer applies it, so there the weights are checked too. Returns the error that stops the
        run when there are too many in a row (raised once the step is logged)."""
        self.bad_steps_total += bad
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        metrics["guard/bad_steps"] = self.bad_steps_total
        if not bad:
            return None
        cause = f"loss {metrics['loss/train']:.4g}, gradient norm {metrics['grad_norm']:.4g}"
        if engines.zero_stage(self.policy) == 0:
            (broken,) = self._agree(not engines.local_weights_finite(self.policy))
            if broken:
                return TrainingStopped(
                    f"step {step}: {cause}, and the weights are no longer finite (a ZeRO stage 0 optimizer "
                    f"applies a non-finite update); LATEST still names {self.run_dir.latest_target()}"
                )
        log.warning(
            f"step {step} skipped: {cause} ({self.bad_in_a_row} in a row; the run stops at "
            f"guard.max_bad_steps={self.cfg.guard.max_bad_steps})"
        )
        if self.bad_in_a_row >= self.cfg.guard.max_bad_steps:
            return TrainingStopped(
                f"step {step}: {self.bad_in_a_row} steps in a row with a non-finite loss or gradient norm (last: "
                f"{cause}); the weights were not updated by them; LATEST still names {self.run_dir.latest_target()}"
            )
        return None

    def _line(self, step: int, examples: int, m: dict, split: str) -> str:
        keys = [f"loss/{split}", f"rewards_{split}/accuracies", f"rewards_{split}/margins"]
        keys += [f"logps_{split}/chosen", f"logps_{split}/chosen_shift_per_token"]
        keys += ["grad_norm", "lr"] if split == "train" else ["eval/checker_score"]
        parts = [f"{k} {m[k]:.4g}" for k in keys if k in m]
        return f"[{split}] step {step} examples {examples} | " + " | ".join(parts)

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self, step: int, examples: int, save: bool, final: bool = False) -> dict:
        self.policy.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for micro_batches, n_local in self.eval_batches:
            for micro in micro_batches:
                losses, stats = self.micro_batch(micro)
                self._accumulate(sums, losses, stats)
            count += n_local
        metrics = self._reduce(sums, count, "eval") if count else {}
        metrics["counters/examples"] = examples
        metrics.update(self.generation.evaluate(step, self.policy, self.reference))  # checker, samples
        displaced = self.displacement.check(metrics, "eval")
        self.sink.write({"step": step, **metrics})
        if self.rank == 0:
            log.info(self._line(step, examples, metrics, "eval"))
        if displaced and self._displaced(displaced, step, examples, metrics):
            return metrics  # saved already
        if save:
            self.save(step, examples, metrics, final=final)
        return metrics

    def _displaced(self, reason: str, step: int, examples: int, metrics: dict) -> bool:
        """guard.max_chosen_drop_per_token fired (guards.py): warn, or save and stop. Every rank gets
        here alike (the metrics it reads are reduced over all ranks). Returns whether it saved."""
        if self.cfg.guard.action == "warn":
            log.warning(f"guard: {reason} (step {step}; guard.action=stop would save and stop here)")
            return False
        log.warning(f"guard: stopping at step {step}: {reason}")
        self.sink.write({"step": step, "guard/stopped": reason})
        self.stop_reason = reason
        return self.save(step, examples, metrics)

    @property
    def eval_batches(self):
        if not hasattr(self, "_eval_batches"):
            self._eval_batches = self.eval_data.eval_batches(self.cfg.n_eval_examples)
        return self._eval_batches

    # ------------------------------------------------------------------ save

    def save(self, step: int, examples: int, metrics: dict, final: bool = False) -> bool:
        """step-{examples}/: policy.pt (streamed: rank 0 never holds the whole model), the DeepSpeed
        checkpoint, run_state.json, then COMPLETE; only then LATEST moves to it and old step dirs are
        rotated out. Every rank agrees on success. A failed save is logged and training goes on with
        the previous LATEST, until checkpoint.max_failed_saves fail in a row (or the final one fails)."""
        cfg = self.cfg
        target = self.run_dir.step(examples)
        if self.bad_in_a_row:  # decided alike on every rank (_guard)
            log.warning(f"not saving {target.name}: step {step} had a non-finite loss or gradient norm")
            return False
        try:
            error = None
            if self.rank == 0:
                try:
                    if target.exists() and target.resolve() != self.run_dir.latest_target():
                        shutil.rmtree(target)  # left over from a save that was cut short
                    target.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
            error = engines.broadcast_from_rank0(error)
            if error:
                raise engines.SaveError(f"{target}: {error}")
            engines.save_policy(self.policy, checkpoint.policy_file(target), examples, metrics)
            self.saves += 1
            _inject_fault(self.rank, self.saves)
            if cfg.checkpoint.save_optimizer:  # else weights only: policy.pt, nothing to resume from
                error = None
                try:
                    engines.save_engine(self.policy, target, {"step": step, "examples": examples})
                except Exception as e:  # noqa: BLE001 - agreed on below
                    error = f"rank {self.rank}: {type(e).__name__}: {e}"
                failed = engines.all_gather_objects(error)
                if any(failed):
                    raise engines.SaveError(
                        f"{checkpoint.ds_dir(target)}: " + "; ".join(f for f in failed if f)
                    )
            error = None
            if self.rank == 0:
                state = {
                    "step": step,
                    "examples": examples,
                    "world": self.world,
                    "config": to_dict(cfg),
                    "data": self.data_digest,
                }
                try:
                    checkpoint.mark_complete(target, state)
                    checkpoint.point_latest(self.run_dir.root, target)
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
            error = engines.broadcast_from_rank0(error)
            if error:
                raise engines.SaveError(f"{target}: {error}")
        except engines.SaveError as e:
            self.failed_saves += 1
            latest = self.run_dir.latest_target()
            log.error(
                f"save failed ({e}); LATEST still names {latest}; "
                f"{self.failed_saves} in a row of checkpoint.max_failed_saves={cfg.checkpoint.max_failed_saves}"
            )
            if self.rank == 0 and target.exists() and target.resolve() != latest:
                shutil.rmtree(target, ignore_errors=True)
            if final or self.failed_saves >= cfg.checkpoint.max_failed_saves:
                why = "the final save" if final else f"{self.failed_saves} saves in a row"
                raise TrainingStopped(f"{why} failed at step {step}: {e}; LATEST names {latest}") from None
            return False
        self.failed_saves = 0
        if self.rank == 0:
            gone = checkpoint.rotate(self.run_dir, cfg.checkpoint.keep_last)
            log.info(
                f"saved {target} (LATEST)" + (f"; removed {', '.join(p.name for p in gone)}" if gone else "")
            )
        return True


def _inject_fault(rank: int, save_index: int) -> None:
    """Tests only: DPO_DS_TEST_KILL_IN_SAVE=R:K SIGKILLs rank R in its K-th save, once policy.pt is
    written and before its DeepSpeed shards are: a checkpoint half on disk."""
    spec = os.environ.get("DPO_DS_TEST_KILL_IN_SAVE")
    if spec and spec == f"{rank}:{save_index}":
        os.kill(os.getpid(), signal.SIGKILL)
