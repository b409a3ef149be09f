"""Each preference loss added for 2026 through the real launcher, 2 CPU ranks under ZeRO-3, in the layout it is
most used with: the first step's loss is the loss's own value at policy = reference (ln 2 for the logistic
ones; times the mean WPO weight with loss.wpo), and the run trains from there."""

from __future__ import annotations

import math

import pytest

from tests.launch import ROOT, TINY, metrics, run_many, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
BETA = 0.1
EXO_EPS = 1e-3

# name: (extra arguments, the loss at policy = reference: every log-ratio 0)
RUNS = {
    "dpo_norm": (["loss=dpo_norm", "loss.beta=2", "data.layout=packed"], LN2),
    "sigmoid_norm": (["loss=sigmoid_norm", "loss.beta=2", "data.layout=shared_prompt"], LN2),
    "exo_pair": (
        ["loss=exo_pair", f"loss.label_smoothing={EXO_EPS}"],
        0.5 * (math.log(0.5) - math.log1p(-EXO_EPS)) + 0.5 * (math.log(0.5) - math.log(EXO_EPS)),
    ),
    "nca_pair": (["loss=nca_pair"], 2 * LN2),
    "bco_pair": (["loss=bco_pair"], 2 * LN2),
    "sppo_hard": (["loss=sppo_hard"], 2 * (0.5 / BETA) ** 2),
    "aot": (["loss=aot"], LN2),  # 8 pairs a rank's micro-batch, sorted together
    "aot_unpaired": (["loss=aot_unpaired", "data.layout=packed"], LN2),
    "discopop": (["loss=discopop"], 0.5 * LN2 + 0.5),
    "dpo forward_kl": (["loss=dpo", "loss.f_divergence=forward_kl"], LN2),
    "dpo_norm alpha_divergence": (
        ["loss=dpo_norm", "loss.beta=2", "loss.f_divergence=alpha_divergence", "loss.f_alpha=0.3"],
        LN2,
    ),
    "MPO mix": (["loss=[dpo_norm,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]", "loss.beta=2"], None),
    # WPO on the fused head, where no logits exist to take sum p^2 from
    "wpo": (
        ["loss=dpo", "loss.wpo=true", "data.layout=shared_prompt", "model.logprob_impl=fused_linear"],
        LN2,
    ),
    # LD-DPO and WPO: one rank's whole rows, then 2 ranks on each row (a token's place in its response and WPO's
    # per-sequence sums are the group's)
    "ld_alpha wpo one rank": (["loss=dpo", "loss.ld_alpha=0.3", "loss.wpo=true", "data.layout=packed"], LN2),
    "ld_alpha wpo sp2": (
        [
            "loss=dpo",
            "loss.ld_alpha=0.3",
            "loss.wpo=true",
            "data.layout=packed",
            "parallel.sequence_parallel_size=2",
        ],
        LN2,
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = small_demo(tmp_path_factory.mktemp("data"))
    root = tmp_path_factory.mktemp("runs")
    todo = {
        name: [
            "--ds",
            str(ROOT / "ds_configs" / "zero3.json"),
            *TINY,
            f"datasets=[{data}]",
            f"loss.beta={BETA}",
            f"run_dir={root / str(i)}",
            "lr=1e-3",
            "warmup_steps=0",
            "n_epochs=1",
            "do_first_eval=false",
            "eval_every=100000",
            *extra,
        ]  # fmt: skip
        for i, (name, (extra, _)) in enumerate(RUNS.items())
    }
    logs = run_many(root / "logs", todo, timeout=1200, one_rank=["ld_alpha wpo one rank"])
    return {name: (root / str(i), logs[name]) for i, name in enumerate(RUNS)}


@pytest.mark.parametrize("name", list(RUNS))
def test_each_loss_starts_at_its_value_at_the_reference_and_trains(runs, name):
    run_dir, _ = runs[name]
    train, _ = metrics(run_dir)
    start = RUNS[name][1]
    assert len(train) == 3 and all(math.isfinite(r["loss/train"]) for r in train), name
    if start is not None:  # WPO weighs each pair's loss: the mean of ln 2 x w is ln 2 x the mean w
        start *= train[0].get("wpo_weights/train", 1.0)
        assert train[0]["loss/train"] == pytest.approx(start, abs=1e-6), name
    if "loss.wpo=true" in RUNS[name][0]:
        assert abs(train[0]["wpo_weights/train"] - 1) > 1e-3, name  # a real weight, not 1 by construction
    assert train[0]["grad_norm"] > 0 and abs(train[-1]["loss/train"] - train[0]["loss/train"]) > 1e-6, name


def test_ld_dpo_and_wpo_under_sequence_parallelism_are_one_ranks(runs):
    base, _ = metrics(runs["ld_alpha wpo one rank"][0])
    train, _ = metrics(runs["ld_alpha wpo sp2"][0])
    for x, y in zip(base, train, strict=True):
        for key in ("loss/train", "grad_norm", "logps_train/chosen", "wpo_weights/train"):
            assert abs(x[key] - y[key]) <= 1e-5, (key, x[key], y[key])
