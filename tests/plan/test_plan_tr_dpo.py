"""What TR-DPO adds to a plan: the reference update's buffers between steps (estimate.sync_peak_bytes), by hand
for each placement, counted in the peak where it is the largest moment, and set from the config."""

from __future__ import annotations

import dataclasses

from dpo_ds.plan import estimate as est
from dpo_ds.plan import planner
from tests.plan.test_plan_terms import _run

LARGEST = 1000 * 64  # the test shape's largest tensor: its untied lm_head / embedding


def test_sync_peak_by_hand_for_each_placement():
    run = _run(False, ranks=4, reference_mode="engine", reference_sync=True)
    assert run.shape.largest_tensor == LARGEST
    assert est.sync_peak_bytes(dataclasses.replace(run, reference_sync=False)) == 0
    # ZeRO-3 reference: three fp32 buffers of one shard of the largest tensor
    assert est.sync_peak_bytes(run) == 3 * 4 * LARGEST / 4
    # ZeRO-0 reference under a ZeRO-3 policy: the whole tensor, and the policy's copy of it gathered
    zero0 = dataclasses.replace(run, reference_stage=0)
    assert est.sync_peak_bytes(zero0) == 3 * 4 * LARGEST + LARGEST * 4
    # ZeRO-0 reference under a ZeRO-2 policy: whole, nothing gathered
    assert est.sync_peak_bytes(dataclasses.replace(zero0, stage=2)) == 3 * 4 * LARGEST


def test_the_peak_counts_the_sync_when_it_is_the_largest_moment():
    run = _run(False, ranks=1, reference_mode="engine", reference_sync=True, reference_stage=0, tokens_per_micro=1,
               scored_per_micro=1)  # fmt: skip
    t = est.estimate(run)
    syncing = sum(v for k, v in planner.running_terms(t).items() if k not in planner.NOT_WHILE_SAVING)
    syncing += t[est.SYNC_PEAK]
    assert t[est.SYNC_PEAK] > 0 and syncing > t["total"]  # a tiny step, a whole-tensor update
    assert planner.worst_total(run) == syncing
    off = dataclasses.replace(run, reference_sync=False)
    assert planner.worst_total(off) < syncing


def test_describe_sets_it_from_the_config_for_a_reference_engine_only():
    from dpo_ds.config import load_config
    from dpo_ds.model.files import SHIPPED_MODELS

    ds = {"zero_optimization": {"stage": 3}}
    for overrides, want in (([], False), (["model.reference_sync_steps=8"], True)):
        cfg = load_config(None, ["model.name_or_path=tiny", *overrides])
        run = planner.describe(cfg, ds, 2, on_cpu=True, model_dir=SHIPPED_MODELS["tiny"])
        assert run.reference_sync is want


def test_a_lora_reference_adapter_is_counted_as_peft_makes_it():
    """The reference adapter's values (estimate.policy_states) against the parameters add_reference_adapter
    really adds to a peft model of the shipped tiny model; its rank from n_examples, or one sync with a note."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_ds.config import load_config
    from dpo_ds.model import adapters
    from dpo_ds.model.files import SHIPPED_MODELS
    from dpo_ds.model.files import load_config as model_config

    keys = ["model.name_or_path=tiny", "model.lora.r=4", "model.reference_sync_steps=5", "batch_size=8"]
    cfg = load_config(None, [*keys, "n_examples=160", "n_epochs=null"])  # 20 steps: 4 syncs
    ds = {"zero_optimization": {"stage": 2}}
    run = planner.describe(cfg, ds, 1, on_cpu=True, model_dir=SHIPPED_MODELS["tiny"])
    assert run.reference_adapter_rank == 16
    lm = AutoModelForCausalLM.from_config(model_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
    lm = adapters.wrap(lm, cfg.model.lora, 0, False, SHIPPED_MODELS["tiny"])
    before = sum(p.numel() for p in lm.parameters())
    adapters.add_reference_adapter(lm, run.reference_adapter_rank, fp32=False)
    made = sum(p.numel() for p in lm.parameters()) - before
    without = dataclasses.replace(run, reference_adapter_rank=0)
    added = est.policy_states(run)["weights"] - est.policy_states(without)["weights"]
    assert added == made * 4  # fp32 values, whole on the one rank
    by_epochs = planner.describe(
        load_config(None, keys), ds, 1, on_cpu=True, model_dir=SHIPPED_MODELS["tiny"]
    )
    assert by_epochs.reference_adapter_rank == 4 and any("planned at one sync" in n for n in by_epochs.notes)
