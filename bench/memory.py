"""Peak memory per rank of DPO training under the memory knobs, and of saving policy.pt.

    python bench/memory.py            # CPU, 2 ranks, ~58M Llama: about 10 min on 2 cores
    python bench/memory.py --quick    # ~20M Llama, shorter sequences, 2 steps: a smoke run (~4 min)
    python bench/memory.py --smoke    # CPU, 2 ranks, the 8.6M smoke model, the rows SMOKE_ROWS + module + save
                                      # tables at the smallest sizes: every code path, figures of no meaning (~2 min)
    python bench/memory.py --moe      # CPU, 2 ranks, a 91.5M Qwen3-MoE: full DPO and LoRA on the experts, the
                                      # planner beside each (bench/_memory_moe.py; --moe --smoke: its plumbing)
    python bench/memory.py --gpu-short --out R/d_memory.json   # bench/gpu_check.sh's step: 1 rank, CUDA, ~1B
    python bench/memory.py --gpu-short --cpu-smoke             # the same plumbing on CPU, tiny

Training table. Every row is a real `dpo_ds/train.py` run through the deepspeed launcher (2 ranks unless
said, 1 torch thread per rank, its own --master_port) of a few DPO steps of a seeded random Llama with a
32000-row vocabulary and untied embeddings: the shipped char tokenizer uses ~100 of the ids, the other
rows are never produced, but the lm_head and the logits are full width, as a real 32k model's are. The
numbers are rank 0's, read from its metrics.jsonl:
  peak          memory/peak_gib, the largest over the steps: the resident-set high-water mark (VmHWM) since
                the training loop started (it is reset there, so building the models and the precomputed
                reference pre-pass are not in it); torch.cuda.max_memory_allocated on a GPU
  models+opt    memory/now_gib after the first step minus memory/before_models_gib (before any model was
                built): parameters, ZeRO partitions, fp32 master weights, gradient buffers, Adam states and
                DeepSpeed's buckets, plus the reference engine where one exists (activations are freed by
                then). "B/param" divides it by the parameters this rank owns (N / ranks, ZeRO-3).
  step s        median seconds of the steps after the first (2 shared cores: a noisy figure)
A run is stopped once its steps are in metrics.jsonl (the final eval and save are no part of this). Every
run has n_eval_examples=2, never 0: the precomputed pre-pass fails on an empty eval split (IndexError in
reference.compute_tables); eval_every keeps the eval itself out of the measured steps.
Every run has MALLOC_MMAP_THRESHOLD_=1048576 in its environment: otherwise glibc keeps freed large blocks
resident, and RSS would measure malloc's caching instead of what the code holds.

Targets, printed as PASS/MISS with the numbers:
  precomputed   the precomputed-reference peak <= the fp32 reference engine's peak minus the reference's
                own weights per rank (fp32 bytes of its N parameters / ranks: ZeRO-3 partitions them)
  fused_linear  fused_linear adds <= 1/8 of the logits' size on top of the activations. The logits' size is
                (scored tokens of one rank's micro-batch) x 32000 x 4 bytes. Training rows cannot show "the
                activations without any logits", so this is measured at module level, each variant in its
                own process on the same model and the same micro-batch as one rank of the long rows, every
                parameter's .grad allocated beforehand; the step runs twice and the second is measured
                (VmHWM reset right before it; CUDA: max allocated), so code pages, library workspaces and
                malloc's small-block arenas that the first step brings in are in neither variant:
                  none          decoder forward+backward with a dummy loss: (h @ u).sum() over the scored
                                hidden states h, + dot(W_head, U), which gives the lm_head a full (V, H)
                                weight gradient as every real path has, and no logits at all
                  fused_linear  the same decoder + LogprobLM's fused lm_head log-probs (dpo_ds/model/lm.py)
                  chunked/naive the same with materialised logits, for scale
                fused_linear's excess = its peak growth - none's; naive's and chunked's excess show what
                materialised logits cost on the same scale (the training rows show it under DeepSpeed).
                none and fused_linear are also measured at twice the tokens: the excess is mostly fixed
                (one fp32 (chunk, V) buffer), so its fraction of the logits falls as micro-batches grow.
  ZeRO-3        2 ranks hold <= 0.6x the models+opt memory per rank of 1 rank (reference-free, same data)

Save table: rank 0's peak RSS growth (VmHWM after a reset minus RSS right before) while a ~100M-parameter
ZeRO-3 policy on 2 ranks is written as policy.pt, by the old method (every parameter gathered into a full
state dict on rank 0, then torch.save) and by run_save.save_policy (streamed while gathering); both files
are then loaded and compared tensor by tensor. See bench/_save_memory_driver.py.

--gpu-short (bench/gpu_check.sh): 1 rank (one GPU), ~1B Llama in bf16 with weights written once on the
device; the module-level variants first (one process: the allocator's max is exact and reset between
them), then training rows in priority order while a time budget lasts; peak = max allocated. The ZeRO-3
rank target and the save table need 2 ranks and are left out there. Without deepspeed (or datasets) the
training rows are skipped with a line saying why; the module level needs only torch + transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dpo_ds.demo.make_assets import char_model_dir  # noqa: E402
from dpo_ds.dist.launcher import (  # noqa: E402
    TRAIN_PY,
    deepspeed_cmd,
    env,
    free_port,
    launcher,
    missing_modules,
    wait_for_train_steps,
)
from dpo_ds.model.files import has_weights  # noqa: E402

GIB = 2**30
MIB = 2**20
VOCAB = 32000
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1048576"}  # freed blocks >= 1 MiB go back to the OS at once
TOKENIZER_DIR = ROOT / "dpo_ds" / "demo" / "model"
LETTERS = "abcdefghijklmnopqrstuvwxyz     "

# model shapes: hidden, layers, heads, intermediate (vocab 32000, untied)
SHAPES = {
    "full": (512, 8, 8, 1376),  # ~58M
    "full_save": (768, 8, 12, 2048),  # ~106M
    "quick": (256, 4, 4, 688),  # ~20M
    "gpu": (2048, 16, 32, 5632),  # ~1.1B, gpu_check's (c) shape
    "smoke": (128, 2, 2, 344),  # CPU smoke of --gpu-short
}


# shape, short rows (batch pairs, max_length, steps), long rows (batch pairs, max_length, steps)
SIZES = {
    "full": ("full", 4, 256, 3, 2, 1024, 2),
    "quick": ("quick", 4, 128, 2, 2, 512, 2),
    "gpu": ("gpu", 8, 512, 2, 4, 1024, 2),
    "smoke": ("smoke", 2, 64, 2, 1, 128, 2),
    "cpu_smoke": ("smoke", 2, 64, 2, 2, 128, 2),  # --smoke: 2 ranks, so 2 long pairs (one a rank)
}


# --smoke: the rows the targets read (1/3 precomputed, 4/10 ZeRO-3, 8 fused_linear, 13 LoRA), ZeRO-2 (5) and
# sequence parallelism (14); each 2-rank row costs ~15 s of launch on 2 cores whatever its size
SMOKE_ROWS = ("1", "3", "4", "5", "8", "10", "13", "14")


def set_sizes(args, name: str) -> None:
    (
        args.shape,
        args.batch,
        args.max_length,
        args.steps,
        args.long_batch,
        args.long_length,
        args.long_steps,
    ) = SIZES[name]


def say(msg: str) -> None:
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model and data


def make_model(out: Path, shape: tuple[int, int, int, int], weights_on: str | None = None) -> int:
    """A Llama directory: config.json (vocab 32000) + the shipped char tokenizer; returns N parameters.
    Without weights dpo_ds initialises it from the seed; weights_on='cuda' writes bf16 safetensors
    initialised on the device (a ~1B model initialised on CPU takes most of a minute per run)."""
    hidden, layers, heads, inter = shape
    cfg = char_model_dir(
        out, vocab=VOCAB, hidden=hidden, layers=layers, heads=heads, intermediate=inter, max_positions=4096
    )
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden  # attention, MLP, two norms
    n = layers * per_layer + 2 * VOCAB * hidden + hidden  # + embeddings, lm_head, final norm
    if weights_on:
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(weights_on):
            model = LlamaForCausalLM(cfg)
        model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
        del model
        torch.cuda.empty_cache()  # the runs are other processes: leave them the device memory
    return n


def make_data(out: Path, n_train: int, max_length: int, fill: bool, seed: int = 0) -> None:
    """Flat preference rows, unique prompts (dpo_ds groups rows that share one). fill=False: prompts of
    16-48 and responses of 60-200 characters (= tokens); fill=True: 16-character prompts and responses
    longer than max_length, so truncation cuts every response to fill max_length exactly."""
    import random

    rng = random.Random(seed)
    out.mkdir(parents=True)

    def text(k: int) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(k))

    for split, n in (("train", n_train), ("test", 8)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                tag = f"q{i:04d} "
                if fill:
                    row = {"prompt": tag + text(10), "chosen": text(max_length), "rejected": text(max_length)}
                else:
                    row = {
                        "prompt": tag + text(rng.randint(10, 42)),
                        "chosen": text(rng.randint(60, 200)),
                        "rejected": text(rng.randint(60, 200)),
                    }
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- training runs


def run_env(cuda: bool) -> dict:
    e = env(threads=1, **MALLOC)
    # keep what the caller had on the path (gpu_check.sh puts the carried deepspeed wheel there)
    e["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    if cuda:
        e.update(DS_ACCELERATOR="cuda", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        e.pop("TRITON_INTERPRET", None)  # the compiled kernels, not the interpreter
    return e


def train_cmd(overrides: list[str], ranks: int, args) -> tuple[list[str], dict]:
    """The deepspeed launcher; with --gpu-short (or no launcher installed) a bare `python train.py`, a
    world of one: gpu_check installs deepspeed's wheel into a --target dir, without its scripts."""
    e = run_env(args.cuda)
    if ranks == 1 and (args.gpu_short or not Path(launcher()).exists()):
        e.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        return [sys.executable, str(TRAIN_PY), *overrides], e
    return deepspeed_cmd(*overrides, ranks=ranks), e


RUNNING: list[subprocess.Popen] = []  # training runs in flight (own sessions): stopped on SIGTERM too


def stop(proc: subprocess.Popen) -> None:
    """End the run's process group (launcher and ranks) once its steps are in. SIGKILL: dpo_ds takes
    SIGTERM as a preemption and saves a checkpoint first, and the final save is no part of this bench."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def row_overrides(spec: dict, args, work: Path) -> list[str]:
    """A row's train.py arguments (bench/plan_check.py plans the same ones)."""
    steps = spec["steps"]
    run_dir = work / "runs" / spec["key"]
    data = work / ("data_long" if spec["long"] else "data_short")
    batch, max_length = (args.long_batch, args.long_length) if spec["long"] else (args.batch, args.max_length)
    return [
        "--ds",
        str(ROOT / "ds_configs" / f"{spec['ds']}.json") if not args.gpu_short else str(work / "zero3.json"),
        "loss=dpo",
        "loss.beta=0.1",
        f"model.name_or_path={spec.get('model') or work / 'model'}",
        *([] if has_weights(Path(spec.get("model") or work / "model")) else ["model.init=random"]),
        f"datasets=[{data}]",
        f"run_dir={run_dir}",
        f"data.cache_dir={work / 'hf_cache'}",
        f"batch_size={batch}",
        "eval_batch_size=2",
        "n_epochs=null",
        f"n_examples={batch * steps}",
        "do_first_eval=false",
        # not 0: the precomputed pre-pass fails on an empty eval split (IndexError in
        # reference.compute_tables); eval_every keeps the eval out of the measured steps
        "n_eval_examples=2",
        "eval_every=1000000000",
        f"max_length={max_length}",
        f"max_prompt_length={max_length // 4}",
        "lr=1e-5",
        "warmup_steps=0",
        "log_every=1",
        "checkpoint.save_optimizer=false",
        *(["model.policy_dtype=bfloat16"] if args.gpu_short else []),
        *spec["overrides"],
    ]


def planned_row(overrides: list[str], ranks: int, args, data_sample: int = 0) -> dict:
    """dpo_ds.plan's estimate of a row's run, to stand beside its measured peak (bench/_plan_estimate.py, tabled by
    bench/plan_check.py; gpu_check's (d) on a GPU): planned_gib and its terms, or why there is none."""
    try:
        from bench._plan_estimate import planned

        total, terms = planned(overrides, ranks, on_cpu=not args.cuda, data_sample=data_sample)
        return {"planned_gib": total, "planned_terms": terms}
    except Exception as e:  # noqa: BLE001 - the measurement stands without it
        return {"planned_error": f"{type(e).__name__}: {e}"}


def train_row(spec: dict, args, work: Path) -> dict:
    """One training run; returns rank 0's memory figures (or 'error')."""
    name, ranks, steps = spec["name"], spec["ranks"], spec["steps"]
    run_dir = work / "runs" / spec["key"]
    batch, max_length = (args.long_batch, args.long_length) if spec["long"] else (args.batch, args.max_length)
    overrides = row_overrides(spec, args, work)
    plan = planned_row(overrides, ranks, args, spec.get("data_sample", 0))
    cmd, e = train_cmd(overrides, ranks, args)
    log_path = work / f"{spec['key']}.log"
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    say(f"run {spec['key']}: {name}, {ranks} rank(s), {steps} steps")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    RUNNING.append(proc)
    try:
        # --gpu-short: a run still going 15 s after the budget is stopped and reported as timed out
        limit = min(args.run_timeout, args.deadline + 15 - t0) if args.gpu_short else args.run_timeout
        rows, status = wait_for_train_steps(proc, metrics, steps, t0 + limit)
    finally:
        stop(proc)
        RUNNING.remove(proc)
    out = {**spec, "wall_s": time.time() - t0, "batch": batch, "max_length": max_length, **plan}
    if status != "ok":
        tail = log_path.read_text()[-2500:] if log_path.exists() else ""
        say(f"run {spec['key']} FAILED ({status}); log tail:\n{tail}")
        return {**out, "error": status}
    first = rows[0]
    timed = rows[1:] or rows
    out.update(
        peak_gib=max(r["memory/peak_gib"] for r in rows),
        model_opt_gib=first["memory/now_gib"] - first["memory/before_models_gib"],
        built_gib=first["memory/models_built_gib"] - first["memory/before_models_gib"],
        step_s=statistics.median(r["throughput/step_seconds"] for r in timed),
        losses=[round(r["loss/train"], 4) for r in rows],
    )
    plan = f", planned {out['planned_gib']:.3f} GiB" if "planned_gib" in out else ""
    say(
        f"  {spec['key']}: peak {out['peak_gib']:.3f} GiB{plan}, models+opt {out['model_opt_gib']:.3f} GiB, "
        f"{out['step_s']:.1f} s/step, {out['wall_s']:.0f} s"
    )
    return out


def training_specs(args) -> list[dict]:
    short = dict(long=False, steps=args.steps, ranks=2, ds="zero3")
    long_ = dict(long=True, steps=args.long_steps, ranks=2, ds="zero3")
    free = ["loss.reference_free=true"]
    return [
        dict(short, key="1", name="ZeRO-3, reference engine fp32", overrides=[]),
        dict(
            short, key="2", name="ZeRO-3, reference engine bf16", overrides=["model.reference_dtype=bfloat16"]
        ),
        dict(
            short,
            key="3",
            name="ZeRO-3, precomputed reference",
            overrides=["model.reference_mode=precomputed"],
        ),
        dict(short, key="4", name="ZeRO-3, reference-free", overrides=free),
        dict(short, key="5", name="ZeRO-2, reference engine fp32", ds="zero2", overrides=[]),
        dict(
            long_,
            key="6",
            name="ZeRO-3, ref-free, long, naive",
            overrides=[*free, "model.logprob_impl=naive"],
        ),
        dict(
            long_,
            key="7",
            name="ZeRO-3, ref-free, long, chunked",
            overrides=[*free, "model.logprob_impl=chunked"],
        ),
        dict(
            long_,
            key="8",
            name="ZeRO-3, ref-free, long, fused_linear",
            overrides=[*free, "model.logprob_impl=fused_linear"],
        ),
        dict(
            long_,
            key="9",
            name="ZeRO-3, ref-free, long, fused_linear + grad. ckpt",
            overrides=[*free, "model.logprob_impl=fused_linear", "model.gradient_checkpointing=true"],
        ),
        dict(short, key="10", name="ZeRO-3, reference-free", ranks=1, overrides=free),
        # what a run holds whatever the model: the shipped 0.07M-parameter model, as rows 4 and 10
        dict(short, key="11", name="as 4, shipped 'tiny' model (0.07M)", model="tiny", overrides=free),
        dict(
            short, key="12", name="as 10, shipped 'tiny' model (0.07M)", model="tiny", ranks=1, overrides=free
        ),
        # LoRA r=16 on every linear layer: the reference is the base with its adapters off (no second copy)
        dict(
            short, key="13", name="ZeRO-3, LoRA r=16, reference = adapters off", overrides=["model.lora.r=16"]
        ),
        # the fixed part under ZeRO-2 (rows 11/12 are ZeRO-3's)
        dict(
            short, key="15", name="as 5, shipped 'tiny' model (0.07M)", model="tiny", ds="zero2", overrides=[]
        ),
        # sequence parallelism: both ranks share each row of the long micro-batch (data parallelism over 1)
        dict(
            long_,
            key="14",
            name="ZeRO-3, ref-free, long, fused_linear, sequence parallel 2",
            overrides=[*free, "model.logprob_impl=fused_linear", "parallel.sequence_parallel_size=2"],
        ),
    ]


def gpu_specs(args) -> list[dict]:
    """In priority order; each row runs only while the budget lasts."""
    short = dict(long=False, steps=args.steps, ranks=1, ds="zero3")
    long_ = dict(long=True, steps=args.long_steps, ranks=1, ds="zero3")
    free = ["loss.reference_free=true"]
    return [
        dict(
            short,
            key="g1",
            name="ZeRO-3, reference engine bf16",
            overrides=["model.reference_dtype=bfloat16"],
        ),
        dict(
            short,
            key="g2",
            name="ZeRO-3, precomputed reference bf16",
            overrides=["model.reference_dtype=bfloat16", "model.reference_mode=precomputed"],
        ),
        dict(
            long_,
            key="g3",
            name="ZeRO-3, ref-free, long, fused_linear",
            overrides=[*free, "model.logprob_impl=fused_linear"],
        ),
        dict(
            long_,
            key="g4",
            name="ZeRO-3, ref-free, long, naive",
            overrides=[*free, "model.logprob_impl=naive"],
        ),
    ]


# ----------------------------------------------------------------------------- module-level fused_linear


def module_child(args) -> None:
    """One process: the model of the long rows, one rank's long micro-batch, forward+backward of each
    variant in args.module_child; prints one JSON line {variant: peak growth in bytes}."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.model.files import has_weights, load_config
    from dpo_ds.model.lm import LogprobLM

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model_dir = Path(args.model_dir)
    torch.manual_seed(0)
    if has_weights(model_dir):
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir), config=load_config(model_dir), dtype=dtype)
    else:
        lm = AutoModelForCausalLM.from_config(load_config(model_dir), dtype=dtype)
    lm.to(device).train()
    hidden_size = lm.config.hidden_size
    head_w = lm.get_output_embeddings().weight  # (V, H)
    u = torch.randn(hidden_size, device=device, dtype=dtype)  # (H,) the dummy loss's direction
    big_u = torch.randn_like(head_w)  # (V, H): dot(W, U) gives the lm_head a full weight gradient

    def batch(rows: int, length: int, prompt: int):
        """A padded micro-batch as data/collate.py lays it out: every token after the prompt is scored,
        from the hidden state one position before it."""
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 30, (rows, length), generator=g).to(device)  # (rows, T)
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(prompt, length), indexing="ij")
        target_pos = (row * length + col - 1).reshape(-1).to(device)  # (M,) flat predicting positions
        target_ids = ids[row.to(device), col.to(device)].reshape(-1)  # (M,)
        return ids, torch.ones_like(ids), target_pos, target_ids

    def step(variant: str, ids, mask, target_pos, target_ids) -> None:
        if variant == "none":
            decoder = lm.get_decoder()
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            h = hidden.reshape(-1, hidden_size)[target_pos]  # (M, H) as LogprobLM takes them
            loss = (h @ u).float().sum() + torch.dot(head_w.view(-1), big_u.view(-1)).float()
        else:
            loss = LogprobLM(lm, variant).scored_logps(ids, mask, None, target_pos, target_ids)[0].sum()
        loss.backward()

    for p in lm.parameters():
        p.grad = torch.zeros_like(p)  # model state, not activations: resident before the measurement
    result = {}
    for variant in args.module_child.split(","):
        inputs = batch(2 * args.pairs, args.long_length, args.prompt_tokens)
        # warm-up at full size: code pages, library workspaces and allocator state out of the measurement
        step(variant, *inputs)
        gc.collect()
        before = dist_memory.memory_now_gib()
        dist_memory.reset_peak_memory()
        step(variant, *inputs)
        result[variant] = (dist_memory.peak_memory_gib() - before) * GIB
        result["scored_tokens"] = len(inputs[2])
        result["logits_bytes"] = len(inputs[2]) * lm.config.vocab_size * 4  # their fp32 logits
    print("RESULT " + json.dumps(result), flush=True)


def module_rows(args, work: Path, jobs: list[tuple[str, int]]) -> dict[int, dict]:
    """jobs: (variants, pairs per micro-batch). On CPU each variant runs in its own process (VmHWM is per
    process), two processes at a time (1 thread each); on CUDA one process runs a job's variants in turn,
    the allocator's max reset exactly between them. Returns {pairs: {variant: growth bytes, ...}}."""
    if not args.gpu_short:
        jobs = [(v, pairs) for group, pairs in jobs for v in group.split(",")]
    parallel = 1 if args.cuda else 2
    out: dict[int, dict] = {}
    running: list[tuple[str, int, subprocess.Popen]] = []

    def start(group: str, pairs: int) -> None:
        say(
            f"module-level forward+backward: {group}, {pairs} pair(s) = {2 * pairs} x {args.long_length} tokens"
        )
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--module-child",
            group,
            "--model-dir",
            str(work / "model"),
            "--pairs",
            str(pairs),
            "--long-length",
            str(args.long_length),
            "--prompt-tokens",
            str(args.prompt_tokens),
        ]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=run_env(args.cuda), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        running.append((group, pairs, proc))

    def finish() -> None:
        group, pairs, proc = running.pop(0)
        stdout, stderr = proc.communicate()
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        res = out.setdefault(pairs, {})
        if proc.returncode != 0 or line is None:
            say(f"module-level {group} FAILED:\n{stdout[-1500:]}\n{stderr[-2500:]}")
            res.setdefault("error", f"{group}: exit {proc.returncode}")
            return
        res.update(json.loads(line[len("RESULT ") :]))

    for group, pairs in jobs:
        if len(running) >= parallel:
            finish()
        start(group, pairs)
    while running:
        finish()
    return out


# ----------------------------------------------------------------------------- save


def save_rows(args, work: Path) -> dict:
    shape = SHAPES["smoke" if args.smoke else "quick" if args.quick else "full_save"]
    model = work / "save_model"
    n = make_model(model, shape)
    say(f"save: {n / 1e6:.0f}M-parameter model, ZeRO-3, 2 ranks")
    out_json = work / "save.json"
    cmd = deepspeed_cmd(
        "--model-dir",
        str(model),
        "--out-dir",
        str(work / "save_out"),
        "--json",
        str(out_json),
        ranks=2,
        script=ROOT / "bench" / "_save_memory_driver.py",
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(False), capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.exists():
        say(f"save driver FAILED:\n{proc.stdout[-2500:]}\n{proc.stderr[-2500:]}")
        return {"error": f"exit {proc.returncode}", "n_params": n}
    return {**json.loads(out_json.read_text()), "n_params": n}


# ----------------------------------------------------------------------------- report


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args, n_params: int, rows: list[dict], mod: dict, save: dict | None) -> tuple[str, dict]:
    out: list[str] = []
    by = {r["key"]: r for r in rows}
    shape = SHAPES[args.shape]
    if args.cuda:
        device = "1 GPU, max allocated"
    else:
        device = f"CPU{' (smoke of --gpu-short)' if args.gpu_short else ''}, peak RSS (VmHWM), 1 torch thread per rank"
    out.append(
        f"\nDPO training memory, rank 0; {device}. Llama {n_params / 1e6:.1f}M params (hidden {shape[0]}, "
        f"{shape[1]} layers, vocab {VOCAB}, untied), {'bf16' if args.gpu_short else 'fp32'} policy, AdamW; "
        f"short rows: batch {args.batch} pairs, max_length {args.max_length}, prompts 16-48 / responses "
        f"60-200 tokens; long rows: batch {args.long_batch} pairs, max_length {args.long_length}, responses "
        f"filling it; {args.steps} steps (short) / {args.long_steps} (long) each.\n"
    )
    out.append(
        "| # | config | ranks | peak GiB / rank (training) | models+opt GiB / rank | B/param | step s |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("skipped"):
            continue
        if "error" in r:
            out.append(f"| {r['key']} | {r['name']} | {r['ranks']} | FAILED: {r['error']} | | | |")
            continue
        owned = n_params / r["ranks"] if r["ds"] == "zero3" else n_params
        per_param = "-" if r.get("model") else f"{r['model_opt_gib'] * GIB / owned:.1f}"
        out.append(
            f"| {r['key']} | {r['name']} | {r['ranks']} | {gib(r['peak_gib'])} | {gib(r['model_opt_gib'])} | "
            f"{per_param} | {r['step_s']:.1f} |"
        )
    for r in rows:
        if r.get("skipped"):
            out.append(f"| {r['key']} | {r['name']} | {r['ranks']} | skipped: {r['skipped']} | | | |")
    out.append(
        "\npeak: VmHWM since the training loop began (max allocated on GPU); models+opt: RSS after step 1 "
        "minus RSS before any model was built (reference engine included where there is one); B/param: "
        "models+opt bytes per parameter this rank owns (N/ranks under ZeRO-3, N under ZeRO-2)."
    )
    targets: dict = {}
    ok = lambda r: r is not None and "error" not in r and "skipped" not in r  # noqa: E731

    # 1. precomputed <= engine - reference weights
    eng, pre = (by.get("g1"), by.get("g2")) if args.gpu_short else (by.get("1"), by.get("3"))
    ref_bytes = 2 if args.gpu_short else 4
    ranks = 1 if args.gpu_short else 2
    if ok(eng) and ok(pre):
        ref_w = n_params * ref_bytes / ranks / GIB
        limit = eng["peak_gib"] - ref_w
        passed = pre["peak_gib"] <= limit
        how = (
            f"{pre['peak_gib']:.3f} GiB vs engine {eng['peak_gib']:.3f} - reference weights {ref_w:.3f} "
            f"({n_params / 1e6:.1f}M x {ref_bytes} B / {ranks} rank{'s' if ranks > 1 else ''}) = {limit:.3f} GiB"
        )
        line = f"target precomputed peak <= engine peak - reference weights: {verdict(passed)} ({how})"
        if not passed:
            line += (
                f"; short by {(pre['peak_gib'] - limit) * 1024:.0f} MiB: the engine row's peak holds less than "
                "the reference's whole partition on top of the precomputed row's"
            )
        targets["precomputed"] = {"passed": passed, "line": line}
        out.append(line)
        free = by.get("4")
        if ok(free):
            out.append(
                f"  precomputed vs reference-free (row 4): peak +{(pre['peak_gib'] - free['peak_gib']) * 1024:.0f} "
                f"MiB, models+opt +{(pre['model_opt_gib'] - free['model_opt_gib']) * 1024:.0f} MiB: what the "
                "destroyed pre-pass engine leaves resident (its table is a few KiB)"
            )
    else:
        out.append("target precomputed peak <= engine peak - reference weights: n/a (a row did not run)")

    # 2. fused_linear on top of the activations (module level)
    from dpo_ds.model.logprobs.reference import default_chunk_rows

    main = mod.get(args.module_pairs, {})
    if "none" in main and "fused_linear" in main:
        logits = main["logits_bytes"]
        extra = main["fused_linear"] - main["none"]
        passed = extra <= logits / 8
        out.append(
            "\nmodule level: one process per variant, the model above, peak growth of one forward+backward "
            "(every .grad allocated beforehand; 'none' = decoder + dummy loss + a full lm_head weight gradient, "
            "no logits); logits = scored tokens x 32000 x 4 B\n"
        )
        out.append(
            "| micro-batch | scored tokens | logits MiB | variant | peak growth MiB | on top of none MiB | / logits |"
        )
        out.append("|---|---:|---:|---|---:|---:|---:|")
        for pairs in sorted(mod):
            res = mod[pairs]
            if "none" not in res:
                continue
            size = res["logits_bytes"]
            for v in ("none", "fused_linear", "chunked", "naive"):
                if v in res:
                    d = res[v] - res["none"]
                    out.append(
                        f"| {pairs} pair(s) x 2 x {args.long_length} | {res['scored_tokens']} | {size / MIB:.1f} | "
                        f"{v} | {res[v] / MIB:.1f} | {d / MIB:.1f} | {d / size:.3f} |"
                    )
        line = (
            f"target fused_linear adds <= 1/8 of the logits on top of the activations: {verdict(passed)} "
            f"({extra / MIB:.1f} MiB = {extra / logits:.3f} of the logits' {logits / MIB:.1f} MiB, limit "
            f"{logits / 8 / MIB:.1f} MiB; one rank's micro-batch of the long rows, {main['scored_tokens']} tokens)"
        )
        if not passed:
            twice = mod.get(2 * args.module_pairs, {})
            scale = ""
            if "none" in twice and "fused_linear" in twice:
                e2 = twice["fused_linear"] - twice["none"]
                scale = f" (at twice the tokens it adds {e2 / MIB:.1f} MiB)"
            line += (
                f"; over by {(extra - logits / 8) / MIB:.1f} MiB: its excess is about fixed, one fp32 (chunk, V) "
                f"buffer of {min(main['scored_tokens'], default_chunk_rows(VOCAB)) * VOCAB * 4 / MIB:.1f} MiB and more"
                f"{scale}, while 1/8 of this small micro-batch's logits is {logits / 8 / MIB:.1f} MiB"
            )
        targets["fused_linear"] = {"passed": passed, "line": line}
        out.append(line)
        fl = by.get("g3" if args.gpu_short else "8")
        others = [by.get(k) for k in (("g4",) if args.gpu_short else ("6", "7"))]
        if ok(fl):
            parts = [
                f"{o['name'].split(', ')[-1]} - fused_linear = {(o['peak_gib'] - fl['peak_gib']) * 1024:.0f} MiB "
                f"({(o['peak_gib'] - fl['peak_gib']) * GIB / logits:.2f} x logits)"
                for o in others
                if ok(o)
            ]
            if parts:
                out.append(f"training rows (peaks, same micro-batch per rank): {'; '.join(parts)}")
    else:
        out.append("target fused_linear adds <= 1/8 of the logits: n/a (module-level measurement failed)")

    # 3. ZeRO-3 2 ranks vs 1 rank
    if not args.gpu_short:
        two, one = by.get("4"), by.get("10")
        if ok(two) and ok(one):
            ratio = two["model_opt_gib"] / one["model_opt_gib"]
            passed = ratio <= 0.6
            line = (
                f"target ZeRO-3 models+opt per rank, 2 ranks <= 0.6 x 1 rank: {verdict(passed)} "
                f"({two['model_opt_gib']:.3f} vs {one['model_opt_gib']:.3f} GiB = {ratio:.2f}x)"
            )
            # two rows, two unknowns: models+opt = c x (N / ranks) + F, F what every rank holds regardless
            c = (one["model_opt_gib"] - two["model_opt_gib"]) * GIB / (n_params / 2)
            fixed = two["model_opt_gib"] - c * n_params / 2 / GIB
            if not passed:
                line += (
                    f"; over by {(ratio - 0.6) * one['model_opt_gib'] * 1024:.0f} MiB per rank: ~{fixed * 1024:.0f} "
                    "MiB of each rank's RSS does not shrink with ranks (library code loaded while the models are "
                    "built and stepped, see rows 11-12; DeepSpeed's reduce bucket; per-process buffers)"
                )
            targets["zero3_ranks"] = {"passed": passed, "line": line}
            out.append(line)
            out.append(
                f"  rows 4 and 10 fit models+opt = {c:.1f} B x parameters owned + {fixed * 1024:.0f} MiB per rank "
                f"whatever the rank count"
            )
            t2, t1 = by.get("11"), by.get("12")
            if ok(t2) and ok(t1):
                a, b = two["model_opt_gib"] - t2["model_opt_gib"], one["model_opt_gib"] - t1["model_opt_gib"]
                out.append(
                    f"  not the target, a diagnostic: minus what the same run holds with the 0.07M-parameter model "
                    f"(rows 11, 12: {t2['model_opt_gib'] * 1024:.0f} / {t1['model_opt_gib'] * 1024:.0f} MiB of "
                    f"library code loaded while building and stepping, and per-process buffers): {a:.3f} vs "
                    f"{b:.3f} GiB = {a / b:.2f}x"
                )
        else:
            out.append("target ZeRO-3 2 ranks <= 0.6 x 1 rank: n/a (a row did not run)")

    # 4. LoRA under ZeRO-3 vs full DPO with a reference engine (both 2 ranks)
    lora, full = by.get("13"), by.get("1")
    if ok(lora) and ok(full):
        ratio = lora["model_opt_gib"] / full["model_opt_gib"]
        passed = ratio <= 0.4
        line = (
            f"target LoRA r=16 (ZeRO-3, adapters-off reference) models+opt <= 0.4x full DPO with a reference engine: "
            f"{verdict(passed)} ({lora['model_opt_gib']:.3f} vs {full['model_opt_gib']:.3f} GiB per rank = {ratio:.2f}x; "
            f"peak {lora['peak_gib']:.3f} vs {full['peak_gib']:.3f} GiB)"
        )
        targets["lora"] = {"passed": passed, "line": line}
        out.append(line)
    elif lora is not None or full is not None:
        out.append("target LoRA models+opt <= 0.4x full DPO: n/a (a row did not run)")

    if save is not None:
        out.append(
            f"\nSaving policy.pt of a {save['n_params'] / 1e6:.0f}M-parameter ZeRO-3 policy (2 ranks, fp32 "
            f"= {save['n_params'] * 4 / MIB:.0f} MiB of weights): rank 0's peak RSS growth during the save\n"
        )
        if "error" in save:
            out.append(f"save: FAILED ({save['error']})")
        else:
            out.append("| method | rank 0 RSS before GiB | peak growth MiB | seconds | file MiB |")
            out.append("|---|---:|---:|---:|---:|")
            for k, label in (
                ("old", "before: gather all, torch.save"),
                ("new", "after: run_save.save_policy"),
            ):
                s = save[k]
                out.append(
                    f"| {label} | {s['rss_before_gib']:.3f} | {s['growth_gib'] * 1024:.1f} | {s['seconds']:.1f} "
                    f"| {s['file_bytes'] / MIB:.1f} |"
                )
            out.append(
                f"both files load with torch.load and hold equal tensors: {save['equal']} "
                f"({save['n_tensors']} tensors; largest {save['largest_tensor_bytes'] / MIB:.1f} MiB)"
            )
    return "\n".join(out), targets


# ----------------------------------------------------------------------------- main


def gpu_ready() -> str | None:
    """Why --gpu-short cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (use --cpu-smoke to check the plumbing on CPU)"
    return None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~20M model, shorter sequences: a smoke run")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, 2 ranks: the 8.6M smoke model, the smallest sizes, the rows of SMOKE_ROWS + module + save "
        "tables (~2.5 min; the code paths, not the figures); exit 1 if any of them failed",
    )
    ap.add_argument(
        "--moe",
        action="store_true",
        help="only the Mixture-of-Experts rows (bench/_memory_moe.py: m1 full DPO, m2 LoRA on attention + experts), "
        "each with the planner's estimate and its tolerance check; --rows m2 for one, --smoke for the smoke sizes",
    )
    ap.add_argument("--gpu-short", action="store_true", help="bench/gpu_check.sh's step: 1 rank, CUDA, ~1B")
    ap.add_argument("--cpu-smoke", action="store_true", help="with --gpu-short: tiny sizes on CPU")
    ap.add_argument("--budget-s", type=float, default=80, help="--gpu-short: start no row after this")
    ap.add_argument("--out", default=None, help="write the rows, module figures and targets as JSON")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds per training run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-save", action="store_true", help="leave the save table out")
    ap.add_argument(
        "--rows",
        default=None,
        help="only these training rows, e.g. 1,13 (the module and save tables left out)",
    )
    # internal: the module-level child
    ap.add_argument("--module-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--long-length", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-tokens", type=int, default=17, help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.module_child:
        module_child(args)
        return 0

    t_start = time.time()
    args.cuda = args.gpu_short and not args.cpu_smoke
    signal.signal(signal.SIGTERM, lambda *_: ([stop(p) for p in RUNNING], sys.exit(143)))
    no_runs = None  # why the training rows cannot run (--gpu-short without deepspeed)
    if args.gpu_short:
        why = None if args.cpu_smoke else gpu_ready()
        if why:
            print(f"memory: SKIPPED: {why}")
            if args.out:
                write_json(args.out, {"skipped": why})
            return 0
        no_runs = missing_modules()
        if no_runs:
            print(
                f"memory: training rows SKIPPED: {no_runs}; the module-level rows need only torch + transformers"
            )
        sizes = "smoke" if args.cpu_smoke else "gpu"
    else:
        sizes = "cpu_smoke" if args.smoke else "quick" if args.quick else "full"
    set_sizes(args, sizes)
    ranks = 1 if args.gpu_short else 2
    args.module_pairs = args.long_batch // ranks  # one rank's micro-batch of the long rows
    args.prompt_tokens = 17  # BOS + the 16-character prompt of the long rows
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_bench_memory_"))
    say(f"work dir {work}")
    try:
        if args.moe:  # the MoE rows alone, on their own model (bench/_memory_moe.py)
            from bench._memory_moe import run_moe

            return run_moe(args, work, t_start, train_row=train_row, make_data=make_data)
        weights_on = "cuda" if args.gpu_short and not args.cpu_smoke else None
        n_params = make_model(work / "model", SHAPES[args.shape], weights_on)
        say(f"model: {n_params / 1e6:.1f}M parameters{' (bf16 weights written)' if weights_on else ''}")
        make_data(work / "data_short", args.batch * args.steps, args.max_length, fill=False)
        make_data(work / "data_long", args.long_batch * args.long_steps, args.long_length, fill=True)
        if args.gpu_short:
            ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
            ds["optimizer"]["params"]["torch_adam"] = True  # FusedAdam would be JIT-compiled first (minutes)
            (work / "zero3.json").write_text(json.dumps(ds))
        rows: list[dict] = []
        mod: dict = {}
        if args.gpu_short:
            deadline = args.deadline = t_start + args.budget_s
            mod = module_rows(args, work, [("none,fused_linear,chunked,naive", args.module_pairs)])
            for spec in gpu_specs(args):
                # a row takes about as long as the slowest so far (or 25 s before the first)
                need = max([r.get("wall_s", 0) for r in rows] + [25])
                if no_runs:
                    rows.append({**spec, "skipped": no_runs})
                elif time.time() + need > deadline:
                    rows.append({**spec, "skipped": f"time budget ({args.budget_s:.0f} s)"})
                else:
                    rows.append(train_row(spec, args, work))
            save = None
        else:
            wanted = set(args.rows.split(",")) if args.rows else None
            keep = wanted or (set(SMOKE_ROWS) if args.smoke else None)
            for spec in training_specs(args):
                if keep is None or spec["key"] in keep:
                    rows.append(train_row(spec, args, work))
            # the training rows' micro-batch, and twice as many tokens: fused's excess is mostly fixed
            mod = (
                {}
                if wanted
                else module_rows(
                    args,
                    work,
                    [
                        ("none,fused_linear,chunked,naive", args.module_pairs),
                        *([] if args.smoke else [("none,fused_linear", 2 * args.module_pairs)]),
                    ],
                )
            )
            save = None if args.no_save or wanted else save_rows(args, work)
        done = [r for r in rows if not r.get("skipped")]
        skipped = [r for r in rows if r.get("skipped")]
        text, targets = report(args, n_params, done + skipped, mod, save)
        print(text)
        print(f"\n(whole bench: {time.time() - t_start:.0f} s)")
        if args.out:
            out = dict(n_params=n_params, shape=SHAPES[args.shape], rows=rows, module=mod, save=save)
            write_json(args.out, {**out, "targets": targets, "table": text})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.smoke and (failed := smoke_failures(rows, mod, save)):
        print(f"memory --smoke: FAILED: {', '.join(failed)}")
        return 1
    return 0


def write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def smoke_failures(rows: list[dict], mod: dict, save: dict | None) -> list[str]:
    """--smoke checks that every part ran (the full run reports a failed row in its table): what did not."""
    failed = [r["key"] for r in rows if "error" in r or r.get("skipped")]
    failed += [f"module {k}" for k, r in mod.items() if "error" in r or "none" not in r]
    return failed + (["save"] if save is None or "error" in save else [])


if __name__ == "__main__":
    sys.exit(main())
