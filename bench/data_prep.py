"""The data phase at real size: dpo_ds's token cache against TRL 1.16's DPOTrainer._prepare_dataset.

    pip install -r bench/requirements-trl.txt     # trl==1.16.0
    python bench/data_prep.py                     # 20,000 rows: ~8 min on a 2-core CPU
    python bench/data_prep.py --rows 2000         # a quick look
    python bench/data_prep.py --quick             # smoke: 200 rows, a 1000-entry BPE; targets printed, not enforced

Built here, nothing downloaded:
- a ChatML byte-level BPE with a real vocabulary (32,000 entries) trained on the text every Python has
  (its documentation topics and its standard library's sources), around a model directory (config.json,
  no weights: the data phase reads only the tokenizer);
- an UltraFeedback-binarized-shaped parquet (HuggingFaceH4/ultrafeedback_binarized's columns: prompt,
  prompt_id, chosen and rejected as whole conversations, messages, score_chosen, score_rejected) with
  its real lengths: prompts of 40-200 words, answers of 50-350, windows of English text.

Then, one after the other, each in its own processes (peak memory is its own):
  TRL          load the parquet with `datasets`, turn the rows into TRL's conversational shape (prompt,
               chosen, rejected as message lists), and DPOTrainer._prepare_dataset (apply_chat_template
               and tokenize, one process: dataset_num_proc=None); max_length 1024
  dpo_ds x1    `deepspeed --num_gpus 1 --module dpo_ds.cli.prepare`: the data phase of train.py alone
               (read ultrafeedback:DIR, tokenize and check every row, write the token cache, map it)
  dpo_ds x2    the same with 2 ranks: each tokenizes half, the cache is one
  relaunch     the 2-rank command again: the cache is found by its fingerprint and mapped
max_length 1024, max_prompt_length 512 for dpo_ds. Per rank: wall and CPU seconds of the data phase
(a rank reads and tokenizes its share in a forked worker: its CPU counts), peak RSS (the worker's in
brackets: it exits once its shard is written), and the private memory the data phase left the rank
(RssAnon) per token held, beside the mapped pages (RssFile: the page cache, shared by the node's ranks).

Targets: dpo_ds's first launch at 2 ranks <= 0.5x TRL's wall time; relaunch <= 0.05x the first;
<= 8 bytes per token held per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dpo_ds.dist.launcher import deepspeed_cmd, env  # noqa: E402


def corpus() -> list[str]:
    """English-ish text every Python installation has: pydoc topics and the stdlib's sources."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    stdlib = Path(os.__file__).parent
    for f in sorted(stdlib.glob("*.py")):
        try:
            texts.append(f.read_text(errors="ignore"))
        except OSError:
            pass
    return texts


def words() -> list[str]:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    return re.findall(r"[A-Za-z][A-Za-z'\-]*[.,;:?!]?", text)


def make_model(out: Path, vocab: int) -> None:
    from transformers import AutoTokenizer

    from dpo_ds.demo.make_assets import llama_config
    from dpo_ds.demo.tokenizers import build_tokenizer

    build_tokenizer("chatml", out, vocab_size=vocab, corpus=corpus())
    tok = AutoTokenizer.from_pretrained(str(out))
    llama_config(vocab=len(tok), hidden=64, layers=2, heads=4, intermediate=128, max_positions=4096,
                 bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id).save_pretrained(str(out))  # fmt: skip


def make_data(out: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    vocab = words()

    def text(lo: int, hi: int) -> str:
        k = rng.randint(lo, hi)
        at = rng.randrange(0, len(vocab) - k)
        body = " ".join(vocab[at : at + k])
        return body[0].upper() + body[1:]

    rows = []
    for i in range(n):
        prompt = text(40, 200)
        good, bad = text(50, 350), text(50, 350)
        user = {"role": "user", "content": prompt}
        rows.append({
            "prompt": prompt, "prompt_id": f"{i:08x}",
            "chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}],
            "messages": [user, {"role": "assistant", "content": good}],
            "score_chosen": 8.0, "score_rejected": 4.0,
        })  # fmt: skip
    (out / "data").mkdir(parents=True)
    for split, part in (("train_prefs", rows), ("test_prefs", rows[: max(1, n // 50)])):
        table = pa.table({k: [r[k] for r in part] for k in part[0]})
        pq.write_table(table, out / "data" / f"{split}-00000-of-00001.parquet")


TRL_CHILD = r"""
import json, resource, sys, time
t0, c0 = time.time(), time.process_time()
import datasets
from types import SimpleNamespace
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer
datasets.disable_caching()  # a first launch: nothing cached from an earlier run
tok = AutoTokenizer.from_pretrained(sys.argv[1])
t1, c1 = time.time(), time.process_time()
ds = datasets.load_dataset("parquet", data_files=sys.argv[2], split="train")
ds = ds.map(lambda r: {"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]},
            remove_columns=["messages", "prompt_id", "score_chosen", "score_rejected"])
args = DPOConfig(output_dir=sys.argv[3], bf16=False, use_cpu=True, report_to=[], max_length=1024, dataset_num_proc=None)
out = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, args, "train")
tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]))
print("TRL_RESULT " + json.dumps({"wall_s": time.time() - t1, "cpu_s": time.process_time() - c1, "rows": len(out),
      "tokens": tokens, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_trl(work: Path, model: Path, data: Path) -> dict:
    parquet = str(data / "data" / "train_prefs-00000-of-00001.parquet")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", TRL_CHILD, str(model), parquet, str(work / "trl_out")],
                          env=env(threads=1), capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"TRL failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TRL_RESULT "))
    return {**json.loads(line[len("TRL_RESULT ") :]), "process_wall_s": time.time() - t0}


def run_dpo_ds(work: Path, model: Path, data: Path, ranks: int, cache: Path) -> dict:
    cmd = deepspeed_cmd(
        f"model.name_or_path={model}", f"datasets=[ultrafeedback:{data}]", "max_length=1024", "max_prompt_length=512",
        f"data.cache_dir={cache}", f"run_dir={work / 'run'}", ranks=ranks, module="dpo_ds.cli.prepare",
    )  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(threads=1), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"dpo_ds ({ranks} ranks) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    ranks_out = [
        json.loads(x.split("DPO_DS_PREPARE ", 1)[1])
        for x in proc.stdout.splitlines()
        if "DPO_DS_PREPARE " in x
    ]
    return {
        "wall_s": wall,
        "ranks": sorted(ranks_out, key=lambda r: r["rank"]),
        "log": proc.stdout + proc.stderr,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="default 20000 (--quick: 200)")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (--quick: 1000)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="every phase at the smallest size (its code, not its figures): exit 0 even if a target misses",
    )
    args = ap.parse_args()
    args.rows = args.rows or (200 if args.quick else 20000)
    args.vocab = args.vocab or (1000 if args.quick else 32000)
    work = Path(tempfile.mkdtemp(prefix="dpo_ds_bench_data_"))
    try:
        t = time.time()
        make_model(work / "model", args.vocab)
        make_data(work / "uf", args.rows)
        print(f"built the tokenizer and {args.rows} rows in {time.time() - t:.0f} s", flush=True)
        trl = run_trl(work, work / "model", work / "uf")
        print(f"TRL: {trl['wall_s']:.1f} s", flush=True)
        one = run_dpo_ds(work, work / "model", work / "uf", 1, work / "cache1")
        print(f"dpo_ds x1: {one['wall_s']:.1f} s", flush=True)
        two = run_dpo_ds(work, work / "model", work / "uf", 2, work / "cache2")
        print(f"dpo_ds x2: {two['wall_s']:.1f} s", flush=True)
        again = run_dpo_ds(work, work / "model", work / "uf", 2, work / "cache2")
        print(f"relaunch: {again['wall_s']:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    tokens = two["ranks"][0]["tokens"]
    print(
        f"\nData phase, {args.rows} UltraFeedback-shaped rows (prompts 40-200 words, answers 50-350), ChatML BPE "
        f"with {args.vocab} entries; {tokens / 1e6:.1f}M tokens as trained on (prompt + response of every sequence, "
        f"train + test splits); 2-core CPU\n"
    )
    print(
        "| run | wall s (data phase) | process wall s | CPU s per rank (with its build worker) | peak RSS per rank GiB (its build worker's) | private memory held per token | mapped pages per token |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| TRL 1.16 _prepare_dataset, 1 process | {trl['wall_s']:.1f} | {trl['process_wall_s']:.1f} | {trl['cpu_s']:.1f} | "
          f"{trl['peak_rss'] / 2**30:.2f} | | |")  # fmt: skip
    for name, r in (
        ("dpo_ds first launch, 1 rank", one),
        ("dpo_ds first launch, 2 ranks", two),
        ("dpo_ds relaunch (cache), 2 ranks", again),
    ):
        rk = r["ranks"]

        def each(fn, rk=rk) -> str:
            return " / ".join(fn(x) for x in rk)

        cpu = each(lambda x: f"{x['data_cpu_s'] + x['children_cpu_s']:.1f}")
        peak = each(
            lambda x: (
                f"{x['peak_rss'] / 2**30:.2f}"
                + (f" ({x['worker_peak_rss'] / 2**30:.2f})" if x["built"] else "")
            )
        )
        anon = each(lambda x: f"{max(x['anon_held'], 0) / x['tokens']:.2f} B")
        mapped = each(lambda x: f"{max(x['file_held'], 0) / x['tokens']:.2f} B")
        wall = max(x["data_wall_s"] for x in rk)
        print(f"| {name} | {wall:.1f} | {r['wall_s']:.1f} | {cpu} | {peak} | {anon} | {mapped} |")
    first = max(x["data_wall_s"] for x in two["ranks"])
    relaunch = max(x["data_wall_s"] for x in again["ranks"])
    held = max(max(x["anon_held"], 0) / x["tokens"] for x in two["ranks"] + again["ranks"])
    checks = [
        (f"first launch at 2 ranks <= 0.5x TRL's wall time ({first:.1f} vs {trl['wall_s']:.1f} s = {first / trl['wall_s']:.2f}x)", first <= 0.5 * trl["wall_s"]),
        (f"relaunch <= 0.05x the first ({relaunch:.2f} vs {first:.1f} s = {relaunch / first:.3f}x)", relaunch <= 0.05 * first),
        (f"<= 8 bytes per token held per rank (max {held:.2f} B, private memory; the ids themselves are mapped)", held <= 8),
    ]  # fmt: skip
    print()
    for line, ok in checks:
        print(f"target {line}: {'PASS' if ok else 'MISS'}")
    if args.quick:
        print("(--quick: targets not enforced at this size; the launches' fixed costs dominate)")
        return 0
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
