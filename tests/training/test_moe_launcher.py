"""Mixture-of-Experts DPO through the real launcher (2 CPU ranks) on the shipped tiny Qwen3-MoE (8 experts,
top-2): every layout under ZeRO-3 with the router loss, ZeRO-2 with a precomputed reference, the router loss
off and strong, frozen routers, LoRA on the fused experts with the merged export checked against peft's
merge; and the hang a per-expert MoE block makes under ZeRO-3 without DeepSpeed's leaf-module setting."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

from tests.launch import ROOT, TINY, deepspeed_cmd, env, metrics, run_many, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
MOE = [t.replace("=tiny", "=tiny_moe") for t in TINY]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("data"))


def _dpo(data, run_dir, *extra, ds="zero3.json"):
    return [
        "--ds", str(ROOT / "ds_configs" / ds), "loss=dpo", *MOE, f"datasets=[{data}]", f"run_dir={run_dir}",
        "lr=1e-3", "warmup_steps=0", "n_epochs=1", "eval_every=32", *extra,
    ]  # fmt: skip


ARCHS = {"mixtral": "padded", "olmoe": "packed", "gpt_oss": "shared_prompt"}


def _arch_dir(path, kind: str):
    """A model directory of a tiny random `kind` (tests/model/test_router_loss.py's config) with the tiny
    model's tokenizer: config and tokenizer, no weights (model.init=random)."""
    import shutil

    from dpo_ds.model.files import SHIPPED_MODELS
    from tests.model.test_router_loss import moe_config

    config = moe_config(kind)
    config.update({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 1024})
    if kind == "gpt_oss":  # a window shorter than the rows, so the sliding layers matter
        config.sliding_window = 6
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    for f in SHIPPED_MODELS["tiny"].glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("runs")
    once = ["do_first_eval=false", "eval_every=100000"]
    todo = {
        "padded": _dpo(data, root / "padded"),
        "packed": _dpo(data, root / "packed", "data.layout=packed", *once),
        "shared_prompt": _dpo(data, root / "shared_prompt", "data.layout=shared_prompt", *once),
        "zero2 precomputed": _dpo(data, root / "zero2 precomputed", "model.reference_mode=precomputed", *once,
                                  ds="zero2.json"),
        "router off": _dpo(data, root / "router off", "loss.router_aux_coef=0", *once),
        "router strong": _dpo(data, root / "router strong", "loss.router_aux_coef=1.0", *once),
        "frozen router": _dpo(data, root / "frozen router", "model.freeze_router=true", *once),
        "lora experts": _dpo(data, root / "lora experts", "model.lora.r=8", "model.lora.target_parameters=[experts]",
                             "lr=1e-2", "n_epochs=2"),
    }  # fmt: skip
    steps = ["do_first_eval=false", "eval_every=100000", "lr=1e-2"]
    for kind, layout in ARCHS.items():  # the other architectures, each in a layout of its own
        model_dir = _arch_dir(root / "models" / kind, kind)
        todo[kind] = _dpo(data, root / kind, f"model.name_or_path={model_dir}", "model.init=random",
                          f"data.layout={layout}", *steps)  # fmt: skip
    todo.update({
        # sequence parallelism: the router's sums are the group's, so 2 ranks on one row train as 1 rank
        "one rank": _dpo(data, root / "one rank", "data.layout=packed", *steps),
        "sp2 packed": _dpo(data, root / "sp2 packed", "data.layout=packed", "parallel.sequence_parallel_size=2", *steps),
        "sp2 shared_prompt": _dpo(data, root / "sp2 shared_prompt", "data.layout=shared_prompt",
                                  "parallel.sequence_parallel_size=2", *steps),
        # resume: half the run, then the rest from its checkpoint, against the run straight through
        "straight": _dpo(data, root / "straight", "n_epochs=2", *steps),
        "half": _dpo(data, root / "half", *steps),
        "resumed": _dpo(data, root / "half", "n_epochs=2", "resume_from=auto", *steps),
    })  # fmt: skip
    logs = run_many(root / "logs", todo, timeout=1500, one_rank=["one rank"])
    return {name: (root / name, logs[name]) for name in todo}


def test_every_layout_trains_with_the_router_loss(runs):
    """ln 2 at step 0, the router loss logged at the model's own coefficient, and the same router loss in every
    layout and ZeRO stage at step 1 (the same pairs, the same weights: the layouts weigh tokens alike)."""
    firsts = {}
    for name in ("padded", "packed", "shared_prompt", "zero2 precomputed"):
        run_dir, out = runs[name]
        assert "router load-balancing loss: coefficient 0.001 (the model config's own)" in out, name
        train, evals = metrics(run_dir)
        assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6), name
        assert all(math.isfinite(r["aux_loss/train"]) and r["aux_loss/train"] > 0 for r in train), name
        firsts[name] = train[0]["aux_loss/train"]
        assert "aux_loss/eval" in evals[-1] and "experts_eval/max_share" in evals[-1], name
    for name, aux in firsts.items():
        assert aux == pytest.approx(firsts["padded"], abs=1e-5), name
    # the expert load of the policy at step 0 is the reference's, and the reference's never changes
    _, evals = metrics(runs["padded"][0])
    assert evals[0]["experts_eval/max_share"] == pytest.approx(
        evals[0]["experts_eval/ref_max_share"], abs=1e-12
    )
    assert evals[0]["experts_eval/silenced"] == 0
    assert len({e["experts_eval/ref_entropy"] for e in evals}) == 1 and len(evals) >= 2
    # a precomputed reference is no model: only the policy's load
    _, evals = metrics(runs["zero2 precomputed"][0])
    assert "experts_eval/max_share" in evals[-1] and "experts_eval/ref_max_share" not in evals[-1]


def test_the_router_loss_is_in_the_objective(runs):
    """Its coefficient changes the training (coef 1 against 0), not the step-0 numbers; logged either way."""
    off, strong = metrics(runs["router off"][0])[0], metrics(runs["router strong"][0])[0]
    assert "not added to the objective" in runs["router off"][1]
    assert off[0]["aux_loss/train"] == pytest.approx(strong[0]["aux_loss/train"], abs=1e-6)
    assert off[0]["loss/train"] == pytest.approx(strong[0]["loss/train"], abs=1e-7)
    assert abs(off[0]["grad_norm"] - strong[0]["grad_norm"]) > 1e-3  # the router's gradient is in the step
    assert strong[-1]["aux_loss/train"] < off[-1]["aux_loss/train"]  # and it balances the routers


def _start_state():
    """The seeded init tiny_moe runs start from (seed 0)."""
    from dpo_ds.model.files import SHIPPED_MODELS, random_init_state

    return random_init_state(SHIPPED_MODELS["tiny_moe"], seed=0)


def test_frozen_routers_stay_where_they_started(runs):
    run_dir, out = runs["frozen router"]
    assert "model.freeze_router: 2 router parameters frozen" in out
    state = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    start = _start_state()
    routers = [k for k in start if k.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for k in routers:
        assert torch.equal(state[k], start[k]), k
    assert not torch.equal(
        state["model.layers.0.mlp.experts.gate_up_proj"], start["model.layers.0.mlp.experts.gate_up_proj"]
    )


def test_lora_reaches_the_fused_experts_and_exports_merged(tmp_path, runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_ds.cli.export import export
    from dpo_ds.model.files import SHIPPED_MODELS, load_config

    run_dir, out = runs["lora experts"]
    train, _ = metrics(run_dir)
    assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6)  # B = 0: the adapters start as identity
    assert train[-1]["loss/train"] < LN2
    assert "LoRA: no adapter reaches the experts" not in out
    step = run_dir / "LATEST"

    def base():
        lm = AutoModelForCausalLM.from_config(load_config(SHIPPED_MODELS["tiny_moe"]), dtype=torch.float32)
        lm.load_state_dict(_start_state())
        return lm.eval()

    peft_model = PeftModel.from_pretrained(base(), str(step))
    trained = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n and ".experts." in n}
    assert trained and all(p.abs().sum() > 0 for p in trained.values())  # the experts' adapters got gradients
    merged = AutoModelForCausalLM.from_pretrained(str(export(step, tmp_path / "merged"))).eval()
    want = peft_model.merge_and_unload().eval()
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want(ids).logits, rtol=0, atol=1e-5)
        assert (merged(ids).logits - base()(ids).logits).abs().max() > 1e-4  # the merge moved the model


def _per_expert_run(tmp_path, data, in_table: bool) -> subprocess.CompletedProcess:
    from tests.model.per_expert_moe import write_model_dir

    model_dir = write_model_dir(tmp_path / "model")
    args = [
        *(["--in-table"] if in_table else []), "--ds", str(ROOT / "ds_configs" / "zero3.json"), "loss=dpo",
        *[t.replace("=tiny", f"={model_dir}") for t in TINY], "model.init=random", f"datasets=[{data}]",
        f"run_dir={tmp_path / 'run'}", "n_epochs=1", "do_first_eval=false", "eval_every=100000", "step_timeout_s=30",
    ]  # fmt: skip
    cmd = deepspeed_cmd(*args, ranks=2, script=ROOT / "tests" / "model" / "per_expert_moe.py")
    return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_per_expert_blocks_hang_without_the_leaf_setting_and_train_with_it(tmp_path, data):
    """Rank 0's tokens pick expert 0, rank 1's experts 1 and 2, each expert its own module: without the
    leaf-module setting ZeRO-3 gathers different parameters on the two ranks and the step never completes
    (NCCL waits until the watchdog names the step; gloo, here, detects the mismatched collective and aborts);
    the launch warning names the block beforehand. In dpo_ds's table, the block is gathered whole and trains."""
    bad = _per_expert_run(tmp_path / "without", data, in_table=False)
    log = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "TestPerExpertBlock: an MoE block that runs each expert as its own module" in log
    assert "collective mismatch" in log or "watchdog" in log
    assert not (tmp_path / "without" / "run" / "LATEST").exists()
    good = _per_expert_run(tmp_path / "with", data, in_table=True)
    log = good.stdout + good.stderr
    assert good.returncode == 0, log[-4000:]
    assert "ZeRO-3 leaf modules: TestPerExpertBlock (each gathered whole)" in log
    assert "an MoE block that runs each expert" not in log
    train, _ = metrics(tmp_path / "with" / "run")
    assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6) and len(train) == 3


def test_sequence_parallel_router_loss_is_one_ranks(runs):
    """2 ranks on each row (Ulysses) against 1 rank on the whole rows: the same losses, router losses and
    gradient norms step by step, in packed and shared-prompt rows."""
    base, _ = metrics(runs["one rank"][0])
    assert base[0]["loss/train"] == pytest.approx(LN2, abs=1e-6) and len(base) == 3
    for name in ("sp2 packed", "sp2 shared_prompt"):
        run_dir, log = runs[name]
        assert "sequence parallelism: groups of 2 ranks share each row" in log, name
        train, _ = metrics(run_dir)
        assert len(train) == len(base), name
        for x, y in zip(base, train, strict=True):
            for key in ("loss/train", "aux_loss/train", "grad_norm"):
                assert abs(x[key] - y[key]) <= 1e-5, (name, key, x[key], y[key])


def test_resume_is_the_straight_run(runs):
    """The second half resumed from the first half's checkpoint trains exactly the straight run's steps,
    router loss included."""
    straight, _ = metrics(runs["straight"][0])
    resumed, _ = metrics(runs["half"][0])  # the first half's steps, then the resumed run's, in one file
    assert "resumed from" in runs["resumed"][1]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 7))
    for x, y in zip(straight, resumed, strict=True):
        for key in ("loss/train", "aux_loss/train", "grad_norm"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])


def test_mixtral_olmoe_and_gpt_oss_train_under_zero3(runs):
    """Each architecture from ln 2, its router loss at its own config's coefficient, through ZeRO-3."""
    for kind in ARCHS:
        run_dir, log = runs[kind]
        coef = {"mixtral": 0.001, "olmoe": 0.01, "gpt_oss": 0.001}[kind]
        assert f"router load-balancing loss: coefficient {coef:g} (the model config's own)" in log, kind
        train, _ = metrics(run_dir)
        assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-6), kind
        assert abs(train[-1]["loss/train"] - LN2) > 1e-6 and len(train) == 3, kind  # it trains
        assert all(math.isfinite(r["aux_loss/train"]) and r["grad_norm"] > 0 for r in train), kind
