"""Sequence parallelism without the launcher: a micro-batch's shards hold exactly its tokens and scored
targets, whatever the layout and wherever a boundary falls; on 2 gloo ranks (spawned here) DeepSpeed's
Ulysses attention over the shards gives the unsharded forward's per-sequence log-probs, and the group's
summed gradients are the unsharded gradients, for padded (sdpa), packed and shared-prompt rows
(dpo_ds_blocks); the configurations that cannot run are refused before any engine."""

from __future__ import annotations

import random

import pytest
import torch

from dpo_ds.config import LAYOUTS, ConfigError
from dpo_ds.data.layout import ONE_ROW, choose
from dpo_ds.data.tokenize import IGNORE, Tokenization
from dpo_ds.model.files import SHIPPED_MODELS, load_config, load_tokenizer, random_init_state
from dpo_ds.model.lm import LogprobLM
from tests.two_ranks import on_two_ranks

ATTN = {"padded": "sdpa", "packed": "dpo_ds_blocks", "shared_prompt": "dpo_ds_blocks"}


def _examples(n: int, seed: int, max_length: int = 24):
    tok = load_tokenizer(SHIPPED_MODELS["tiny"])
    rng = random.Random(seed)
    rules = Tokenization(tok, max_length=max_length, max_prompt_length=max_length // 2)
    chars = "abcdefghij0123456789+="

    def text(lo, hi):
        return "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))

    rows = [("", text(1, 5), text(0, 3)), (text(20, 30), text(20, 30), text(1, 4))]
    rows += [(text(0, 20), text(0, 25), text(0, 1)) for _ in range(n - len(rows))]
    return [rules.tokenize(p, [c, r], "keep_end") for p, c, r in rows], tok.pad_token_id


def _micro(layout: str, examples, pad_id, sp=(0, 1)):
    row = ONE_ROW if layout != "padded" else 0
    return LAYOUTS.get(layout)(24, row, ATTN[layout], sp).micro_batch(examples, pad_id)


@pytest.mark.parametrize("layout", sorted(LAYOUTS.names()))
@pytest.mark.parametrize("n", [2, 3])
def test_shards_hold_the_rows_and_their_targets(layout, n):
    examples, pad = _examples(7, seed=n)
    whole = _micro(layout, examples, pad)
    shards = [_micro(layout, examples, pad, (r, n)) for r in range(n)]
    rows, t = whole.input_ids.shape
    local = shards[0].input_ids.shape[1]
    assert all(s.input_ids.shape == (rows, local) for s in shards) and local * n >= t > local * (n - 1)
    joined = torch.cat([s.input_ids for s in shards], dim=1)
    assert (
        torch.equal(joined[:, :t], whole.input_ids)
        and (torch.cat([s.seq_ids for s in shards], 1)[:, t:] < 0).all()
    )
    assert (torch.cat([s.labels for s in shards], 1)[:, t:] == IGNORE).all()
    positions = torch.cat([s.position_ids for s in shards], dim=1)[:, :t]
    want = whole.position_ids if whole.position_ids is not None else torch.arange(t).expand(rows, t)
    assert torch.equal(positions, want)
    # every scored token in exactly one shard, predicted from the same place of the same row
    got = sorted(
        (int(p) // local, r * local + int(p) % local, int(i), int(q))
        for r, s in enumerate(shards)
        for p, i, q in zip(s.target_pos, s.target_ids, s.target_seq)
    )
    want = sorted((int(p) // t, int(p) % t, int(i), int(q)) for p, i, q in zip(whole.target_pos, whole.target_ids, whole.target_seq))  # fmt: skip
    assert got == want
    assert sum(s.logical_tokens for s in shards) == whole.logical_tokens
    assert all(
        s.spans == whole.spans and s.n_seqs == whole.n_seqs and s.attention_mask is None for s in shards
    )


def _worker(rank: int, attn: str, stage: int) -> dict:
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine import sequence_parallel as engine_sp

    if attn == "dpo_ds_blocks":
        from dpo_ds.model.attention import register

        register()
    lm = AutoModelForCausalLM.from_config(
        load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32, attn_implementation=attn
    )
    lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=3))
    layouts = [k for k, a in ATTN.items() if a == attn]
    examples, pad = _examples(7, seed=11)
    weights = torch.randn(2 * len(examples), generator=torch.Generator().manual_seed(5))

    def run(model, micro):
        model.zero_grad()
        logps, counts = model(**micro.model_inputs())
        (logps * weights).sum().backward()
        return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = {k: run(LogprobLM(lm, "naive"), _micro(k, examples, pad)) for k in layouts}  # before SP exists
    sp = engine_sp.start_sequence_parallel(2, attn, SHIPPED_MODELS["tiny"], stage)
    model = LogprobLM(lm, "naive", sp)
    result = {}
    for k in layouts:
        logps, counts, grads = run(model, _micro(k, examples, pad, (sp.rank, 2)))
        for g in grads.values():  # what the optimizer sees: the group's sum (times 1 / scale)
            torch.distributed.all_reduce(g, group=sp.group)
            g /= sp.grad_scale
        want_logps, want_counts, want_grads = plain[k]
        result[k] = (
            (logps - want_logps).abs().max().item(),
            torch.equal(counts, want_counts),
            max(
                ((grads[n] - want_grads[n]).abs().max() / want_grads[n].abs().max().clamp(min=1e-12)).item()
                for n in want_grads
            ),  # fmt: skip
        )
    return result


@pytest.mark.parametrize("attn, stage", [("sdpa", 2), ("dpo_ds_blocks", 3)])
def test_ulysses_over_the_shards_is_the_unsharded_model(attn, stage):
    results = on_two_ranks(_worker, attn, stage, timeout=240)
    for rank, result in results.items():
        assert isinstance(result, dict), (rank, result)
        for layout, (logp_diff, counts_equal, grad_rel) in result.items():
            assert logp_diff < 1e-5 and counts_equal, (rank, layout, logp_diff)
            assert grad_rel < 1e-4, (rank, layout, grad_rel)


def test_what_cannot_run_under_sequence_parallelism_is_refused(tmp_path):
    from dpo_ds.engine import sequence_parallel as engine_sp

    kw = dict(
        max_length=24, row_tokens=0, max_tokens_per_micro_batch=0, on_cpu=False, sequence_parallel=(0, 2)
    )
    assert choose("packed", attn="auto", **kw).attn == "dpo_ds_blocks"  # even on a GPU: it follows the spans
    assert choose("padded", attn="auto", **kw).attn == "sdpa"
    for layout, attn in (("packed", "flex_attention"), ("shared_prompt", "sdpa"), ("padded", "eager")):
        with pytest.raises(ConfigError, match="model.attn_implementation.*sequence_parallel_size=2"):
            choose(layout, attn=attn, **kw)
    with pytest.raises(ConfigError, match="does not divide the world of 3"):
        engine_sp.sequence_parallel_place(0, 3, 2)
    assert engine_sp.sequence_parallel_place(5, 8, 2) == (2, 1, 4)
    odd = tmp_path / "odd"
    odd.mkdir()
    config = (
        (SHIPPED_MODELS["tiny"] / "config.json")
        .read_text()
        .replace('"num_key_value_heads": 4', '"num_key_value_heads": 3')
    )
    config = config.replace('"hidden_size": 64', '"hidden_size": 96')  # 6 heads of 16
    (odd / "config.json").write_text(config.replace('"num_attention_heads": 4', '"num_attention_heads": 6'))
    with pytest.raises(ConfigError, match="4 does not divide the model's 6 attention heads"):
        engine_sp.check_sequence_parallel(4, odd)
    with pytest.raises(ConfigError, match="2 and the model's 3 key/value heads"):
        engine_sp.check_sequence_parallel(2, odd)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_gives_the_whole_mlps_logps_and_gradients(checkpointing):
    """parallel.tiled_mlp_tokens: DeepSpeed's TiledMLP over every decoder layer's MLP (tiles of 5 tokens
    here, the last one shorter), with and without gradient checkpointing: log-probs and every gradient
    equal the untiled model's; forwards without grad are not tiled (generation's ranks may run apart)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine.build import tile_mlps

    examples, pad = _examples(5, seed=11)
    inputs = LAYOUTS.get("padded")(24).micro_batch(examples, pad).model_inputs()
    out = {}
    for tiled in (False, True):
        lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny"]), dtype=torch.float32)
        lm.load_state_dict(random_init_state(SHIPPED_MODELS["tiny"], seed=4))
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        if tiled:
            assert tile_mlps(lm, 5) == lm.config.num_hidden_layers
            apply = TiledMLP.apply
            TiledMLP.apply = lambda *a, calls=calls, apply=apply: calls.append(a[3]) or apply(*a)
        try:
            model = LogprobLM(lm.train(), "naive")
            logps, _ = model(**inputs)
            (logps * torch.linspace(1, 2, logps.numel())).sum().backward()
            with torch.no_grad():
                model(**inputs)  # not tiled: no call
        finally:
            if tiled:
                TiledMLP.apply = apply
        out[tiled] = logps.detach(), {n: p.grad for n, p in lm.named_parameters()}
        if tiled:
            t = inputs["input_ids"].shape[1]
            layers = lm.config.num_hidden_layers
            assert calls == [-(-t // 5)] * layers * (2 if checkpointing else 1), calls  # recomputed under GC
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
