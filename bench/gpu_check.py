"""Python half of bench/gpu_check.sh: one subcommand per check, each writing a JSON result.

    python bench/gpu_check.py env     --out R/env.json
    python bench/gpu_check.py kernels --out R/b_kernels.json      # (b) log-prob kernels vs copy bandwidth
    python bench/gpu_check.py dpo     --out R/c_dpo.json          # (c) DPO steps of a ~1B Llama through dpo_ds
    python bench/gpu_check.py dpo --moe --layouts packed --out R/g_moe.json  # (g) the same, a ~1B-total MoE
    python bench/gpu_check.py report  --dir R [--md OUT.md]       # (e) one markdown table of everything
    ... --cpu-smoke                                               # tiny sizes on CPU: checks the plumbing only
    python bench/gpu_check.py report  --dir R --cpu-smoke         # + a CPU-smoke banner; exit 1 if a stage failed

Nothing is downloaded: random weights, a generated word-level tokenizer, synthetic data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # dpo_ds from this checkout, installed or not
from bench import _gpu_check_moe as moe  # noqa: E402
from dpo_ds.dist.launcher import free_port, missing_modules, wait_for_train_steps  # noqa: E402

GIB = 2**30
# Dense bf16 peak (no sparsity), from NVIDIA's data sheets; the H200 has the H100 SXM's tensor cores.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


# ----------------------------------------------------------------------------- env


def cmd_env(args) -> None:
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    for pkg in ("torch", "triton", "transformers", "deepspeed", "datasets", "accelerate", "pydantic"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    write_json(args.out, info)
    print(json.dumps(info))


# ----------------------------------------------------------------------------- (b) kernels


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_ms(fn, device, reps: int) -> float:
    """Median wall time of fn() in ms, synchronised (one untimed warm-up call first)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Device-to-device copy, bytes read + written per second (the roofline for a memory-bound kernel)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms / 1e3)


def cmd_kernels(args) -> None:
    import torch

    from dpo_ds.model.logprobs import available_impls, token_logprobs

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        write_json(args.out, {"skipped": "no CUDA device (use --cpu-smoke to check the plumbing on CPU)"})
        print("kernels: skipped, no CUDA device")
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (16384 if cuda else 64)
    vocabs = args.vocabs or ([32000, 128256] if cuda else [1000, 4000])
    reps = args.reps if cuda else min(args.reps, 2)
    impls = [i for i in ("naive", "chunked", "triton") if i in available_impls()]
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # the smoke run of gpu_check.sh sets it
        impls = [i for i in impls if i != "triton"]
    torch.manual_seed(0)

    copy_bytes = (2 * GIB) if cuda else (64 * 2**20)
    bw = copy_bandwidth(device, copy_bytes, reps * 2)
    print(
        f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + written, {copy_bytes / GIB:.2f} GiB tensor)", flush=True
    )

    rows = []
    for vocab in vocabs:
        logits = torch.randn(tokens, vocab, device=device, dtype=dtype)  # (N, V)
        # every row labelled, as the rows that dpo_ds's restricted lm_head produces
        labels = torch.randint(0, vocab, (tokens,), device=device)  # (N,)
        elem = logits.element_size()
        # An ideal fused fwd+bwd reads the logits once (forward), reads them again and writes the gradient
        # once (backward): 3 x N x V elements. Every impl is measured against these nominal bytes.
        nominal = 3 * tokens * vocab * elem
        reference = None
        for impl in impls:
            x = logits.detach().requires_grad_()

            def step(x=x, impl=impl, labels=labels):
                out = token_logprobs(x, labels, impl=impl)
                out.sum().backward()
                x.grad = None
                return out

            try:
                ms = time_ms(step, device, reps)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = step()
                    torch.cuda.synchronize()
                    # above what was live, less the (N, V) gradient that every impl must produce
                    extra = torch.cuda.max_memory_allocated() - base - tokens * vocab * elem
                else:
                    out, extra = step(), None
                out = out.detach().float()
                reference = out if reference is None else reference
                diff = (out - reference).abs().max().item()
                gbs = nominal / (ms / 1e3)
                rows.append(
                    dict(
                        impl=impl,
                        tokens=tokens,
                        vocab=vocab,
                        dtype=str(dtype)[6:],
                        ms=ms,
                        gbps=gbs / 1e9,
                        frac=gbs / bw,
                        extra_gib=None if extra is None else extra / GIB,
                        diff_vs_naive=diff,
                    )
                )
                print(
                    f"{impl:8s} {tokens}x{vocab}: {ms:.2f} ms, {gbs / 1e9:.0f} GB/s ({gbs / bw:.0%} of copy), "
                    f"extra {'-' if extra is None else f'{extra / GIB:.2f} GiB'}, max|diff| {diff:.1e}",
                    flush=True,
                )
            except Exception as e:  # one failing impl should not hide the others' numbers
                rows.append(
                    dict(impl=impl, tokens=tokens, vocab=vocab, error=f"{type(e).__name__}: {e}"[:300])
                )
                print(f"{impl} {tokens}x{vocab}: FAILED {type(e).__name__}: {e}", flush=True)
            finally:
                x.grad = None
                if cuda:
                    torch.cuda.empty_cache()
        del logits
    write_json(args.out, {"device": str(device), "copy_gbps": bw / 1e9, "rows": rows})


# ----------------------------------------------------------------------------- (c) DPO steps


def model_shape(args, cuda: bool) -> dict:
    if args.cpu_smoke and not cuda:
        return dict(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, vocab=1000)
    # ~1.0B parameters: Llama layout with TinyLlama-like width/depth and a 32k vocabulary
    return dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.hidden // 64,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
    )


def write_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` ids: '<pad> <s> </s> <unk>' then words w0, w1, ... (one word = one token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words.update({f"w{i}": i + 4 for i in range(vocab - 4)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(model_dir))


def write_model(model_dir: Path, shape: dict, device, dtype) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: seconds for 1B params, not minutes on CPU
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(model_dir), safe_serialization=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n_params


def write_data(data_dir: Path, n_train: int, n_test: int, vocab: int, args) -> float:
    """Flat preference rows of words w4.. with log-normal lengths (in tokens), capped to fit max_length."""
    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(n))

    def length(median):
        return max(1, round(rng.lognormvariate(math.log(median), 0.5)))

    total = 0
    for split, n in (("train", n_train), ("test", n_test)):
        with open(data_dir / f"{split}.jsonl", "w") as f:
            for i in range(n):
                p = min(length(args.prompt_median), args.max_prompt_length - 2)
                room = args.max_length - 3 - p
                c, r = min(length(args.response_median), room), min(length(args.response_median), room)
                total += 2 * (p + 2) + c + r + 2
                f.write(
                    json.dumps(
                        {
                            "prompt": f"w{i % (vocab - 4)} " + words(p),
                            "chosen": words(c),
                            "rejected": words(r),
                        }
                    )
                    + "\n"
                )
    return total / (n_train + n_test)


def cmd_dpo(args) -> None:
    import torch

    t_start = time.time()
    deadline = t_start + args.budget_s
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        write_json(args.out, {"skipped": "no CUDA device (use --cpu-smoke to check the plumbing on CPU)"})
        print("dpo: skipped, no CUDA device")
        return
    msg = missing_modules()
    if msg:
        write_json(args.out, {"skipped": msg})
        print(f"dpo: SKIPPED ({'g' if args.moe else 'c'}): {msg}")
        return

    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    shape = moe.moe_shape(args.cpu_smoke and not cuda) if args.moe else model_shape(args, cuda)
    steps, batch = (args.steps, args.batch_size) if cuda else (3, 4)
    if not cuda:
        args.max_length, args.max_prompt_length, args.prompt_median, args.response_median = 64, 32, 12, 16

    work = Path(tempfile.mkdtemp(prefix="gpu_check_dpo_"))
    model_dir, data_dir = work / "model", work / "data"
    model_dir.mkdir()
    data_dir.mkdir()
    write_tokenizer(model_dir, shape["vocab"])
    wdtype = torch.bfloat16 if cuda else torch.float32
    # an MoE's MFU counts its active parameters (moe.ACTIVE_RULE), a dense model's all of them
    info = moe.write_moe_model(model_dir, shape, device, wdtype) if args.moe else {}
    n_params = info["n_params"] if args.moe else write_model(model_dir, shape, device, wdtype)
    n_flop = info.get("n_active", n_params)
    tokens_per_pair = write_data(data_dir, steps * batch, batch, shape["vocab"], args)
    print(
        f"dpo: model {n_params / 1e9:.3f}B params ({shape}), {tokens_per_pair:.0f} tokens/pair, "
        f"set up in {time.time() - t_start:.0f} s",
        flush=True,
    )

    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    # torch's AdamW: DeepSpeed's FusedAdam would be JIT-compiled with nvcc first (minutes of the budget).
    ds["optimizer"]["params"]["torch_adam"] = True
    ds_path = work / "zero3_torch_adam.json"
    ds_path.write_text(json.dumps(ds))
    impl = args.logprob_impl or ("triton" if cuda else "chunked")
    if not cuda and not args.logprob_impl and os.environ.get("TRITON_INTERPRET") == "1":
        import importlib.util

        if importlib.util.find_spec("triton"):
            impl = "triton"  # smoke: the GPU's kernel, in the interpreter (gpu_check.sh --cpu-smoke sets it)
    layouts = [x for x in args.layouts.split(",") if x]
    runs = {}
    for k, layout in enumerate(layouts):
        left = deadline - time.time()
        if left < 30:
            runs[layout] = {"status": "skipped: out of time"}
            continue
        runs[layout] = _dpo_run(
            layout, args, cuda, impl, dtype, steps, batch, model_dir, data_dir, work / f"run_{layout}", ds_path,
            time.time() + left / (len(layouts) - k),
        )  # fmt: skip
        r = runs[layout]
        r.update(n_params=n_params, shape=shape)
        if r.get("tokens_per_s") and r.get("peak_flops"):
            # MFU (PaLM appendix B convention): 6 N per trained token; the reference forward (2 N) is extra work
            r.update(mfu=6 * n_flop * r["tokens_per_s"] / r["peak_flops"])
            r.update(mfu_with_ref=8 * n_flop * r["tokens_per_s"] / r["peak_flops"])
        else:
            r.update(mfu=None, mfu_with_ref=None)
        print(json.dumps({layout: {k2: v for k2, v in runs[layout].items() if k2 != "log_tail"}}), flush=True)
    first = runs[layouts[0]] if layouts else {}
    result = {
        **first,  # the first layout's figures at the top, as the report reads them
        "layout": layouts[0] if layouts else None,
        "runs": runs,
        "n_params": n_params,
        **info,  # --moe: n_active, params_by_part, experts_impl ...
        "shape": shape,
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "wall_s": time.time() - t_start,
    }
    write_json(args.out, result)
    shutil.rmtree(work, ignore_errors=True)  # the model's weights (GBs); the runs' logs stay beside args.out


def _dpo_run(
    layout, args, cuda, impl, dtype, steps, batch, model_dir, data_dir, run_dir, ds_path, deadline
) -> dict:
    """One layout's DPO steps through dpo_ds/train.py; stopped once its steps are in metrics.jsonl."""
    import torch

    t_start = time.time()
    overrides = [
        "loss=dpo",
        "loss.beta=0.1",
        f"model.name_or_path={model_dir}",
        f"datasets=[{data_dir}]",
        f"batch_size={batch}",
        "gradient_accumulation_steps=1",
        "lr=1e-6",
        "warmup_steps=0",
        f"max_length={args.max_length}",
        f"max_prompt_length={args.max_prompt_length}",
        "n_epochs=null",
        f"n_examples={steps * batch}",
        "do_first_eval=false",
        "n_eval_examples=0",
        "eval_every=1000000000",
        "log_every=1",
        f"run_dir={run_dir}",
        f"data.cache_dir={run_dir.parent / 'hf_cache'}",
        f"model.policy_dtype={dtype}",
        f"model.reference_dtype={dtype}",
        f"model.logprob_impl={impl}",
        f"data.layout={layout}",  # on CUDA, packed and shared_prompt rows run on FlexAttention (auto)
    ]
    if args.max_tokens_per_micro_batch and cuda and layout != "padded":
        overrides.append(f"data.max_tokens_per_micro_batch={args.max_tokens_per_micro_batch}")
    overrides += args.keys
    if not cuda:
        overrides.append("torch_threads=2")
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cuda" if cuda else "cpu",
    )
    if cuda:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(REPO / "dpo_ds" / "train.py"), "--ds", str(ds_path), *overrides]
    log_path = Path(args.out).with_name(f"{Path(args.out).stem}_{layout}.log")
    metrics_path = run_dir / "metrics.jsonl"
    # A new session so the whole tree can be stopped once the last step's metrics are written (the final
    # checkpoint of a 1B model, ~16 GB of optimizer state, is no part of this check). SIGKILL: SIGTERM is
    # a preemption request to dpo_ds, which would save that checkpoint first.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(*_):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(143)))
    try:
        records, status = wait_for_train_steps(proc, metrics_path, steps, deadline)
    finally:
        stop()
    log_tail = log_path.read_text()[-2000:] if log_path.exists() else ""
    result = {
        "status": status,
        "layout": layout,
        "steps": len(records),
        "batch_pairs": batch,
        "max_length": args.max_length,
        "logprob_impl": impl,
        "dtype": dtype,
        "zero": 3,
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "wall_s": time.time() - t_start,
    }
    result.update(_timed_figures(records, args.skip, result["device"]))
    if status != "ok":
        result["log_tail"] = log_tail
    return result


def _timed_figures(records: list[dict], skip: int, device: str) -> dict:
    """Throughput of the records after the first `skip` (at least one timed), peak memory, first losses."""
    timed = records[min(skip, max(len(records) - 1, 0)) :]
    if not timed:
        return {}
    secs = sum(r["throughput/step_seconds"] for r in timed)
    toks = sum(r["throughput/real_tokens_per_second"] * r["throughput/step_seconds"] for r in timed)
    return dict(
        tokens_per_s=toks / secs,
        step_s=secs / len(timed),
        timed_steps=len(timed),
        peak_gib=max(r["memory/peak_gib"] for r in records),
        padding=statistics.mean(r["throughput/padding_fraction"] for r in timed),
        first_losses=[r["loss/train"] for r in records[:3]],
        # an MoE run's router load-balancing loss (loss.router_aux_coef); a dense model logs none
        first_aux=[r["aux_loss/train"] for r in records[:3] if "aux_loss/train" in r],
        peak_flops=peak_flops(device),
    )


# ----------------------------------------------------------------------------- (e) report


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pytest_summary(res: Path) -> tuple[str, str]:
    rc_file, log_file = res / "a_pytest.rc", res / "a_pytest.log"
    if not rc_file.exists():
        return "no result", "did not run"
    rc = rc_file.read_text().strip()
    lines = [x for x in (log_file.read_text().splitlines() if log_file.exists() else []) if x.strip()]
    summary = next(
        (x.strip("= ") for x in reversed(lines) if " in " in x and ("passed" in x or "failed" in x)), ""
    )
    verdict = {"0": "PASS", "124": "TIMED OUT", "137": "KILLED"}.get(rc, f"FAIL (exit {rc})")
    return verdict, summary or (lines[-1][:120] if lines else "")


def _planned(r: dict) -> str:
    """dpo_ds.plan's peak per rank beside max_memory_allocated: the planner's target is 0.90x-1.25x."""
    if "planned_gib" not in r:
        return f"plan: {r.get('planned_error', 'none')}"
    ratio = r["planned_gib"] / max(r["peak_gib"], 1e-9)
    ok = "within" if 0.90 <= ratio <= 1.25 else "OUTSIDE"
    return f"planned {r['planned_gib']:.2f} GiB, {ratio:.2f}x ({ok} 0.90-1.25x)"


def _memory_rows(mem: dict | None) -> list[str]:
    """(d): bench/memory.py --gpu-short's training rows, module-level fused_linear figures and targets."""
    if mem is None:
        return ["| (d) peak memory | | | | | | no result (timed out or crashed; see the log) |"]
    if "skipped" in mem:
        return [f"| (d) peak memory | | | | | | SKIPPED: {mem['skipped']} |"]
    rows = []
    for r in mem.get("rows", []):
        case = f"{mem['n_params'] / 1e9:.2f}B, {r['name']}, {r['ranks']} rank"
        if r.get("skipped"):
            rows.append(f"| (d) peak memory | {case} | | | | | skipped: {r['skipped']} |")
        elif "error" in r:
            rows.append(f"| (d) peak memory | {case} | | | | | FAILED: {r['error']} |")
        else:
            rows.append(
                f"| (d) peak memory | {case}, batch {r['batch']} x {r['max_length']} | {r['step_s']:.2f} s/step "
                f"| | | {r['peak_gib']:.2f} GiB | models+opt {r['model_opt_gib']:.2f} GiB; {_planned(r)} |"
            )
    for pairs, res in sorted(mem.get("module", {}).items()):
        if "none" not in res:
            rows.append(
                f"| (d) fwd+bwd, module | {pairs} pair(s) | | | | | FAILED: {res.get('error', '?')} |"
            )
            continue
        logits = res["logits_bytes"]
        for v in ("none", "fused_linear", "chunked", "naive"):
            if v in res:
                d = res[v] - res["none"]
                rows.append(
                    f"| (d) fwd+bwd, module | {v}, {res['scored_tokens']} scored tokens | | | | "
                    f"{res[v] / GIB:.2f} GiB | +{d / GIB:.2f} GiB over none = {d / logits:.3f} x fp32 logits |"
                )
    for name, t in mem.get("targets", {}).items():
        rows.append(f"| (d) target | {name} | | | | | {t['line']} |")
    return rows


def _long_rows(long: dict | None) -> list[str]:
    """(f): bench/long_context.py --gpu's rows (it prints its own table too)."""
    if long is None:
        return ["| (f) long pair | | | | | | no result (timed out or crashed; see the log) |"]
    if "skipped" in long:
        return [f"| (f) long pair | | | | | | SKIPPED: {long['skipped']} |"]
    rows = []
    for r in long.get("rows", []):
        mlp = f"MLP tiles of {r['tiled']}" if r.get("tiled") else "whole MLP"
        case = f"{long['n_params'] / 1e9:.2f}B, SP 1, 1 rank, pair of {r['length']} tokens, {mlp}"
        if "error" in r:
            rows.append(f"| (f) long pair | {case} | | | | | FAILED: {r['error']} |")
        else:
            rows.append(
                f"| (f) long pair | {case} | {r['step_s']:.2f} s/step | {r['tokens_per_s']:,.0f} real tok/s | | "
                f"{r['peak_gib']:.2f} GiB | packed, checkpointing, fused_linear |"
            )
    return rows


def _problems(res: Path, kern, dpo, memory, long, moe_res) -> list[str]:
    """Every stage that failed, was skipped, timed out or left no result (with --cpu-smoke: exit 1)."""
    bad = []
    verdict, _ = _pytest_summary(res)
    if verdict != "PASS":
        bad.append(f"(a) parity tests: {verdict}")
    stage_rc = res / "stage_rc.txt"  # gpu_check.sh: '<stage> <exit status>' per line
    for line in stage_rc.read_text().splitlines() if stage_rc.exists() else []:
        stage, _, rc = line.partition(" ")
        if rc.strip() != "0":
            bad.append(f"({stage}) exited {rc.strip()}")
    for name, obj in (
        ("(b) kernels", kern),
        ("(c) DPO steps", dpo),
        ("(g) MoE DPO steps", moe_res),
        ("(d) memory", memory),
        ("(f) long pair", long),
    ):
        if obj is None:
            bad.append(f"{name}: no result")
        elif "skipped" in obj:
            bad.append(f"{name}: skipped: {obj['skipped']}")
    for r in (kern or {}).get("rows", []):
        if "error" in r:
            bad.append(f"(b) {r['impl']} {r['tokens']}x{r['vocab']}: {r['error'][:120]}")
    for layout, run in ((dpo or {}).get("runs") or {}).items():
        if "tokens_per_s" not in run or run.get("status") != "ok":
            bad.append(f"(c) {layout}: {run.get('status', 'no result')}")
    bad.extend(moe.problems(moe_res))
    for r in (memory or {}).get("rows", []):
        if r.get("skipped") or "error" in r:
            bad.append(f"(d) {r['name']}: {r.get('error') or r.get('skipped')}")
    for pairs, r in (memory or {}).get("module", {}).items():
        if "none" not in r:
            bad.append(f"(d) module level, {pairs} pair(s): {r.get('error', '?')}")
    for r in (long or {}).get("rows", []):
        if "error" in r:
            bad.append(f"(f) {r['length']} tokens{' tiled' if r.get('tiled') else ''}: {r['error']}")
    return bad


SMOKE_BANNER = (
    "**CPU SMOKE RUN: tiny models on CPU, gloo, TRITON_INTERPRET=1. These figures only show that every stage's "
    "code runs end to end; they are CPU smoke figures, not GPU results.**"
)


def cmd_report(args) -> int:
    res = Path(args.dir)
    env = _load(res / "env.json") or {}
    kern = _load(res / "b_kernels.json")
    dpo = _load(res / "c_dpo.json")
    memory = _load(res / "d_memory.json")  # bench/memory.py --gpu-short
    long = _load(res / "f_long.json")  # bench/long_context.py --gpu
    moe_res = _load(res / "g_moe.json")  # gpu_check.py dpo --moe
    out = []
    if args.cpu_smoke:
        out.append(SMOKE_BANNER + "\n")
    dev = env.get("device", "?")
    out.append(
        f"GPU check on {dev}: torch {env.get('torch')}, triton {env.get('triton')}, transformers "
        f"{env.get('transformers')}, deepspeed {env.get('deepspeed')}, datasets {env.get('datasets')}\n"
    )
    out.append("| check | case | time | throughput | vs copy BW / MFU | peak memory | note |")
    out.append("|---|---|---:|---:|---:|---:|---|")
    verdict, summary = _pytest_summary(res)
    interp = res / "a_triton_interpret"
    interp = interp.read_text().strip() if interp.exists() else "0"
    out.append(
        f"| (a) parity tests | tests/model/test_logprobs.py, TRITON_INTERPRET={interp} | | | | | {verdict}: {summary} |"
    )
    if kern is None:
        out.append("| (b) log-prob kernels | | | | | | no result (timed out or crashed; see the log) |")
    elif "skipped" in kern:
        out.append(f"| (b) log-prob kernels | | | | | | skipped: {kern['skipped']} |")
    else:
        out.append(
            f"| (b) copy bandwidth | device-to-device copy | | {kern['copy_gbps']:.0f} GB/s | 100% | | "
            "bytes read + written |"
        )
        for r in kern["rows"]:
            case = f"{r['impl']} {r['tokens']}x{r['vocab']} {r.get('dtype', '')} fwd+bwd"
            if "error" in r:
                out.append(f"| (b) log-probs | {case} | | | | | FAILED: {r['error'][:120]} |")
                continue
            mem = "-" if r["extra_gib"] is None else f"+{r['extra_gib']:.2f} GiB"
            out.append(
                f"| (b) log-probs | {case} | {r['ms']:.2f} ms | {r['gbps']:.0f} GB/s | {r['frac']:.0%} | "
                f"{mem} | max abs diff vs naive {r['diff_vs_naive']:.1e} |"
            )
    if dpo is None:
        out.append("| (c) DPO steps | | | | | | no result (timed out or crashed; see the log) |")
    elif "skipped" in dpo:
        out.append(f"| (c) DPO steps | | | | | | SKIPPED: {dpo['skipped']} |")
    else:
        runs = dpo.get("runs") or {dpo.get("layout") or "packed": dpo}
        for layout, run in runs.items():
            if "tokens_per_s" not in run:
                out.append(
                    f"| (c) DPO steps, {layout} | | | | | | {run.get('status', 'no result')} (no step finished) |"
                )
                continue
            case = (
                f"{dpo['n_params'] / 1e9:.2f}B Llama, ZeRO-{run['zero']} {run['dtype']} policy+ref, "
                f"{run['batch_pairs']} pairs/step, {layout}, {run['logprob_impl']}"
            )
            mfu = (
                "-"
                if run.get("mfu") is None
                else f"MFU {run['mfu']:.1%} ({run['mfu_with_ref']:.1%} incl. ref)"
            )
            losses = ", ".join(f"{x:.4f}" for x in run["first_losses"])
            out.append(
                f"| (c) DPO steps | {case} | {run['step_s']:.2f} s/step | {run['tokens_per_s']:,.0f} real tok/s "
                f"| {mfu} | {run['peak_gib']:.1f} GiB | {run['status']}; {run['timed_steps']} timed steps, "
                f"padding {run['padding']:.1%}, losses {losses} |"
            )
        if "shared_prompt" in runs and "packed" in runs and runs["packed"].get("tokens_per_s"):
            ratio = runs["shared_prompt"].get("tokens_per_s", 0) / runs["packed"]["tokens_per_s"]
            attn = "FlexAttention" if env.get("cuda", True) else "dpo_ds_blocks (CPU's auto)"
            out.append(f"| (c) shared_prompt / packed | | | {ratio:.2f}x real tok/s | | | {attn} |")
    out.extend(moe.report_rows(moe_res))
    out.extend(_memory_rows(memory))
    out.extend(_long_rows(long))
    bad = _problems(res, kern, dpo, memory, long, moe_res)
    out.append("")
    if bad:
        out.append(f"{len(bad)} stage problem(s) (failed, skipped, timed out or no result):")
        out.extend(f"- {b}" for b in bad)
    else:
        out.append("every stage ran and left its figures")
    if args.cpu_smoke:
        out.append("\n" + SMOKE_BANNER)
    text = "\n".join(out)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    return 1 if args.cpu_smoke and bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out", required=True)
    p = sub.add_parser("kernels")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=0, help="rows of logits (default 16384 on GPU)")
    p.add_argument("--vocabs", type=int, nargs="+", help="default 32000 128256 on GPU")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cpu-smoke", action="store_true")
    p = sub.add_parser("dpo")
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=220, help="stop the run after this many seconds")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--prompt-median", type=float, default=192)
    p.add_argument("--response-median", type=float, default=256)
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=0)
    p.add_argument(
        "--layouts",
        default="shared_prompt,packed,padded",
        help="data.layout of each run in turn, the stage's budget split between them",
    )
    p.add_argument(
        "--logprob-impl",
        choices=("naive", "chunked", "triton"),
        default=None,
        help="default triton on GPU (and on CPU under TRITON_INTERPRET=1), else chunked",
    )
    p.add_argument(
        "--moe",
        action="store_true",
        help="(g): a ~1B-total Qwen3-MoE (bench/_gpu_check_moe.py) instead of the Llama, MFU on active parameters",
    )
    p.add_argument(
        "--keys",
        nargs="*",
        default=[],
        help="more dpo_ds config overrides for every run (stage (g): model.reference_sync_steps=2, TR-DPO)",
    )
    p.add_argument("--cpu-smoke", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    p.add_argument("--md", default=None)
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="say the figures are CPU smoke figures; exit 1 if any stage failed, was skipped or left no result",
    )
    args = ap.parse_args()
    rc = {"env": cmd_env, "kernels": cmd_kernels, "dpo": cmd_dpo, "report": cmd_report}[args.cmd](args)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
