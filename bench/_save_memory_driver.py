"""bench/memory.py's save measurement: rank 0's peak RSS while a ZeRO-3 policy is written as policy.pt.

    deepspeed --num_gpus 2 --master_port P bench/_save_memory_driver.py --model-dir M --out-dir D --json R

Builds a random policy engine from model directory M (config.json + tokenizer, no weights) under
ds_configs/zero3.json on every rank, then on rank 0 measures the peak RSS growth (VmHWM after a reset,
minus the RSS right before) of two ways of writing {'step_idx', 'state', 'metrics'}:
  old   every parameter gathered in turn (deepspeed.zero.GatheredParameters, all ranks) and cloned to CPU
        into one full state dict on rank 0, then torch.save: the whole fp32 model lives on rank 0
  new   dpo_ds.run.save.save_policy: rank 0 writes each gathered tensor's bytes and drops it
Then rank 0 loads both files and checks that they hold the same names and equal tensors. Results go
to R as JSON. Run it with MALLOC_MMAP_THRESHOLD_=1048576 so freed blocks leave the resident set.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def save_old(lm, path: Path, rank: int) -> None:
    """The method before save_policy: a full state dict on rank 0, then torch.save."""
    import deepspeed
    import torch

    state = {}
    for name, t in lm.state_dict(keep_vars=True).items():
        ctx = (
            deepspeed.zero.GatheredParameters([t], modifier_rank=None)
            if hasattr(t, "ds_id")
            else nullcontext()
        )
        with ctx:
            if rank == 0:
                state[name] = t.detach().cpu().clone()
    if rank == 0:
        torch.save({"step_idx": 0, "state": state, "metrics": {}}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    import torch

    from dpo_ds.config import load_config
    from dpo_ds.dist import comm
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.engine import build as engine_build
    from dpo_ds.engine import ds_config as engine_config
    from dpo_ds.engine import step as engine_step
    from dpo_ds.run import save as run_save

    model_dir = Path(args.model_dir)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "batch_size=2", "eval_batch_size=2"])
    rank, world, device = comm.init_distributed()
    ds = engine_config.resolve_ds_config(
        str(ROOT / "ds_configs" / "zero3.json"), cfg, world, on_cpu=device.type == "cpu"
    )
    lm = engine_build.build_lm(model_dir, ds, "float32", from_weights=False)
    engine = engine_build.build_policy(lm, ds, cfg)
    lm = engine_step.unwrap_lm(engine)
    out = Path(args.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    comm.barrier()

    result = {}
    for key, path in (("old", out / "old_policy.pt"), ("new", out / "new_policy.pt")):
        gc.collect()
        comm.barrier()
        before = dist_memory.memory_now_gib()
        dist_memory.reset_peak_memory()
        t0 = time.time()
        if key == "old":
            save_old(lm, path, rank)
        else:
            run_save.save_policy(engine, path, step_idx=0, metrics={})
        comm.barrier()
        seconds = time.time() - t0
        if rank == 0:
            result[key] = {
                "rss_before_gib": before,
                "growth_gib": dist_memory.peak_memory_gib() - before,
                "seconds": seconds,
                "file_bytes": path.stat().st_size,
            }
            print(
                f"[save driver] {key}: +{result[key]['growth_gib'] * 1024:.1f} MiB in {seconds:.1f} s",
                flush=True,
            )

    if rank == 0:
        old = torch.load(out / "old_policy.pt", map_location="cpu", mmap=True, weights_only=True)
        new = torch.load(out / "new_policy.pt", map_location="cpu", mmap=True, weights_only=True)
        same_keys = list(old["state"]) == list(new["state"])
        equal = (
            same_keys
            and old["step_idx"] == new["step_idx"]
            and all(
                old["state"][k].dtype == new["state"][k].dtype
                and torch.equal(old["state"][k], new["state"][k])
                for k in old["state"]
            )
        )
        result.update(
            equal=bool(equal),
            n_tensors=len(new["state"]),
            largest_tensor_bytes=max(t.numel() * t.element_size() for t in new["state"].values()),
        )
        Path(args.json).write_text(json.dumps(result, indent=2))
    comm.barrier()
    comm.shutdown()


if __name__ == "__main__":
    main()
