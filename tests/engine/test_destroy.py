"""A destroyed reference engine gives its memory back: the precomputed reference's pre-pass must leave
the policy the memory the reference took (under ZeRO-3 the partitions live in each parameter's
ds_tensor, which dropping the engine alone never frees)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from dpo_ds.dist.launcher import single_process_env
from tests.launch import ROOT

_SCRIPT = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from transformers import LlamaConfig
    from dpo_ds.dist import comm
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.engine import build as engine_build
    from dpo_ds.engine import ds_config as engine_config
    from dpo_ds.config import load_config

    rank, world, device = comm.init_distributed(1)
    d = Path(sys.argv[1])
    d.mkdir()
    for f in (Path(sys.argv[2]) / "dpo_ds/demo/model").iterdir():
        if f.name != "config.json":
            shutil.copy(f, d / f.name)
    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(d)
    cfg = load_config(None, ["batch_size=2", "eval_batch_size=2"])
    ref_ds = engine_config.reference_ds_config(engine_config.resolve_ds_config(sys.argv[2] + "/ds_configs/zero3.json", cfg, world, True), cfg)
    before = dist_memory.memory_now_gib()
    engine = engine_build.build_reference(engine_build.build_lm(d, ref_ds, "float32", from_weights=False), ref_ds, cfg)
    built = dist_memory.memory_now_gib()
    engine_build.destroy(engine)
    del engine
    after = dist_memory.memory_now_gib()
    print(before, built, after)
    """
)


def test_destroyed_reference_engine_returns_its_memory(tmp_path):
    # large frees go back to the OS only through mmap: fix the threshold so RSS shows what is freed
    env = single_process_env(MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "model"), str(ROOT)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, built, after = map(float, proc.stdout.split()[-3:])
    weights_gib = 45.4e6 * 4 / 2**30  # the model's fp32 parameters: all on this one rank
    assert built - before > weights_gib  # the engine did hold its weights
    assert built - after > 0.8 * weights_gib, (before, built, after)  # and gave at least them back


_SHUTDOWN = textwrap.dedent(
    """
    import json, os
    from dpo_ds.dist import comm
    from dpo_ds.dist import memory as dist_memory
    from dpo_ds.engine import build as engine_build
    from dpo_ds.engine import ds_config as engine_config
    from dpo_ds.model.files import load_tokenizer, resolve_model_dir

    def threads():
        return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

    comm.init_distributed(1)
    load_tokenizer(resolve_model_dir("tiny"))  # imports torch.distributed.nn through transformers/accelerate
    import torch.distributed.nn  # and for certain, should that chain ever change
    running = threads()
    comm.shutdown()
    print(json.dumps([running, threads()]))
    """
)


def test_shutdown_joins_the_process_groups_threads():
    """A process group pinned by a stray reference keeps gloo's threads alive into interpreter
    shutdown, where one of them can abort the process (exit 250) after a clean error exit."""
    proc = subprocess.run(
        [sys.executable, "-c", _SHUTDOWN], env=single_process_env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    running, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "pt_gloo_runloop" in running  # the group's worker threads existed
    assert not [t for t in after if "gloo" in t], after  # and shutdown joined them
