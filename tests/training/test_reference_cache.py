"""Which runs a precomputed reference's table is reused by: precompute() in-process, in a world of one,
the LoRA way (the policy, adapters off, computes the table) with a fake forward whose log-probs are made
from the example ids, so that what a table holds can be checked by hand."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from dpo_ds.config import ConfigError, load_config
from dpo_ds.data.batches import Batches, flatten
from dpo_ds.data.sources import PromptGroup
from dpo_ds.data.tokenize import Tokenization
from dpo_ds.dist import comm
from dpo_ds.engine import step as engine_step
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer
from dpo_ds.model.lm import SequenceLogps
from dpo_ds.run.dir import RunDir
from dpo_ds.training import reference
from tests.data.solo import Solo

N_TRAIN, N_TEST = 20, 12
BASE = [
    "model.reference_mode=precomputed",
    "model.lora.r=8",
    "batch_size=4",
    "eval_batch_size=4",
    "n_epochs=1",
]
START = SimpleNamespace(files=[], describe=lambda: "seeded initialisation (seed 0)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_MODELS["tiny"])


@pytest.fixture
def world(monkeypatch, tmp_path):
    """A world of one, a fake policy and a forward counting the micro-batches it runs: {"forwards": n}."""
    for name in ("decided_by_rank0", "all_gather_objects", "barrier"):
        monkeypatch.setattr(comm, name, getattr(Solo, name))
    monkeypatch.setattr(engine_step, "unwrap_lm", lambda engine: SimpleNamespace(disable_adapter=nullcontext))
    seen = {"forwards": 0}

    def forward(engine, micro):
        seen["forwards"] += 1
        ids = micro.example_ids.double()  # chosen -(i + 1), rejected -(i + 1) / 2
        return SequenceLogps(torch.cat([-(ids + 1), -(ids + 1) / 2]), torch.ones(2 * len(ids)))

    monkeypatch.setattr(reference, "sequence_logps", forward)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "tiny"}')
    return seen


def splits(tok, seed=3):
    def groups(n, tag):
        return [
            PromptGroup(f"{tag}{i:02d}+", [f"{i}", f"{i}x"], [(0, 1)], f"{i}", "keep_end") for i in range(n)
        ]

    rules = Tokenization(tok, max_length=16, max_prompt_length=8)
    kw = dict(global_batch=4, world=1, rank=0, micro_batches_per_step=1, seed=seed)
    train = Batches(flatten(groups(N_TRAIN, "a"), sft=False), rules, split="train", **kw)
    test = Batches(flatten(groups(N_TEST, "b"), sft=False), rules, split="test", **kw)
    return [train, test]


def precompute(tmp_path, tok, overrides, run="run", resume=False, seed=3):
    cfg = load_config(None, [*BASE, *overrides])
    data = splits(tok, seed)
    source = reference.precompute(
        cfg, ref_config=None, model_dir=tmp_path / "model", start=START, splits=data,
        run_dir=RunDir(tmp_path / run), rank=0, world=1, device="cpu",
        resume_dir=tmp_path / run / "step-8" if resume else None, layout=data[0].layout, policy=object(),
    )  # fmt: skip
    return cfg, data, source


def every_lookup(cfg, data, source):
    """What the run asks the reference for: every training step's micro-batches, then every eval's."""
    train, test = data
    for step in train.train_steps(cfg.n_epochs, cfg.n_examples):
        for micro in step.micro_batches:
            assert source.logps(micro).tolist() == [-(i + 1.0) for i in micro.example_ids.tolist()] + [
                -(i + 1.0) / 2 for i in micro.example_ids.tolist()
            ]
    for micro_batches, _ in test.eval_batches(cfg.n_eval_examples):
        for micro in micro_batches:
            source.logps(micro)


@pytest.mark.parametrize("more", ["n_examples=20", "n_eval_examples=12"])
def test_resume_with_more_examples_recomputes_the_runs_table(tmp_path, tok, world, more):
    cfg, data, source = precompute(tmp_path, tok, ["n_examples=8", "n_eval_examples=4"])
    every_lookup(cfg, data, source)
    assert world["forwards"] == 2 + 1  # two training steps, one eval batch
    world["forwards"] = 0
    cfg, data, source = precompute(tmp_path, tok, ["n_examples=8", "n_eval_examples=4", more], resume=True)
    assert world["forwards"] > 0  # the table lacked examples of this run: computed again, before training
    every_lookup(cfg, data, source)  # no example missing mid-run


def test_shared_cache_dir_is_reused_only_by_runs_it_covers(tmp_path, tok, world):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    precompute(tmp_path, tok, [cache, "n_examples=8", "n_eval_examples=4"], run="a")
    world["forwards"] = 0
    cfg, data, source = precompute(tmp_path, tok, [cache, "n_examples=20", "n_eval_examples=12"], run="b")
    assert world["forwards"] == 5 + 3  # computed again: all of both splits
    every_lookup(cfg, data, source)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the same fingerprint, a table that grew
    world["forwards"] = 0
    for run, seed in (("c", 3), ("d", 4)):  # fewer examples, or other ones (another seed): all are in it
        cfg, data, source = precompute(
            tmp_path, tok, [cache, "n_examples=12", "n_eval_examples=8"], run, seed=seed
        )
        every_lookup(cfg, data, source)
    assert world["forwards"] == 0


def test_tables_of_other_runs_sharing_a_cache_dir_are_merged(tmp_path, tok, world):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    runs = [("a", 3), ("b", 4), ("c", 3), ("d", 4)]  # two seeds: other examples in the first 8
    for run, seed in runs:
        world["forwards"] = 0
        cfg, data, source = precompute(
            tmp_path, tok, [cache, "n_examples=8", "n_eval_examples=4"], run, seed=seed
        )
        every_lookup(cfg, data, source)
        assert (world["forwards"] > 0) == (run in "ab")  # c and d find theirs in the merged table


def test_first_pass_and_eval_examples_are_what_the_pre_pass_runs(tok):
    train, test = splits(tok)
    for n_epochs, n_examples in ((1, 8), (1, None), (2, 6), (None, 30), (3, None)):
        ran = {i for m in train.first_pass(n_epochs, n_examples) for i in m.example_ids.tolist()}
        trained = {i for s in train.train_steps(n_epochs, n_examples) for m in s.micro_batches for i in m.example_ids.tolist()}  # fmt: skip
        assert set(train.first_pass_examples(n_epochs, n_examples)) == ran == trained
    for n in (0, 3, 4, 9, 12, 100):
        ran = [i for m in test.eval_pass(n) for i in m.example_ids.tolist()]
        assert test.eval_examples(n) == ran


def test_fingerprint_records_the_dtype_the_table_is_computed_in(tmp_path, tok):
    (tmp_path / "config.json").write_text("{}")
    data = splits(tok)

    def facts(overrides, by_policy):
        cfg = load_config(None, ["model.reference_mode=precomputed", *overrides])
        return reference.fingerprint(cfg, tmp_path, data, START, data[0].layout, by_policy=by_policy)

    # the reference engine computes it: model.reference_dtype, as before (caches made before stay valid)
    engine = facts(["model.policy_dtype=bfloat16", "model.reference_dtype=float32"], by_policy=False)
    assert engine["model.reference_dtype"] == "float32" and "model.policy_dtype" not in engine
    # LoRA: the policy with its adapters off computes it, in model.policy_dtype
    lora = ["model.lora.r=8", "model.reference_dtype=float32"]
    bf16 = facts([*lora, "model.policy_dtype=bfloat16"], by_policy=True)
    fp32 = facts([*lora, "model.policy_dtype=float32"], by_policy=True)
    assert bf16["model.policy_dtype"] == "bfloat16" and "model.reference_dtype" not in bf16
    assert bf16 != fp32  # a shared cache made at another policy dtype is another file
    cfg = load_config(None, [*lora, "data.cache_dir=/c"])
    run = RunDir(tmp_path / "run")
    assert reference.cache_path(cfg, run, bf16) != reference.cache_path(cfg, run, fp32)


def test_a_cache_from_an_older_fingerprint_is_computed_again(tmp_path, tok, world):
    """A LoRA run's own cache written before its fingerprint named model.policy_dtype: a resume computes
    the table again rather than refusing; an item that changed is still refused."""
    cfg, data, _ = precompute(tmp_path, tok, ["n_examples=8", "n_eval_examples=4"])
    path = RunDir(tmp_path / "run").reference_cache
    cache = torch.load(path, weights_only=True)
    old = dict(cache["fingerprint"])
    old["model.reference_dtype"] = old.pop("model.policy_dtype")
    reference.write_cache(path, old, cache["tables"])
    world["forwards"] = 0
    precompute(tmp_path, tok, ["n_examples=8", "n_eval_examples=4"], resume=True)
    assert world["forwards"] == 3
    assert torch.load(path, weights_only=True)["fingerprint"] == cache["fingerprint"]
    with pytest.raises(ConfigError, match=r"different run \(model.policy_dtype: 'float32' -> 'bfloat16'\)"):
        precompute(
            tmp_path, tok, ["n_examples=8", "n_eval_examples=4", "model.policy_dtype=bfloat16"], resume=True
        )
    old["data.layout"] = "packed, rows of 64 tokens"  # older keys, and an item that changed: refused still
    reference.write_cache(path, old, cache["tables"])
    with pytest.raises(ConfigError, match=r"different run \(data.layout: 'packed, rows of 64 tokens' -> "):
        precompute(tmp_path, tok, ["n_examples=8", "n_eval_examples=4"], resume=True)


def test_a_malformed_complete_cache_is_a_config_error_not_a_traceback(tmp_path):
    from dpo_ds.config import ConfigError
    from dpo_ds.training.reference import read_cache, with_cached

    want = {"k": "v"}
    path = tmp_path / "reference_logps.pt"
    torch.save({"complete": True, "fingerprint": want, "tables": {"train": "not a tensor"}}, path)
    with pytest.raises(ConfigError, match=r"reference_logps.pt is malformed \(.*\); delete it"):
        read_cache(path, want, {"train": [0, 1]})
    tables = {"train": torch.zeros(2, 2)}
    assert with_cached(path, want, tables) is tables
