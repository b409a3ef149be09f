"""Will it fit? The memory of a DPO run per rank, before launching it.

    dpo-ds plan --ds zero3 model.name_or_path=/models/Llama-3-8B \\
        max_length=2048 batch_size=64 --gpus 8 --gpu-mem 80

Takes train.py's config keys (--ds, --config, key=value) and the cluster (--gpus per node, --nodes,
--gpu-mem or --cpu-mem GiB); reads the model directory's config.json only (no weights: a 70B plans on a
laptop). Prints every term of dpo_ds/plan/estimate.py for one rank and for rank 0 while it saves, the total
against the budget, and when it does not fit the cheapest changes in the README's order (LoRA, ZeRO-3, a
precomputed reference, fused_linear, gradient checkpointing, a smaller token budget, sequence parallelism,
offload), each alone and then together until it fits, by the peak (the larger of the two totals, as the
verdict), leaving out a change that does not lower the peak of the ones above it; --write-ds PATH writes
the DeepSpeed JSON of the first set that fits. Under offload the GPU's terms leave out what the JSON (and
model.reference_offload) keep in CPU memory; the plan names it below the table. Estimates, not
measurements: bench/plan_check.py compares them with bench/memory.py. A Mixture-of-Experts model is counted
with its experts (plan/experts.py) and its plan says which of its figures rest on what.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

from dpo_ds.config import LAYOUTS, reference_mode
from dpo_ds.data.layout import attn_implementation
from dpo_ds.engine.ds_config import offloads_to_device, reference_zero_stage
from dpo_ds.plan.estimate import (
    CPU_RUNTIME_EXTRA_GIB,
    DTYPE_BYTES,
    GIB,
    LORA_WEIGHTS,
    PINNED_EXPERTS,
    ROUTER,
    SYNC_PEAK,
    Run,
    Shape,
    estimate,
    holds_engine,
    offloaded,
)


def _reference_adapter_rank(cfg, mode: str, notes: list) -> int:
    """TR-DPO under LoRA: the reference adapter's rank (engine.build.reference_adapter_rank) for the run's syncs,
    known from n_examples; a run bounded by n_epochs alone is planned at one sync, said in `notes`."""
    from dpo_ds.engine.build import reference_adapter_rank

    if mode != "adapters_off" or not cfg.model.reference_sync_steps:
        return 0
    if cfg.n_examples:
        return reference_adapter_rank(cfg, cfg.n_examples // cfg.batch_size)
    notes.append(
        "TR-DPO with LoRA: the reference adapter holds r for each sync of the run, which n_epochs alone does not "
        "tell the planner; planned at one sync (set n_examples to plan the run's own)"
    )
    return cfg.model.lora.r


def describe(
    cfg, ds: dict, ranks: int, on_cpu: bool, model_dir: Path, sequence_tokens: int | None = None, data=None,
    process_gib: float | None = None,
) -> Run:  # fmt: skip
    """The run a config and a DeepSpeed JSON make, in the formulas' terms. Sequences are planned at
    max_length (a bound) unless sequence_tokens says how long the data's longest ones are, or `data`
    (plan.data.DataTokens) what the layout's collator made of the data's own micro-batches."""
    from dpo_ds.training.objectives import build_objective

    objective = build_objective(cfg)
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    sp = cfg.parallel.sequence_parallel_size
    dp = max(ranks // sp, 1)
    pairs = micro_pairs(cfg, ranks)
    width = 2 if objective.pairs else 1
    length = min(sequence_tokens or cfg.max_length, cfg.max_length)
    # the layout says what a micro-batch of pairs takes in its rows (config.LAYOUTS: one owner)
    tokens = LAYOUTS.get(cfg.data.layout).plan_tokens(
        pairs, width, length, cfg.max_prompt_length, cfg.data.max_tokens_per_micro_batch
    )
    scored = tokens  # a bound: every token scored
    if data is not None and not cfg.data.max_tokens_per_micro_batch:
        tokens, scored = data.tokens, data.scored
    mode = reference_mode(cfg) if objective.needs_reference else "none"
    ref_stage = reference_zero_stage(stage, cfg.model.reference_zero_stage)
    attn = attn_implementation(cfg.data.layout, cfg.model.attn_implementation, on_cpu, sp) or "sdpa"
    reference = (f"reference {cfg.model.reference_dtype} ({mode})" if holds_engine(mode)
                 else f"reference {mode}")  # fmt: skip
    assumed = (
        f"policy {cfg.model.policy_dtype}, {reference}; attention {attn}; a micro-batch of {pairs} "
        f"{'pairs' if width == 2 else 'examples'} per data-parallel rank ({width * pairs} sequences of up to "
        f"{length} tokens, {cfg.data.layout} rows: {tokens} tokens{f', over {sp} ranks' if sp > 1 else ''})"
        + (f"; {data.describe()}" if data is not None else "")
    )
    notes = []
    adapter_rank = _reference_adapter_rank(cfg, mode, notes)
    per_step = dp * cfg.gradient_accumulation_steps
    if cfg.batch_size % per_step:
        notes.append(
            f"batch_size={cfg.batch_size} does not divide into {dp} data-parallel ranks x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: planned at {pairs} a micro-batch; "
            f"the launch refuses it (use a multiple of {per_step})"
        )
    if cfg.model.reference_offload and holds_engine(mode) and ref_stage != 3:
        notes.append(
            f"model.reference_offload=true needs a ZeRO-3 reference (this one is ZeRO-{ref_stage}): planned "
            "on the GPU; the launch refuses it (model.reference_zero_stage=3, or a ZeRO-3 --ds)"
        )
    return Run(
        shape=Shape.from_dir(model_dir),
        ranks=ranks,
        stage=stage,
        policy_bytes=DTYPE_BYTES[cfg.model.policy_dtype],
        reference_mode=mode,
        reference_bytes=DTYPE_BYTES[cfg.model.reference_dtype],
        reference_stage=ref_stage,
        # the reference engine's own JSON (engine/ds_config.py): offloaded by this key alone, never by the
        # policy JSON's offload_param
        reference_offload=cfg.model.reference_offload,
        reference_stage_pinned=cfg.model.reference_zero_stage is not None,
        reference_sync=bool(cfg.model.reference_sync_steps) and holds_engine(mode),
        reference_adapter_rank=adapter_rank,
        lora_r=cfg.model.lora.r,
        lora_targets=tuple(cfg.model.lora.target_modules),
        # fused expert parameters peft wraps by name (an optional key: configs without it name none)
        lora_parameters=tuple(getattr(cfg.model.lora, "target_parameters", None) or ()),
        adapter_bytes=DTYPE_BYTES["float32"] if cfg.model.lora.adapter_dtype == "float32" else 0,
        tokens_per_micro=tokens,
        scored_per_micro=scored,
        checkpointing=cfg.model.gradient_checkpointing,
        logprob_impl=cfg.model.logprob_impl,
        sequence_parallel=sp,
        zero=zero,
        on_cpu=on_cpu,
        attention=attn,
        block_tokens=data.longest if data is not None else length,
        process_gib=process_gib,
        assumed=assumed,
        notes=tuple(notes),
        micro_examples=pairs,
        accumulation=cfg.gradient_accumulation_steps,
        token_budget=cfg.data.max_tokens_per_micro_batch,
        max_length=cfg.max_length,
    )


def _zero3(run: Run) -> Run:
    """The policy under ZeRO-3; a reference engine follows it (engine.ds_config.reference_zero_stage)
    unless model.reference_zero_stage pins its stage."""
    ref_stage = run.reference_stage if run.reference_stage_pinned else 3
    return dataclasses.replace(run, stage=3, reference_stage=ref_stage, zero={**run.zero, "stage": 3})


def _offloaded(run: Run) -> Run:
    """ZeRO-3 with the optimizer state and the parameters offloaded to CPU (on the device, the gathered
    layers in flight and the activations) and a reference engine's parameters too: those only with
    model.reference_offload=true (the policy JSON's offload is not the reference's), on a ZeRO-3 reference."""
    zero = {**run.zero, "stage": 3}
    for key in ("offload_optimizer", "offload_param"):
        if not offloads_to_device(zero, key):
            zero[key] = {"device": "cpu"}
    out = _zero3(dataclasses.replace(run, zero=zero))
    if holds_engine(run.reference_mode):
        out = dataclasses.replace(out, reference_offload=True, reference_stage=3)
    return out


def _offload_keys(run: Run) -> list[str]:
    """What a user writes for _offloaded: the JSON (--ds zero3_offload) unless it offloads already, and for a
    reference engine model.reference_offload=true (with model.reference_zero_stage=3 where that key pins the
    reference elsewhere): the reference's JSON takes no offload from the policy's."""
    zero = run.zero
    offloads = all(offloads_to_device(zero, key) for key in ("offload_param", "offload_optimizer"))
    keys = [] if run.stage == 3 and offloads else ["--ds"]
    if holds_engine(run.reference_mode) and not run.reference_offload:
        keys.append("model.reference_offload=true")
    if holds_engine(run.reference_mode) and run.reference_stage_pinned and run.reference_stage != 3:
        keys.append("model.reference_zero_stage=3")
    return keys


def _halved(run: Run) -> Run:
    """Half the tokens of a micro-batch, where the config can make it: a token budget halved (while it still
    holds one pair, 2 x max_length, as the config requires), else half the examples a micro-batch (twice the
    gradient_accumulation_steps: an even number of them). A micro-batch of one example cannot be halved:
    the run as it is."""
    half = dataclasses.replace(run, tokens_per_micro=run.tokens_per_micro // 2,
                               scored_per_micro=run.scored_per_micro // 2)  # fmt: skip
    if run.token_budget:
        if run.token_budget // 2 < 2 * run.max_length:
            return run
        return dataclasses.replace(half, token_budget=run.token_budget // 2)
    if run.micro_examples < 2 or run.micro_examples % 2:
        return run
    return dataclasses.replace(
        half, micro_examples=run.micro_examples // 2, accumulation=2 * run.accumulation
    )


def _halved_keys(run: Run) -> list[str]:
    if run.token_budget:
        return [f"data.max_tokens_per_micro_batch={run.token_budget // 2}"]
    return [f"gradient_accumulation_steps={2 * run.accumulation}"]


# the README's order (Fitting a large model, Long sequences): each a change to a Run, and what a user writes
# for it (config keys; "--ds" for a change of the DeepSpeed JSON, which --write-ds writes); a change that
# does not apply to a run returns it as it is
FIXES = [
    ("LoRA r=16 on every linear layer (model.lora.r=16)", lambda r: dataclasses.replace(
        r, lora_r=16, lora_targets=("all-linear",), reference_mode="adapters_off" if holds_engine(r.reference_mode) else r.reference_mode),
     lambda r: ["model.lora.r=16"]),
    ("ZeRO-3 (--ds zero3)", _zero3, lambda r: [] if r.stage == 3 else ["--ds"]),
    ("a precomputed reference (model.reference_mode=precomputed)", lambda r: dataclasses.replace(
        r, reference_mode="precomputed") if holds_engine(r.reference_mode) else r,
     lambda r: ["model.reference_mode=precomputed"]),
    ("fused_linear log-probs (model.logprob_impl=fused_linear)", lambda r: dataclasses.replace(r, logprob_impl="fused_linear"),
     lambda r: ["model.logprob_impl=fused_linear"]),
    ("gradient checkpointing (model.gradient_checkpointing=true)", lambda r: dataclasses.replace(r, checkpointing=True),
     lambda r: ["model.gradient_checkpointing=true"]),
    ("half the tokens per micro-batch (gradient_accumulation_steps x2 or a smaller data.max_tokens_per_micro_batch)",
     _halved, _halved_keys),
    ("sequence parallelism over 2x the ranks a row (parallel.sequence_parallel_size)", lambda r: dataclasses.replace(
        r, sequence_parallel=min(r.sequence_parallel * 2, r.ranks)),
     lambda r: [f"parallel.sequence_parallel_size={min(r.sequence_parallel * 2, r.ranks)}"]),
    ("ZeRO-3 with CPU offload (--ds zero3_offload; a reference engine: model.reference_offload=true)", _offloaded,
     _offload_keys),
]  # fmt: skip


SAVE = "save peak (rank 0)"  # estimate's term for what rank 0 adds while it writes a checkpoint
# a step's, freed before the save
NOT_WHILE_SAVING = ("activations", ROUTER, LORA_WEIGHTS, PINNED_EXPERTS, "logits")


def device_total(run: Run) -> float:
    """What a rank holds during a training step on its device (a GPU's: less what offload keeps in CPU
    memory; on CPU its resident set), bytes."""
    return estimate(run)["total"]


def params_text(n: int) -> str:
    """8.03B, 135M, 0.55M: the unit that keeps the figure readable."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e8 else f"{n / 1e6:.2f}M"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def running_terms(t: dict) -> dict:
    """The terms of estimate(run) that every rank holds during a training step."""
    return {k: v for k, v in t.items() if k not in ("total", SAVE, SYNC_PEAK)}


def worst_total(run: Run) -> float:
    """The larger of a training step's total and rank 0's while it saves: the peak a rank reaches, bytes.
    The verdict, the change table and the launch's planned peak all compare this one."""
    return _peak(estimate(run))


def _peak(t: dict) -> float:
    """worst_total of an estimate already made."""
    return max(t["total"], sum(_saving(t).values()), sum(_saving(t, SYNC_PEAK).values()))


def _saving(t: dict, moment: str = SAVE) -> dict:
    """The terms rank 0 holds while it saves (or every rank while TR-DPO moves the reference, moment=SYNC_PEAK):
    no step's activations, that moment's own peak instead (what offload keeps in CPU memory is not on the
    device then either: estimate counts it nothing there)."""
    return {**{k: v for k, v in running_terms(t).items() if k not in NOT_WHILE_SAVING}, moment: t[moment]}


def _header(run: Run) -> str:
    moved = offloaded(run)
    policy = [w for k, w in (("weights", "parameters"), ("optimizer", "optimizer state")) if k in moved]
    zero = f"ZeRO-{run.stage}" + (f" (offload: {', '.join(policy)})" if policy else "")
    reference = f"reference {run.reference_mode}" + (" (offloaded)" if "reference" in moved else "")
    where = "CPU (resident set per rank)" if run.on_cpu else "GPU (device memory per rank)"
    ex = run.shape.experts
    moe = (f", {params_text(run.shape.active_params)} active a token: {ex.count} experts, top-{ex.top_k}, in "
           f"{ex.layers} of the layers" if ex else "")  # fmt: skip
    return (
        f"dpo_ds plan: {params_text(run.shape.params)} parameters{moe} ({run.shape.layers} layers, hidden {run.shape.hidden}, "
        f"vocab {run.shape.vocab}), {plural(run.ranks, 'rank')}, {zero}, {reference}, "
        f"{run.tokens_per_micro} tokens a micro-batch{f' over {run.sequence_parallel} ranks' if run.sequence_parallel > 1 else ''}, "
        f"{run.logprob_impl}{', checkpointing' if run.checkpointing else ''}{f', LoRA r={run.lora_r}' if run.lora_r else ''}; {where}"
    )  # fmt: skip


def _table(run: Run, t: dict) -> list[str]:
    """The terms, every rank's and rank 0's while saving, their totals, and what offload moved off the GPU."""
    lines = ["| term | every rank GiB | rank 0 while saving GiB |", "|---|---:|---:|"]
    running, saving = running_terms(t), _saving(t)
    for k in [*running, SAVE]:
        if not running.get(k) and not saving.get(k):
            continue  # a term this run does not have (scores of a fused attention, SP's exchange without SP)
        lines.append(f"| {k} | {running.get(k, 0) / GIB:.2f} | {saving.get(k, 0) / GIB:.2f} |")
    lines.append(f"| **total** | **{t['total'] / GIB:.2f}** | **{sum(saving.values()) / GIB:.2f}** |")
    if t[SYNC_PEAK]:
        syncing = sum(_saving(t, SYNC_PEAK).values())
        lines.append(
            f"(TR-DPO: while the reference moves, between steps, a rank holds {syncing / GIB:.2f} GiB: the saving "
            f"column's terms with the sync's {t[SYNC_PEAK] / GIB:.2f} GiB instead of the save's; in the peak)"
        )
    moved = offloaded(run)
    if moved:
        each = ", ".join(f"{k} {v / GIB:.2f}" for k, v in moved.items())
        lines.append(f"(offloaded to CPU memory, in neither column: {each} GiB a rank)")
    if run.on_cpu:
        lines.append(
            "(on CPU the libraries line is a measured constant per process: torch, DeepSpeed, transformers)"
        )
    return lines


def _changes(run: Run, budget_gib: float) -> tuple[list[str], list[tuple[str, float]], Run | None]:
    """The change table: each change alone and together with the ones above, by the peak (worst_total),
    until the set fits; a change that does not lower the peak of the set so far is left out (it would
    only add keys). (its lines, [(fix, peak GiB alone)], the first set that fits or None)."""
    lines = ["", "| change (alone) | new peak GiB | together with the ones above GiB |", "|---|---:|---:|"]
    fixes, together, peak, paste, fitting = [], run, worst_total(run), [], None
    for name, change, keys in FIXES:
        after = change(together)
        after_peak = worst_total(after)
        if not after_peak < peak:
            continue  # already so, not applicable (one example a micro-batch), or no lower here
        alone = worst_total(change(run)) / GIB
        paste += [k for k in keys(together) if k not in paste]
        together, peak = after, after_peak
        cumulative = peak / GIB
        fixes.append((name, alone))
        lines.append(
            f"| {name} | {alone:.2f} | {cumulative:.2f}{' (fits)' if cumulative <= budget_gib else ''} |"
        )
        if cumulative <= budget_gib:
            fitting = together
            break
    if not fixes:
        lines = ["", "no change the planner knows lowers this run's peak"]
    if fitting is not None:
        keys = " ".join(k for k in paste if k != "--ds")
        ds_note = " and the DeepSpeed JSON's ZeRO settings (--write-ds PATH writes them; then --ds PATH)"
        lines += ["", f"to fit, add: {keys or '(no config key)'}{ds_note if '--ds' in paste else ''}"]
    return lines, fixes, fitting


def plan(run: Run, budget_gib: float) -> tuple[str, list[tuple[str, float]], Run | None]:
    """(the report, [(fix, new peak GiB alone)], the first cumulative Run that fits or None)."""
    t = estimate(run)
    lines = [
        _header(run),
        *([f"assumed: {run.assumed}"] if run.assumed else []),
        *moe_notes(run),
        *(f"warning: {note}" for note in run.notes),
        "",
        *_table(run, t),
    ]
    saving = _saving(t)
    worst = _peak(t) / GIB
    terms = running_terms(t) if t["total"] >= sum(saving.values()) else saving
    verdict = (f"fits in {budget_gib:.1f} GiB with {budget_gib - worst:.2f} GiB to spare" if worst <= budget_gib
               else f"over {budget_gib:.1f} GiB by {worst - budget_gib:.2f} GiB (largest: {max(terms, key=terms.get)})")  # fmt: skip
    lines += ["", f"estimate: {verdict}"]
    fixes, fitting = [], None
    if worst > budget_gib:
        more, fixes, fitting = _changes(run, budget_gib)
        lines += more
    return "\n".join(lines), fixes, fitting


def moe_notes(run: Run) -> list[str]:
    """What an MoE plan rests on (plan/estimate.py's docstring, Mixture-of-Experts); [] for a dense model."""
    ex = run.shape.experts
    if ex is None:
        return []
    return [
        f"MoE ({ex.model_type}): these figures are estimates: model states count all {ex.count} experts, the "
        f"activations the top-{ex.top_k} a token takes, the router's fp32 probabilities and, under ZeRO-3, one "
        f"layer's experts gathered whole ({params_text(run.shape.gathered)} values); checked against the tensors "
        "autograd saves on tiny models, not measured on a GPU",
        f"MoE: dpo_ds has no expert parallelism: every rank holds all {ex.count} experts of a layer it computes "
        "while they are gathered (ZeRO shards them at rest, never by expert)",
    ] + (
        [f"MoE: LoRA adapters reach the fused experts; peft makes W + BA of each wrapped parameter, its full size, "
         f"on every forward and autograd keeps it for the backward (the '{LORA_WEIGHTS}' term)"]
        if estimate(run)[LORA_WEIGHTS] else []
    ) + (
        [f"MoE: under ZeRO-3 autograd keeps views of each sparse layer's gathered expert weights until that "
         f"layer's backward, every layer's at once as the backward begins (the '{PINNED_EXPERTS}' term; gradient "
         "checkpointing keeps one layer's)"]
        if estimate(run)[PINNED_EXPERTS] else []
    )  # fmt: skip


def one_line(run: Run, budget_gib: float | None) -> str:
    """The launch log's line: the total and its three largest terms."""
    t = estimate(run)
    total = device_total(run) / GIB
    top = sorted(running_terms(t).items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in top)
    against = f" of {budget_gib:.1f} GiB" if budget_gib else ""
    return f"memory estimate per rank (dpo_ds.plan): {total:.2f} GiB{against} ({parts})"


def first_fix(run: Run, budget_gib: float) -> str:
    """The first change whose peak alone fits (as the plan's table counts it)."""
    for name, change, _ in FIXES:
        if change(run) != run and worst_total(change(run)) / GIB <= budget_gib:
            return name
    return FIXES[0][0]


def ds_json_for(ds: dict, fitting: Run) -> dict:
    out = copy.deepcopy(ds)
    out["zero_optimization"] = {**out.get("zero_optimization", {}), **fitting.zero, "stage": fitting.stage}
    return out


def main(argv=None, prog: str = "dpo-ds plan") -> int:
    from dpo_ds.config import ConfigError, load_config
    from dpo_ds.config.keys import add_help_keys
    from dpo_ds.config.shipped import DEFAULT_DS, ds_config_path, recipe_path
    from dpo_ds.data.sources import DataError
    from dpo_ds.model.files import ModelError

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_help_keys(ap)
    ap.add_argument("--ds", default=DEFAULT_DS, help="DeepSpeed JSON: a shipped one by name or a file")
    ap.add_argument("--config", default=None, help="YAML of config keys: a file or a shipped recipe's name")
    ap.add_argument(
        "--gpus", type=int, default=None, help="ranks per node (default: this machine's GPUs, or 1)"
    )
    ap.add_argument("--nodes", type=int, default=1, help="nodes, of --gpus ranks each")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: this machine's)")
    ap.add_argument(
        "--cpu-mem", type=float, default=None, help="GiB per node, CPU runs (default: this machine's)"
    )
    ap.add_argument(
        "--write-ds", default=None, help="write the DeepSpeed JSON of the first set of changes that fits"
    )
    ap.add_argument(
        "--sequence-tokens",
        type=int,
        default=None,
        help="the data's longest sequence (prompt + response) if shorter than max_length",
    )
    ap.add_argument("--data-sample", type=int, default=0, metavar="N",
                    help="read and tokenize N train examples of the config's data and plan the micro-batches the "
                         "layout makes of them (default: every sequence at max_length, a bound)")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="config keys as key=value, as `dpo-ds train` takes them")
    args = ap.parse_intermixed_args(argv)
    try:
        ds_path = ds_config_path(args.ds)
        cfg = load_config(recipe_path(args.config) if args.config else None, args.overrides)
        ds = json.loads(ds_path.read_text())
        model_dir = plan_model_dir(cfg.model.name_or_path)
        gpus, gpu_mem, on_cpu = _machine(args)
        if on_cpu and args.gpus and args.cpu_mem is None:
            print(f"dpo_ds plan: no GPU here and no --gpu-mem: planning CPU memory ({plural(gpus, 'rank')} a node "
                  "as CPU processes); give --gpu-mem GiB to plan GPUs")  # fmt: skip
        data = (
            sampled_data(cfg, model_dir, gpus * args.nodes, on_cpu, args.data_sample)
            if args.data_sample
            else None
        )
        run = describe(cfg, ds, gpus * args.nodes, on_cpu, model_dir, args.sequence_tokens, data,
                       measured_process_gib() if on_cpu else None)  # fmt: skip
        budget = (args.cpu_mem or _mem_total_gib()) / gpus if on_cpu else gpu_mem
    except (ConfigError, ModelError, DataError, OSError, KeyError, ValueError) as e:
        print(f"dpo_ds.plan: error: {e}", file=sys.stderr)
        return 2
    report, _, fitting = plan(run, budget)
    print(report)
    if args.write_ds:
        write_ds(args.write_ds, ds, fitting)
    return 0


def measured_process_gib() -> float:
    """On CPU, what a rank holds besides the run, measured on this platform: this process's resident set once
    it has imported what every rank imports (torch, DeepSpeed, transformers, datasets), plus the run-time
    extras (process_now_gib)."""
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    return process_now_gib()


def process_now_gib() -> float:
    """This process's resident set now plus what a rank adds besides the modelled terms while it trains
    (estimate.CPU_RUNTIME_EXTRA_GIB): a CPU rank's process term, planned from a measurement."""
    from dpo_ds.dist.memory import proc_status

    return proc_status("VmRSS").get("VmRSS", 0) / GIB + CPU_RUNTIME_EXTRA_GIB


def micro_pairs(cfg, ranks: int) -> int:
    """Examples a micro-batch holds on one data-parallel rank (at least one)."""
    dp = max(ranks // cfg.parallel.sequence_parallel_size, 1)
    return max(cfg.batch_size // (dp * cfg.gradient_accumulation_steps), 1)


def sampled_data(cfg, model_dir: Path, ranks: int, on_cpu: bool, n: int):
    """--data-sample N: the config's first N train examples, tokenized and collated (plan.data)."""
    from dpo_ds.data.layout import for_config as layout_for
    from dpo_ds.model.files import load_tokenizer
    from dpo_ds.plan.data import micro_batch_tokens, sample_examples
    from dpo_ds.training.objectives import build_objective

    examples = sample_examples(cfg, model_dir, not build_objective(cfg).pairs, n)
    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # the run's layout, whole rows before any sequence sharding
    return micro_batch_tokens(examples, layout_for(cfg, on_cpu), micro_pairs(cfg, ranks), pad)


def write_ds(path: str, ds: dict, fitting: Run | None) -> None:
    """--write-ds: the DeepSpeed JSON of the first set of changes that fits, only when it differs from the
    one given (else the changes are config keys alone, printed above)."""
    if fitting is None:
        print(f"--write-ds: nothing written to {path}: no change is needed, or none of them fits")
        return
    changed = ds_json_for(ds, fitting)
    if changed == ds:
        print(
            f"--write-ds: nothing written to {path}: the changes that fit are config keys; the JSON stays as it is"
        )
        return
    Path(path).write_text(json.dumps(changed, indent=2) + "\n")
    print(
        f"wrote {path}: the ZeRO settings of the first set that fits; train with --ds {path} and the keys above"
    )


# config.json files of the models the recipes name (architecture only, no weights), so a recipe plans
# before its model is downloaded
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "models"


def plan_model_dir(name_or_path: str) -> Path:
    """The directory whose config.json the plan reads: a local model directory, a shipped demo model or a
    hub id's snapshot in the hub cache (as training finds them); else the config dpo_ds ships for that id."""
    from dpo_ds.model.files import ModelError, hub_id, resolve_model_dir

    try:
        return resolve_model_dir(name_or_path)
    except ModelError:
        if not hub_id(name_or_path):
            raise
    shipped = SHIPPED_CONFIGS / name_or_path / "config.json"
    if shipped.is_file():
        print(
            f"dpo_ds plan: {name_or_path} is not downloaded; planning from the config.json dpo_ds ships for it"
        )
        return shipped.parent
    known = sorted(f"{p.parent.name}/{p.name}" for p in SHIPPED_CONFIGS.glob("*/*") if p.is_dir())
    raise ModelError(
        f"model.name_or_path={name_or_path!r}: not a local model directory, not in the hub cache, and not one of "
        f"the models whose config.json dpo_ds ships ({', '.join(known)}); `hf download {name_or_path} config.json` "
        "gets the one file the plan reads"
    )


def _machine(args) -> tuple[int, float | None, bool]:
    """(ranks per node, GiB per GPU, whether the ranks are CPU processes)."""
    import torch

    if args.gpu_mem is not None:
        return args.gpus or 1, args.gpu_mem, False
    if torch.cuda.is_available() and args.cpu_mem is None:
        return (
            args.gpus or torch.cuda.device_count(),
            torch.cuda.get_device_properties(0).total_memory / GIB,
            False,
        )
    return args.gpus or 1, None, True


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 2**20


if __name__ == "__main__":
    sys.exit(main())
