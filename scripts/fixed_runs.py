"""Record a fixed list of 2-rank runs, so that a move of code can be shown to change nothing.

    python scripts/fixed_runs.py OUT.json [--work DIR] [--old-work DIR]
    python scripts/fixed_runs.py --compare BEFORE.json AFTER.json

Each run goes through the real launcher, as users start it (`deepspeed --num_gpus 2 dpo_ds/train.py
--ds ... key=value...`), one torch thread per rank, fp32 on CPU, on the tiny shipped Llama and a slice
of the demo data. For each run the record holds every training step's loss and gradient norm (as
exact float reprs) and the sha256 of every file of the final step dir that holds weights (policy.pt,
or the LoRA adapter). The runs: SFT; DPO padded, packed and shared_prompt on ZeRO-3 with the reference
engine; a precomputed reference; LoRA (adapters-off reference); sequence parallelism 2; a run killed
inside a save (rank 1, its 2nd save) and resumed with resume_from=auto.

`--old-work DIR` (DIR: the --work of an earlier recording, e.g. made before a move) also resumes a copy
of that recording's killed run directory with this checkout's code: a run dir written before the move
must resume after it and give the same steps. `--compare` prints a table of the two recordings and exits
non-zero unless every number and hash is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "dpo_ds" / "demo" / "data"
TINY = ["model.name_or_path=tiny", "batch_size=16", "eval_batch_size=16", "n_eval_examples=32",
        "max_length=16", "max_prompt_length=8", "warmup_steps=0", "do_first_eval=false",
        "eval_every=100000"]  # fmt: skip
SEGMENTED = ["data.max_tokens_per_micro_batch=64"]


def runs(work: Path) -> dict[str, list[str]]:
    """name -> train.py arguments, in order (the DPO runs start from the SFT run's archive)."""
    data, archive = work / "data", work / "sft" / "LATEST" / "policy.pt"
    zero3 = ["--ds", str(ROOT / "ds_configs/zero3.json")]
    dpo = [*zero3, "loss=dpo", "loss.beta=0.1", f"datasets=[{data}]", f"model.archive={archive}", "lr=1e-3",
           "n_epochs=2", *TINY]  # fmt: skip
    return {
        "sft": [*zero3, "loss=sft", f"datasets=[{data}]", "lr=3e-3", "n_epochs=4", *TINY],
        "dpo_padded": dpo,
        "dpo_packed": [*dpo, "data.layout=packed", *SEGMENTED],
        "dpo_shared_prompt": [*dpo, "data.layout=shared_prompt", *SEGMENTED],
        "dpo_precomputed": [*dpo, "model.reference_mode=precomputed"],
        "dpo_lora": [*dpo, "model.lora.r=8", "lr=1e-2"],
        "dpo_sp2": [*dpo, "parallel.sequence_parallel_size=2", "batch_size=8"],
        "dpo_resumed": [
            *dpo,
            "n_epochs=4",
            "checkpoint.save_every=2",
            "checkpoint.keep_last=2",
            "resume_from=auto",
        ],  # fmt: skip
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], run_dir: Path, log: Path, **extra_env: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra_env)  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "dpo_ds" / "train.py"), *args, f"run_dir={run_dir}"]  # fmt: skip
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(
            cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=900
        ).returncode


def record(run_dir: Path) -> dict:
    """Every training step's loss and gradient norm, and the sha256 of the final weights."""
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/train" in rec:
            steps.append(
                {k: repr(v) for k, v in sorted(rec.items()) if k in ("step", "loss/train", "grad_norm")}
            )
    latest = (run_dir / "LATEST").resolve()
    weights = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(latest.iterdir()) if p.name in ("policy.pt", "adapter_model.safetensors")}  # fmt: skip
    return {"steps": steps, "final": latest.name, "weights": weights}


def record_all(work: Path, old_work: Path | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    for split, n in (("train", 48), ("test", 32)):
        lines = (DEMO / f"{split}.jsonl").read_text().splitlines()[:n]
        (work / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = {}
    for name, args in runs(work).items():
        run_dir, log, t0 = work / name, work / f"{name}.log", time.time()
        shutil.rmtree(run_dir, ignore_errors=True)
        if name == "dpo_resumed":  # rank 1 SIGKILLed inside its 2nd save, then the same command again
            code = launch(args, run_dir, log, DPO_DS_TEST_KILL_IN_SAVE="1:2")
            assert code != 0, f"{name}: the run meant to be killed in a save exited 0 (see {log})"
            shutil.copytree(run_dir, work / "dpo_killed", symlinks=True, dirs_exist_ok=True)
        code = launch(args, run_dir, log)
        assert code == 0, f"{name}: exit {code} (see {log})"
        out[name] = record(run_dir)
        print(f"{name}: {len(out[name]['steps'])} steps, {time.time() - t0:.0f} s", flush=True)
    if old_work is not None:  # a run dir written by the earlier checkout, resumed by this one
        run_dir = work / "dpo_resumed_old_dir"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(old_work / "dpo_killed", run_dir, symlinks=True)
        args = runs(old_work)["dpo_resumed"]  # its own data and archive: a resume must not change them
        code = launch(args, run_dir, work / "dpo_resumed_old_dir.log")
        assert code == 0, f"resume of {old_work / 'dpo_killed'}: exit {code}"
        out["dpo_resumed_old_dir"] = record(run_dir)
    return out


def compare(before: dict, after: dict) -> bool:
    same_all = True
    print(
        "| run | steps | last loss | last grad norm | final weights (sha256) | identical |\n|---|---:|---|---|---|---|"
    )
    for name in sorted(set(before) | set(after)):
        b, a = (
            before.get(name),
            after.get(name, before.get("dpo_resumed") if name.endswith("_old_dir") else None),
        )
        same = a is not None and b is not None and a == b
        if name.endswith("_old_dir") and b is None:  # only the later recording resumes the old dir
            b, a = before["dpo_resumed"], after[name]
            same = a == b
        same_all &= same
        last = (a or b)["steps"][-1]
        sha = ", ".join(f"{k} {v[:12]}" for k, v in (a or b)["weights"].items())
        print(f"| {name} | {len((a or b)['steps'])} | {last['loss/train']} | {last.get('grad_norm')} | {sha} | "
              f"{'yes' if same else 'NO'} |")  # fmt: skip
    return same_all


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="where to write the recording (JSON)")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "fixed_runs")
    p.add_argument("--old-work", type=Path, help="an earlier recording's --work: resume its killed run dir")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = p.parse_args()
    if a.compare:
        before, after = (json.loads(Path(f).read_text()) for f in a.compare)
        ok = compare(before, after)
        print("identical: every step's loss and grad norm, every final weight file" if ok else "DIFFERENT")
        return 0 if ok else 1
    if not a.out:
        p.error("give OUT.json or --compare BEFORE AFTER")
    result = record_all(a.work.resolve(), a.old_work.resolve() if a.old_work else None)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
