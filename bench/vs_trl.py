"""dpo_ds against TRL's DPOTrainer: same model, data, batch, beta and optimizer, one after the other.

    pip install trl==1.16.0          # bench-only extra (bench/requirements-trl.txt); installs nothing else
                                     # next to torch 2.13 / transformers 5.24 (checked with pip --dry-run)
    python bench/vs_trl.py           # CPU defaults: ~4M-param Llama, 8 steps of 16 pairs, 2 rounds: ~4 min
                                     # on 2 idle cores, up to ~10 when other work shares them
    python bench/vs_trl.py --hidden 512 --layers 8 --steps 20 --batch-size 32
    python bench/vs_trl.py --moe --threads 1 --steps 6 --skip 2   # Qwen3-MoE, router loss on: ~4 min

What is compared
- Model: a random Llama (default hidden 256, 4 layers, ~4M parameters) with dpo_ds's character-level
  tokenizer (dpo_ds/demo/model, vocab 100: one character = one token), saved with save_pretrained to a
  temporary HF directory. Both frameworks load those same safetensors weights into the policy and
  into the reference, so the first DPO loss of both must be ln 2 = 0.6931.
- Data: synthetic flat preference rows (prompt, chosen, rejected) with log-normal prompt and response
  lengths (seeded), sized so that BOS + prompt + the longer response + EOS fits max_length: neither
  framework truncates anything. dpo_ds reads them as train.jsonl/test.jsonl, TRL as a datasets.Dataset.
- Training: one process (world 1) on CPU, 2 torch threads, fp32, global batch --batch-size pairs,
  sigmoid DPO loss with beta 0.1, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), constant lr,
  no warmup, gradient clipping 10, no gradient checkpointing, reference log-probs computed on the fly.
  Each framework runs in its own subprocess so that peak memory (peak RSS, getrusage) is its own.
- dpo_ds runs `dpo_ds/train.py --ds ds_configs/zero2.json` (ZeRO-2: at world 1 ZeRO-3 only adds
  gather/release hooks around every module, which is overhead and nothing else on one process) with
  its fast path (data.packing=true, model.logprob_impl=chunked) and, for reference, its padded path.
- TRL runs DPOTrainer (DataCollatorForPreference pads each micro-batch to its longest sequence;
  padding_free is left at its default, off; its log-probs come from TRL's own fused, chunked LM head).
  DPOConfig's own defaults gradient_checkpointing=True and bf16=True are turned off to match dpo_ds.

--moe swaps the Llama for a random Qwen3-MoE of the same shape and parameter count: 8 experts, top-2, each
expert's MLP an eighth of the dense MLP's width (a quarter of its MLP compute per token), router weights
drawn wide enough that routing is far from uniform. The router's load-balancing loss is on in both with the
config's own router_aux_loss_coef (0.001; TRL's router_aux_loss_coef=None and dpo_ds's
loss.router_aux_coef=null both resolve to it). TRL's logged loss holds coef x aux_loss, dpo_ds's loss/train
does not (it logs aux_loss/train beside it): the table's first losses are the DPO losses (TRL's logged loss
minus coef x aux_loss), and a first-step table checks that each run used the config's coefficient, logged
an aux loss, and started at DPO loss ln 2 to 1e-5. Their aux losses are not compared (the two draw batches
in different orders); bench/moe_parity.py compares losses and aux losses step by step on the same batch.
Target: dpo_ds's best layout >= 1.5x TRL's real tokens/s.

Real tokens/s = non-pad tokens that went through the policy (prompt + chosen and prompt + rejected,
the prompt counted in both sequences, as both frameworks feed it twice) / step time, summed over the
steps after the first --skip ones. dpo_ds reports it per step in metrics.jsonl; for TRL a counting
collator records the non-pad tokens of each micro-batch and a TrainerCallback times each optimizer
step from on_step_begin to on_step_end (batch collation excluded, as in dpo_ds's step time).
Both frameworks put the tokenizer's own BOS in front of a prompt (TRL 1.16's tokenizer(text), dpo_ds's
data.add_bos=auto: <s> with the char tokenizer, nothing with the ChatML BPE), so both process the same
tokens (bench/lora_parity.py checks that their losses agree to 1e-7).

The three runs take turns for --rounds rounds (order reversed every other round) and each is reported by
its best round: other work on a shared machine only ever slows a run down. Every round's number is
printed too, with the CPU share that other processes took meanwhile ("others' CPU", from /proc/stat);
a best round above 10% is flagged as untrustworthy.

Prints one markdown table and the target line: dpo_ds's best layout (packed, shared_prompt, padded)
against TRL, real tokens/s: >= 2.25x on the short set, >= 1.6x with --data chat (chat-length rows in a
BPE tokenizer). Real tokens count a shared prompt as often as the frameworks that run it twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dpo_ds.demo.make_assets import llama_config  # noqa: E402
from dpo_ds.dist.launcher import free_port  # noqa: E402

TOKENIZER_DIR = REPO / "dpo_ds" / "demo" / "model"
WORDS = "abcdefghijklmnopqrstuvwxyz"
# dpo_ds's best layout against TRL, real tokens/s: on the short char-level set, and on chat-length rows
TARGETS = {"short": 2.25, "chat": 1.6}
LORA_TARGET = 1.8  # --lora: LoRA DPO on the chat-length set, the same adapters in both frameworks
MOE_TARGET = 1.5  # --moe: a Qwen3-MoE with its router loss on in both frameworks
MOE_EXPERTS, MOE_TOP_K = 8, 2
FIRST_LOSS_TOL = 1e-5  # --moe: the first step's DPO loss is ln 2 in both, to this (fp32)
BUSY_WARN = 0.10
CHAT_DEFAULTS = {  # --data chat: an ~11M Llama, 1024-token BPE, ~730 processed tokens per pair
    "hidden": 384, "layers": 6, "max_length": 512, "max_prompt_length": 256,
    "prompt_median": 110, "response_median": 230, "sigma": 0.5, "steps": 6,
}  # fmt: skip  # others' share of the CPU above which a run's timing is flagged


# ----------------------------------------------------------------------------- shared setup


def write_model(model_dir: Path, args) -> int:
    """Random Llama + the dpo_ds char tokenizer in a HF directory; returns the parameter count."""
    base = json.loads((TOKENIZER_DIR / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, model_dir / name)
    return (save_random_moe if args.moe else save_random_llama)(
        model_dir,
        args,
        vocab=base["vocab_size"],
        bos=base["bos_token_id"],
        eos=base["eos_token_id"],
        pad=base["pad_token_id"],
    )


def save_random_llama(model_dir: Path, args, *, vocab: int, bos: int, eos: int, pad: int) -> int:
    """A Llama of the bench's shape (args), seeded weights, saved as safetensors; returns the parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(
        vocab=vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.hidden // args.head_dim,
        head_dim=args.head_dim,
        intermediate=args.intermediate or 4 * args.hidden,
        max_positions=max(1024, args.max_length),
        bos=bos,
        eos=eos,
        pad=pad,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def save_random_moe(model_dir: Path, args, *, vocab: int, bos: int, eos: int, pad: int) -> int:
    """--moe: a Qwen3-MoE of the bench's shape (args) with MOE_EXPERTS experts, top-MOE_TOP_K, each expert's
    MLP 1/MOE_EXPERTS of the dense MLP's width (the same parameter count as save_random_llama's model, a
    quarter of its MLP compute per token at top-2); seeded weights, the router's drawn wider than its init
    (logits of std ~1.6 on the normalised hidden state: routing far from uniform), its config's own
    router_aux_loss_coef (0.001), saved as safetensors; returns the parameter count."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    heads = args.hidden // args.head_dim
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=args.head_dim, intermediate_size=args.intermediate or 4 * args.hidden,
        moe_intermediate_size=(args.intermediate or 4 * args.hidden) // MOE_EXPERTS, num_experts=MOE_EXPERTS,
        num_experts_per_tok=MOE_TOP_K, norm_topk_prob=True, output_router_logits=False,
        max_position_embeddings=max(1024, args.max_length), rms_norm_eps=1e-6, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.6 / math.sqrt(args.hidden))  # (experts, hidden)
    model.save_pretrained(model_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def lognormal_len(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(median), sigma)))


def text_of(rng: random.Random, n: int) -> str:
    """n characters of lowercase 'words' separated by spaces (each character is one token)."""
    out = []
    while len(out) < n:
        out.extend(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        out.append(" ")
    return "".join(out[:n])


def make_rows(n: int, args, seed: int) -> list[dict]:
    """Flat preference rows; lengths in tokens (characters) capped so nothing needs truncating:
    BOS + prompt <= max_prompt_length and BOS + prompt + response + EOS <= max_length."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tag = f"q{i} "  # unique prompts: dpo_ds groups flat rows that share a prompt
        p = min(lognormal_len(rng, args.prompt_median, args.sigma), args.max_prompt_length - 1 - len(tag))
        room = args.max_length - 2 - len(tag) - p
        c = min(lognormal_len(rng, args.response_median, args.sigma), room)
        r = min(lognormal_len(rng, args.response_median, args.sigma), room)
        rows.append({"prompt": tag + text_of(rng, p), "chosen": text_of(rng, c), "rejected": text_of(rng, r)})
    return rows


def write_chat_model(model_dir: Path, args) -> int:
    """The chat-length set's model: a random Llama around a 1024-token byte-level BPE (ChatML's, built
    offline by dpo_ds.demo.tokenizers from Python's own documentation); returns the parameter count."""
    from transformers import AutoTokenizer

    from dpo_ds.demo.tokenizers import build_tokenizer

    build_tokenizer("chatml", model_dir, vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return (save_random_moe if args.moe else save_random_llama)(
        model_dir, args, vocab=len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id
    )


def make_chat_rows(n: int, args, seed: int, model_dir: Path) -> list[dict]:
    """Flat rows of real English text (Python's documentation) whose lengths in BPE tokens are
    log-normal; capped so that nothing needs truncating in either framework (prompt <=
    max_prompt_length, prompt + response + EOS <= max_length)."""
    import pydoc_data.topics

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = tok(" ".join(pydoc_data.topics.topics.values()), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def window(k: int) -> str:
        start = rng.randrange(len(corpus) - k)
        text = tok.decode(corpus[start : start + k])
        ids = tok(text, add_special_tokens=False)["input_ids"][:k]  # decode + encode can drift by a token
        return tok.decode(ids)

    rows = []
    for i in range(n):
        p = min(lognormal_len(rng, args.prompt_median, args.sigma), args.max_prompt_length - 8)
        room = args.max_length - p - 8
        c = min(lognormal_len(rng, args.response_median, args.sigma), room)
        r = min(lognormal_len(rng, args.response_median, args.sigma), room)
        rows.append({"prompt": f"q{i} " + window(p), "chosen": window(c), "rejected": window(r)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    return env


class OthersCPU:
    """CPU time that processes other than this bench's children used while a run went on, as a fraction of
    the machine (from /proc/stat's busy time minus the waited-for children's own CPU time). Near 0 means
    the run had the cores to itself; on a shared machine it says which timings to distrust."""

    def __enter__(self):
        self.t0, self.busy0, self.kids0 = time.time(), self._busy(), self._kids()
        return self

    def __exit__(self, *exc):
        wall = time.time() - self.t0
        busy0 = self.busy0
        busy1 = self._busy()
        others = None if busy0 is None or busy1 is None else (busy1 - busy0) - (self._kids() - self.kids0)
        self.fraction = None if others is None else max(others, 0.0) / (wall * (os.cpu_count() or 1))
        return False

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _kids() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime


def throughput(tokens: list[float], seconds: list[float], skip: int) -> float:
    t, s = sum(tokens[skip:]), sum(seconds[skip:])
    return t / s if s > 0 else float("nan")


# ----------------------------------------------------------------------------- dpo_ds


def run_dpo_ds(name: str, work: Path, model_dir: Path, data_dir: Path, args, layout: str) -> dict:
    run_dir = work / name  # one per run: dpo_ds refuses a run_dir that already holds a run
    overrides = [
        "loss=dpo",
        f"loss.beta={args.beta}",
        f"model.name_or_path={model_dir}",
        f"datasets=[{data_dir}]",
        f"batch_size={args.batch_size}",
        f"gradient_accumulation_steps={args.grad_accum}",
        f"lr={args.lr}",
        "warmup_steps=0",
        "max_grad_norm=10.0",
        f"max_length={args.max_length}",
        f"max_prompt_length={args.max_prompt_length}",
        "n_epochs=null",
        f"n_examples={args.steps * args.batch_size}",
        "do_first_eval=false",
        "n_eval_examples=0",
        "eval_every=1000000000",
        f"torch_threads={args.threads}",
        "log_every=1",
        f"seed={args.seed}",
        f"exp_name={name}",
        f"run_dir={run_dir}",
        f"data.cache_dir={work / 'hf_cache'}",
        f"model.logprob_impl={args.logprob_impl}",
        f"data.layout={layout}",
    ]
    if args.lora:  # the reference: the base with the adapters off (model.reference_mode's LoRA default)
        overrides += [f"model.lora.r={args.lora}", f"model.lora.alpha={2 * args.lora}"]
    if layout != "padded" and args.max_tokens_per_micro_batch:
        overrides.append(f"data.max_tokens_per_micro_batch={args.max_tokens_per_micro_batch}")
    if layout != "padded" and args.row_tokens:
        overrides.append(f"data.row_tokens={args.row_tokens}")
    env = child_env(args.threads)
    env.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    cmd = [sys.executable, str(REPO / "dpo_ds" / "train.py"), "--ds", str(REPO / args.ds), *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} failed (exit {proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/train" in rec:
            steps.append(rec)
    seconds = [r["throughput/step_seconds"] for r in steps]
    tokens = [r["throughput/real_tokens_per_second"] * r["throughput/step_seconds"] for r in steps]
    if args.moe:  # the coefficient dpo_ds resolved, as its launch log says it (loss.router_aux_coef=null)
        coef = json.loads((model_dir / "config.json").read_text())["router_aux_loss_coef"]
        said = f"coefficient {coef:g} (the model config's own)" in proc.stdout + proc.stderr
    return {
        "tokens_per_s": throughput(tokens, seconds, args.skip),
        "peak_gib": max(r["memory/peak_gib"] for r in steps),
        "losses": [r["loss/train"] for r in steps],
        "aux": [r.get("aux_loss/train") for r in steps],  # --moe: the router loss (not inside loss/train)
        "padding": sum(r["throughput/padding_fraction"] for r in steps[args.skip :])
        / max(len(steps) - args.skip, 1),
        "step_s": sum(seconds[args.skip :]) / max(len(seconds) - args.skip, 1),
        "step_seconds": seconds,
        "steps": len(steps),
        "wall_s": wall,
        **({"coef": coef if said else None} if args.moe else {}),
    }


# ----------------------------------------------------------------------------- TRL


def run_trl(name: str, work: Path, model_dir: Path, data_dir: Path, args) -> dict:
    """TRL in its own process: its peak RSS is then its own."""
    spec = work / f"{name}_spec.json"
    out = work / f"{name}_result.json"
    spec.write_text(json.dumps({"model_dir": str(model_dir), "data_dir": str(data_dir), **vars(args)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec), "--trl-out", str(out)]
    t0 = time.time()
    proc = subprocess.run(
        cmd, cwd=work, env=child_env(args.threads), capture_output=True, text=True, timeout=args.timeout
    )
    wall = time.time() - t0
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"TRL failed (exit {proc.returncode}); log tail:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    res = json.loads(out.read_text())
    res["wall_s"] = wall
    return res


def trl_worker(spec_path: str, out_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    disable_progress_bars()
    rows = [json.loads(line) for line in (Path(spec["data_dir"]) / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])

    class CountingCollator:
        """TRL's own collator; records (non-pad tokens, row slots) of every micro-batch it builds."""

        def __init__(self, inner):
            self.inner = inner
            self.counts: list[tuple[int, int]] = []

        def __call__(self, examples):
            out = self.inner(examples)
            mask = out["attention_mask"]  # (2 * pairs, T): chosen rows then rejected rows
            self.counts.append((int(mask.sum()), mask.numel()))
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self.aux: list[float] = []
            self._t0 = 0.0
            self.threads = 0

        def on_step_begin(self, args, state, control, **kw):
            self.threads = (
                torch.get_num_threads()
            )  # what the step really runs with (accelerate may change it)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                if "aux_loss" in logs:  # an MoE's router loss: TRL's loss has coef x aux_loss inside
                    self.aux.append(float(logs["aux_loss"]))

    micro = spec["batch_size"] // spec["grad_accum"]
    config = DPOConfig(
        output_dir=str(Path(out_path).parent / "trl_out"),
        use_cpu=True,
        bf16=False,  # DPOConfig defaults bf16 to True: keep fp32 like dpo_ds
        fp16=False,
        gradient_checkpointing=False,  # DPOConfig defaults it to True; dpo_ds runs without
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,  # as ds_configs/*.json
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=10.0,
        beta=spec["beta"],
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=False,
        model_init_kwargs={"dtype": torch.float32},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=spec["seed"],
    )
    collator = CountingCollator(
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=spec["max_length"])
    )
    timer = StepTimer()
    peft_config = None
    if spec["lora"]:  # the same adapters as dpo_ds's model.lora.*: rank r, alpha 2r, every linear layer
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=spec["lora"], lora_alpha=2 * spec["lora"], lora_dropout=0.0, target_modules="all-linear",
            bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
    trainer = DPOTrainer(
        model=spec["model_dir"],  # policy and (ref_model=None) reference both load these weights
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[timer],
        peft_config=peft_config,  # LoRA: the reference is the base with the adapters off, as dpo_ds's
    )
    trainer.train()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    gas = spec["grad_accum"]
    n = len(timer.seconds)
    # the dataloader can run one micro-batch ahead: step k consumed micro-batches [k*gas, (k+1)*gas)
    counts = collator.counts[: n * gas]
    real = [sum(c[0] for c in counts[k * gas : (k + 1) * gas]) for k in range(n)]
    slots = [sum(c[1] for c in counts[k * gas : (k + 1) * gas]) for k in range(n)]
    skip = spec["skip"]
    result = {
        "tokens_per_s": throughput(real, timer.seconds, skip),
        "peak_gib": peak_gib,
        "losses": timer.losses,
        "padding": 1 - sum(real[skip:]) / max(sum(slots[skip:]), 1),
        "step_s": sum(timer.seconds[skip:]) / max(n - skip, 1),
        "step_seconds": timer.seconds,
        "steps": n,
        "threads": timer.threads,
    }
    if spec["moe"]:  # losses: the DPO loss alone, as dpo_ds logs it; the logged ones (with coef x aux) kept
        coef = trainer.router_aux_loss_coef if trainer.aux_loss_enabled else None
        result.update(
            logged_losses=timer.losses,
            aux=timer.aux,
            coef=coef,
            losses=[x - (coef or 0.0) * a for x, a in zip(timer.losses, timer.aux)],
        )
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- main


def versions() -> str:
    import importlib.metadata as md

    parts = []
    for pkg in ("torch", "transformers", "deepspeed", "trl", "datasets", "accelerate"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def fmt_row(name: str, r: dict | None, rounds: list[float], note: str = "") -> str:
    if r is None:
        return f"| {name} | - | - | - | - | - | - | - | {note} |"
    losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
    per_round = " / ".join(f"{x:,.0f}" for x in rounds)
    return (
        f"| {name} | {r['tokens_per_s']:,.0f} | {per_round} | {r['peak_gib']:.2f} GiB | {losses} | "
        f"{r['step_s']:.2f} | {r['padding']:.1%} | {pct(r.get('others_cpu'))} | {note} |"
    )


def first_step_check(results: dict, model_dir: Path) -> bool:
    """--moe: the first step's losses of every run. TRL logs loss = DPO + coef x aux_loss, dpo_ds loss/train =
    DPO and aux_loss/train apart; each must have resolved the config's coefficient and logged an aux loss, and
    its first DPO loss (TRL: logged loss - coef x aux_loss) must be ln 2 to FIRST_LOSS_TOL (policy = reference).
    The aux losses are printed, not compared: the frameworks draw their batches in different orders, so their
    first steps route different pairs (bench/moe_parity.py compares them on the same batch, to 1e-5)."""
    coef = json.loads((model_dir / "config.json").read_text())["router_aux_loss_coef"]
    ln2 = math.log(2)
    print(
        f"\nfirst step, router loss on (config router_aux_loss_coef {coef:g}): TRL's loss holds coef x aux_loss, "
        "dpo_ds's loss/train does not; the DPO loss (TRL: loss - coef x aux_loss) must be ln 2 in both to "
        f"{FIRST_LOSS_TOL:g}; the first 3 losses above are these DPO losses\n"
    )
    print(
        "| framework | step-1 loss as logged | step-1 aux_loss | coefficient used | step-1 DPO loss | DPO - ln 2 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    ok = True
    for name, r in results.items():
        if r is None:
            continue
        logged = (r.get("logged_losses") or r["losses"] or [math.nan])[0]
        aux = (r.get("aux") or [None])[0]
        dpo = (r["losses"] or [math.nan])[0]
        good = r.get("coef") == coef and aux is not None and aux > 0 and abs(dpo - ln2) <= FIRST_LOSS_TOL
        ok = ok and good
        aux_s = "-" if aux is None else f"{aux:.6f}"
        print(
            f"| {name} | {logged:.7f} | {aux_s} | {r.get('coef')} | {dpo:.7f} | {dpo - ln2:+.1e} "
            f"{'' if good else '(MISS)'}|"
        )
    print(f"\nfirst-step check (DPO loss = ln 2 to {FIRST_LOSS_TOL:g}, coefficient {coef:g}, aux logged): "
          f"{'PASS' if ok else 'MISS'}")  # fmt: skip
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=0, help="MLP width (default 4 x hidden)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per framework and round")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s (warm-up)")
    ap.add_argument("--batch-size", type=int, default=16, help="global preference pairs per step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument(
        "--prompt-median", type=float, default=48, help="log-normal median prompt length (tokens)"
    )
    ap.add_argument("--response-median", type=float, default=64, help="log-normal median response length")
    ap.add_argument("--sigma", type=float, default=0.6, help="log-normal sigma of all lengths")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each framework's process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ds", default="ds_configs/zero2.json", help="dpo_ds DeepSpeed JSON (relative to the repo)"
    )
    ap.add_argument(
        "--logprob-impl", default="chunked", choices=("naive", "chunked", "triton", "fused_linear")
    )
    ap.add_argument(
        "--data",
        default="short",
        choices=("short", "chat"),
        help="short: char-level rows (~250 processed tokens per pair); chat: real text in a 1024-token BPE, "
        "~730 processed tokens per pair, max_length 512, an ~11M Llama (the lengths of chat data)",
    )
    ap.add_argument(
        "--row-tokens", type=int, default=0, help="dpo_ds packed rows' length (0: the layout's default)"
    )
    ap.add_argument("--no-shared", action="store_true", help="skip the dpo_ds shared_prompt row")
    ap.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=0,
        help="dpo_ds packed path's token budget per micro-batch (0: grad-accum micro-batches)",
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="runs of each framework, taking turns; best is reported"
    )
    ap.add_argument("--no-padded", action="store_true", help="skip the dpo_ds padded-path row")
    ap.add_argument(
        "--lora", type=int, nargs="?", const=16, default=0,
        help="LoRA DPO in both frameworks with rank R (default 16), alpha 2R, every linear layer; target 1.8x on --data chat",
    )  # fmt: skip
    ap.add_argument(
        "--moe", action="store_true",
        help=f"a random Qwen3-MoE ({MOE_EXPERTS} experts, top-{MOE_TOP_K}, the same parameter count) instead of the "
        f"Llama, its router loss on in both (the config's router_aux_loss_coef); target {MOE_TARGET}x",
    )  # fmt: skip
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (no target line then)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed for each framework's run")
    ap.add_argument("--workdir", default=None, help="keep model, data and logs here (default: a temp dir)")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    ap.add_argument("--trl-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.trl_worker:
        trl_worker(args.trl_worker, args.trl_out)
        return 0
    if args.data == "chat":  # the chat-length set's defaults, unless given
        for key, value in CHAT_DEFAULTS.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    if args.batch_size % args.grad_accum:
        ap.error("--batch-size must be divisible by --grad-accum")
    if args.skip >= args.steps:
        ap.error("--skip must be less than --steps")
    if args.max_prompt_length >= args.max_length:
        ap.error("--max-prompt-length must be less than --max-length")
    if args.moe and args.lora:
        ap.error("--moe and --lora together are not measured: LoRA on fused experts differs between the two")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dpo_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = work / "model", work / "data"
    model_dir.mkdir(exist_ok=True)
    data_dir.mkdir(exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    if args.data == "chat":
        n_params = write_chat_model(model_dir, args)
        rows = make_chat_rows(args.steps * args.batch_size, args, args.seed, model_dir)
        test_rows = make_chat_rows(args.batch_size, args, args.seed + 1, model_dir)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))

        def n_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        tokenizer_desc = "byte-level BPE (vocab 1024)"
    else:
        n_params = write_model(model_dir, args)
        rows = make_rows(args.steps * args.batch_size, args, args.seed)
        test_rows = make_rows(args.batch_size, args, args.seed + 1)
        n_tokens = len
        tokenizer_desc = "char tokenizer (vocab 100)"
    write_jsonl(data_dir / "train.jsonl", rows)
    write_jsonl(data_dir / "test.jsonl", test_rows)
    pair_tokens = [
        2 * n_tokens(r["prompt"]) + n_tokens(r["chosen"]) + n_tokens(r["rejected"]) + 2 for r in rows
    ]
    prompt_share = sum(2 * n_tokens(r["prompt"]) for r in rows) / sum(pair_tokens)

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, no GPU used; python {platform.python_version()}"
    )
    print(f"versions: {versions()}")
    if args.moe:
        coef = json.loads((model_dir / "config.json").read_text())["router_aux_loss_coef"]
        print(
            f"model: random Qwen3-MoE, hidden {args.hidden}, {args.layers} layers, {MOE_EXPERTS} experts top-"
            f"{MOE_TOP_K} (expert MLP width {(args.intermediate or 4 * args.hidden) // MOE_EXPERTS}), "
            f"{n_params / 1e6:.2f}M parameters, {tokenizer_desc}; policy and reference load the same safetensors, "
            f"fp32; router loss on in both: router_aux_loss_coef {coef:g} (the config's own: TRL "
            "router_aux_loss_coef=None, dpo_ds loss.router_aux_coef=null)"
        )
    else:
        print(
            f"model: random Llama, hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.2f}M parameters, "
            f"{tokenizer_desc}; policy and reference load the same safetensors, fp32"
            + (
                f"; LoRA r={args.lora}, alpha {2 * args.lora}, every linear layer but the lm_head, in both"
                if args.lora
                else ""
            )
        )
    print(
        f"data: {len(rows)} synthetic pairs, log-normal lengths (median prompt {args.prompt_median:g}, "
        f"response {args.response_median:g}, sigma {args.sigma}), mean {sum(pair_tokens) / len(rows):.0f} "
        f"processed tokens per pair (prompt counted twice; {prompt_share:.0%} of them prompt), "
        f"max_length {args.max_length}"
    )
    print(
        f"training: batch {args.batch_size} pairs x {args.steps} steps (grad accum {args.grad_accum}), "
        f"beta {args.beta}, AdamW lr {args.lr:g} constant, warmup 0, {args.threads} torch threads per process; "
        f"tokens/s over steps {args.skip + 1}..{args.steps}"
    )
    print(
        f"dpo_ds: single process (world 1), --ds {args.ds}, logprob_impl {args.logprob_impl}; work dir {work}\n",
        flush=True,
    )

    # The runs take turns, round after round (reversed order every other round), and each framework is
    # reported by its best round: on a shared machine other work slows some runs down, never speeds one up.
    runs = (
        []
        if args.no_trl
        else [("TRL DPOTrainer", lambda k: run_trl(f"trl_r{k}", work, model_dir, data_dir, args))]
    )
    layouts = (
        ["packed"] + ([] if args.no_shared else ["shared_prompt"]) + ([] if args.no_padded else ["padded"])
    )
    for layout in layouts:
        runs.append(
            (
                f"dpo_ds {layout}",
                lambda k, layout=layout: run_dpo_ds(
                    f"dpo_ds_{layout}_r{k}", work, model_dir, data_dir, args, layout
                ),
            )
        )
    per_round: dict[str, list[dict]] = {name: [] for name, _ in runs}
    errors: dict[str, str] = {}
    for k in range(args.rounds):
        for name, fn in runs if k % 2 == 0 else runs[::-1]:
            if name in errors:
                continue
            load = os.getloadavg()[0]
            print(
                f"round {k + 1}/{args.rounds}: {name} (1-min load average before: {load:.1f}) ...", flush=True
            )
            try:
                with OthersCPU() as others:
                    r = fn(k + 1)
                r["others_cpu"] = others.fraction
                per_round[name].append(r)
                print(
                    f"  {r['tokens_per_s']:,.0f} real tokens/s, {r['step_s']:.2f} s/step; "
                    f"{r['wall_s']:.0f} s from process start to exit; other processes used "
                    f"{pct(r['others_cpu'])} of the machine's CPU meanwhile",
                    flush=True,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors[name] = (str(e).splitlines() or ["failed"])[0]
                print(f"  FAILED: {e}", flush=True)
    results = {
        name: max(rs, key=lambda r: r["tokens_per_s"]) if rs else None for name, rs in per_round.items()
    }

    trl = results.get("TRL DPOTrainer")
    print(
        "\n| framework | real tokens/s (best round) | each round | peak memory (RSS) | first 3 losses | s/step "
        "| padding | others' CPU | vs TRL |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for name, r in results.items():
        note = errors.get(name, "")
        if r is not None and trl is not None and name != "TRL DPOTrainer":
            note = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x"
        print(fmt_row(name, r, [x["tokens_per_s"] for x in per_round[name]], note))

    busy = [n for n, r in results.items() if r is not None and (r.get("others_cpu") or 0) > BUSY_WARN]
    if busy:
        print(
            f"\nwarning: other processes used over {BUSY_WARN:.0%} of the CPU during the best round of "
            f"{', '.join(busy)}: those timings are slowed by work outside this bench; rerun on an idle machine"
        )
    ln2 = math.log(2)
    for name, r in results.items():
        if r is not None and r["losses"] and abs(r["losses"][0] - ln2) > 1e-3:
            print(f"\nwarning: {name}'s first loss {r['losses'][0]:.4f} is not ln 2 = {ln2:.4f}")
    first_ok = first_step_check(results, model_dir) if args.moe else True
    target = MOE_TARGET if args.moe else LORA_TARGET if args.lora else TARGETS[args.data]
    ours = {n: r for n, r in results.items() if n.startswith("dpo_ds") and r is not None}
    if trl is not None and ours:
        best = max(ours, key=lambda n: ours[n]["tokens_per_s"])
        ratio = ours[best]["tokens_per_s"] / trl["tokens_per_s"]
        verdict = "PASS" if ratio >= target else "MISS"
        print(
            f"\ntarget ({args.data} set{', LoRA r=' + str(args.lora) if args.lora else ''}{', MoE' if args.moe else ''}): dpo_ds (best layout) "
            f">= {target}x TRL real tokens/s: {verdict} "
            f"({ratio:.2f}x, {best}: {ours[best]['tokens_per_s']:,.0f} vs {trl['tokens_per_s']:,.0f} tokens/s, best rounds)"
        )
    else:
        print(
            f"\ntarget ({args.data} set): dpo_ds >= {target}x TRL: not measured (a run failed or was skipped)"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not errors and first_ok else 1


if __name__ == "__main__":
    sys.exit(main())
