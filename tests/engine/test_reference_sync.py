"""TR-DPO's reference update (engine/reference_sync.py) on 2 gloo ranks, for every placement pair dpo_ds's JSONs
allow (policy ZeRO-3 or ZeRO-2, reference ZeRO-3 or ZeRO-0): the local update, shard by shard, against the same
update made on gathered parameters (every parameter whole on rank 0, lerped, and partitioned again), compared
on the reference's log-probs after every sync; small tensors persistent under ZeRO-3 so that their whole copies
are covered too."""

from __future__ import annotations

import pytest
import torch

from dpo_ds.config import LAYOUTS
from dpo_ds.model.files import SHIPPED_MODELS, load_config, random_init_state
from dpo_ds.model.lm import LogprobLM
from tests.engine.test_sequence_parallel import _examples
from tests.two_ranks import on_two_ranks

ROWS = [(3, 3), (3, 0), (2, 3), (2, 0)]  # (policy stage, reference stage)
ALPHA, SYNC_EVERY, STEPS = 0.6, 2, 4
PERSIST = 100  # parameters under 100 elements (the norms) stay whole on every rank under ZeRO-3


def _ds(stage: int, train: bool) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": PERSIST},
        "steps_per_print": 10**9,
    }
    if train:
        ds["optimizer"] = {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}
        ds["zero_allow_untested_optimizer"] = True
    return ds


def _engine(stage: int, train: bool):
    import deepspeed
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    model = LogprobLM(lm, "naive")
    if not train:
        model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] if train else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=_ds(stage, train))
    return engine


def gathered_mix(reference, policy, alpha: float) -> None:
    """The independent update: each policy parameter gathered whole, each reference parameter gathered whole
    and changed on rank 0 (DeepSpeed partitions rank 0's data again on leaving the context)."""
    import deepspeed

    from dpo_ds.engine.reference_sync import pairs

    for _, q, p in pairs(reference, policy):
        with deepspeed.zero.GatheredParameters([p] if hasattr(p, "ds_id") else [], modifier_rank=None):
            whole = p.detach().clone()
        zero3 = hasattr(q, "ds_id")
        with torch.no_grad(), deepspeed.zero.GatheredParameters([q] if zero3 else [], modifier_rank=0):
            q.data.copy_(torch.lerp(q.data.float(), whole.float(), alpha))


def _worker(rank: int) -> dict:
    from dpo_ds.engine.build import destroy
    from dpo_ds.engine.reference_sync import mix_into

    examples, pad = _examples(8, seed=7)
    mine = examples[rank * 4 : rank * 4 + 4]
    train = [LAYOUTS.get("padded")(24).micro_batch(mine[i : i + 2], pad) for i in (0, 2)]
    held_out = LAYOUTS.get("padded")(24).micro_batch(examples, pad)
    weights = torch.randn(4, generator=torch.Generator().manual_seed(rank))
    result = {}
    for pstage, rstage in ROWS:
        policy = _engine(pstage, True)
        local, gathered = _engine(rstage, False), _engine(rstage, False)

        def ref_logps(engine):
            with torch.no_grad():
                return engine(**held_out.model_inputs())[0].clone()

        start = ref_logps(local)
        diffs, moved = [], []
        for step in range(1, STEPS + 1):
            logps = policy(**train[step % 2].model_inputs())[0]
            policy.backward(-(logps * weights).sum())
            policy.step()
            if step % SYNC_EVERY == 0:
                mix_into(local.module, policy.module, ALPHA)
                gathered_mix(gathered.module, policy.module, ALPHA)
                a, b = ref_logps(local), ref_logps(gathered)
                diffs.append((a - b).abs().max().item())
                moved.append((a - start).abs().max().item())
        result[(pstage, rstage)] = (diffs, moved)
        for engine in (policy, local, gathered):
            destroy(engine)
    return result


@pytest.fixture(scope="module")
def results():
    return on_two_ranks(_worker)


@pytest.mark.parametrize("row", ROWS, ids=[f"policy-zero{p}-reference-zero{r}" for p, r in ROWS])
def test_local_update_is_the_gathered_update(results, row):
    for rank, result in results.items():
        assert isinstance(result, dict), (rank, result)
        diffs, moved = result[row]
        assert len(diffs) == STEPS // SYNC_EVERY
        assert max(diffs) <= 1e-6, (rank, row, diffs)
        assert min(moved) > 1e-3, (rank, row, moved)  # the reference really moved: the test can fail
