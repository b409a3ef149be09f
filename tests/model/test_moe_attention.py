"""The attention that is the model's own: sliding windows (Mixtral, Qwen3-MoE, gpt-oss's sliding layers) and
gpt-oss's learned sinks, in every layout and attention implementation dpo_ds would run them with.

Tiny random MoE models (fp32, 4 experts, top-2) whose sequences are longer than their windows: the per-token
log-probs dpo_ds's LogprobLM computes (built by engine.build.build_lm, the layout from data.layout.for_config)
equal the model's own eager forward on each sequence alone, and the same forward without the window (or the
sinks) is measurably different, so each comparison could fail; or the combination is refused by name before
any model is built. Sequence parallelism (2 gloo ranks, spawned) for a windowed model, and its refusals.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from dpo_ds.config import ConfigError
from dpo_ds.data.layout import for_config
from dpo_ds.data.microbatch import MicroBatch
from dpo_ds.data.tokenize import IGNORE, TokenizedSeq
from dpo_ds.model.arch import attention_features
from dpo_ds.model.lm import LogprobLM
from tests.two_ranks import on_two_ranks

VOCAB, PAD, MAX_LENGTH = 96, 0, 24
TOL = 1e-5  # fp32, the same weights: only summation order differs
DIFFERS = 1e-3  # what dropping a window or the sinks must change at least (measured: ~0.5 and more)
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts_per_tok=2, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def _config(arch: str, window: int | None = None):
    """The tiny config of each architecture, its window set where the architecture applies one (`window`
    overrides it: None keeps the architecture's own)."""
    from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    if arch == "gpt_oss":  # layer 0 sliding, layer 1 full (its default layer_types)
        return GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=4, sliding_window=window or 4)
    if arch == "mixtral":  # every layer
        return MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, sliding_window=window or 5)
    if arch == "qwen3_moe":  # every layer, only with use_sliding_window
        return Qwen3MoeConfig(
            **COMMON,
            moe_intermediate_size=32,
            num_experts=4,
            use_sliding_window=True,
            sliding_window=window or 6,
        )
    return OlmoeConfig(**COMMON, intermediate_size=32, num_experts=4)  # no window, no sinks


ARCHS = ("gpt_oss", "mixtral", "qwen3_moe", "olmoe")
WINDOWED = ("gpt_oss", "mixtral", "qwen3_moe")
# per layout, what dpo_ds runs it with: auto (CPU: dpo_ds_blocks for several segments a row, transformers'
# default for padded rows; GPU: flex_attention) and every implementation model.attn_implementation may name
ATTN = {
    "padded": ("auto", "eager", "sdpa", "dpo_ds_blocks", "flex_attention"),
    "packed": ("auto", "eager", "sdpa", "flex_attention"),
    "shared_prompt": ("auto", "eager", "sdpa", "flex_attention"),
}
CASES = [(arch, layout, attn) for arch in ARCHS for layout, attns in ATTN.items() for attn in attns]


def refusal(arch: str, layout: str, attn: str) -> str | None:
    """What the check must say for a combination that cannot reproduce the model (None: it runs), written
    from what each implementation does with a window and sinks (model/arch.py's docstring)."""
    if arch == "gpt_oss" and attn == "sdpa":
        return "gpt_oss with data.layout=.*sdpa has no place for its attention sinks"
    if arch == "gpt_oss" and attn == "flex_attention":
        return "gpt_oss with data.layout=.*FlexAttention does not return on CPU"
    if arch == "olmoe" and attn == "flex_attention":  # transformers' OLMoE has no flex_attention
        return "olmoe with data.layout=.*: transformers does not build OlmoeForCausalLM with flex_attention"
    if arch == "gpt_oss" and layout == "packed" and attn == "eager":  # its masks ignore the position ids
        return "gpt_oss with data.layout=packed, .*: GptOssForCausalLM builds its attention masks without the position ids"
    if arch in WINDOWED and layout == "shared_prompt" and attn in ("eager", "sdpa", "flex_attention"):
        mask = "FlexAttention block mask" if attn == "flex_attention" else "dense mask"
        return f"{arch} with data.layout=shared_prompt, model.attn_implementation={attn}: its sliding window .* {mask}"
    return None


def _examples(seed: int = 0, pairs: int = 4) -> list[list[TokenizedSeq]]:
    """Pairs sharing a prompt, sequences of 6-17 tokens: longer than every window here (4-6)."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 8))]
        pair = []
        for _ in range(2):
            response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 9))]
            pair.append(
                TokenizedSeq(prompt + response, [IGNORE] * len(prompt) + response, prompt_len=len(prompt))
            )
        out.append(pair)
    return out


def _sequences(examples):
    """The padded layout's numbering, written out: sequence k * pairs + e is response k of pair e."""
    return [ex[k] for k in range(len(examples[0])) for ex in examples]


@torch.no_grad()
def _alone(lm, examples) -> list[torch.Tensor]:
    """The model's own forward on each sequence alone (no padding): log p of each labelled token after the first."""
    out = []
    for s in _sequences(examples):
        logp = lm(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0].log_softmax(-1)
        out.append(
            torch.stack([logp[t - 1, s.input_ids[t]] for t in range(1, len(s)) if s.labels[t] != IGNORE])
        )
    return out


def _expected(micro, per_seq: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batch's scored tokens in its order, each from its sequence's own list (in position order)."""
    out = torch.empty(len(micro.target_seq))
    for seq, ref in enumerate(per_seq):
        mine = (micro.target_seq == seq).nonzero().flatten()
        order = mine[micro.target_pos[mine].argsort()]
        out[order] = ref
    return out


def per_token(micro: MicroBatch) -> MicroBatch:
    """The micro-batch with every scored token its own 'sequence', so LogprobLM's per-sequence sums are the
    per-token log-probs (under sequence parallelism too: set before sharding, summed over the group)."""
    m = len(micro.target_seq)
    return dataclasses.replace(micro, target_seq=torch.arange(m), n_seqs=m)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: its model directory, the weights every implementation loads, the eager per-sequence
    log-probs, and those of the same model without its window (and, for gpt-oss, without its sinks)."""
    from transformers import AutoModelForCausalLM

    examples = _examples()
    out = {}
    for arch in ARCHS:
        model_dir = tmp_path_factory.mktemp(arch)
        _config(arch).save_pretrained(model_dir)
        torch.manual_seed(ARCHS.index(arch))
        eager = AutoModelForCausalLM.from_config(
            _config(arch), attn_implementation="eager", dtype=torch.float32
        )
        state = {k: v.clone() for k, v in eager.state_dict().items()}
        plain = {}
        if arch in WINDOWED:  # a window longer than any sequence: none
            wide = AutoModelForCausalLM.from_config(_config(arch, 1 << 20), attn_implementation="eager")
            wide.load_state_dict(state)
            plain["window"] = _alone(wide.eval(), examples)
        if arch == "gpt_oss":  # sinks whose exp is 0: none
            sinkless = AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
            sinkless.load_state_dict(
                {k: torch.full_like(v, -1e9) if k.endswith("sinks") else v for k, v in state.items()}
            )
            plain["sinks"] = _alone(sinkless.eval(), examples)
        out[arch] = SimpleNamespace(
            dir=model_dir, state=state, own=_alone(eager.eval(), examples), plain=plain
        )
    return SimpleNamespace(examples=examples, arch=out)


def _run_config(model_dir, layout: str, attn: str):
    return SimpleNamespace(
        data=SimpleNamespace(layout=layout, row_tokens=0, max_tokens_per_micro_batch=0),
        max_length=MAX_LENGTH,
        model=SimpleNamespace(name_or_path=str(model_dir), attn_implementation=attn),
    )


def test_what_each_architecture_adds_to_attention(models):
    """arch.attention_features reads the configs as transformers applies them."""
    from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    got = {arch: attention_features(_config(arch)) for arch in ARCHS}
    assert (got["gpt_oss"].window, got["gpt_oss"].window_layers, got["gpt_oss"].sinks) == (4, (0,), True)
    assert (got["mixtral"].window, got["mixtral"].window_layers, got["mixtral"].sinks) == (5, (0, 1), False)
    assert (got["qwen3_moe"].window, got["qwen3_moe"].window_layers) == (6, (0, 1))
    assert (got["olmoe"].window, got["olmoe"].sinks) == (None, False)
    assert attention_features(Qwen3MoeConfig(sliding_window=6)).window is None  # use_sliding_window off
    assert attention_features(MixtralConfig()).window is None  # Mixtral's default: none
    qwen2 = Qwen2MoeConfig(
        use_sliding_window=True, sliding_window=4, num_hidden_layers=4, max_window_layers=4
    )
    assert attention_features(qwen2).window_layers == (0, 2)  # its layer_types: sliding on every other layer
    assert attention_features(Qwen2MoeConfig(num_hidden_layers=4)).window is None  # sliding_window 0: off
    big = GptOssConfig()  # its default layer_types: sliding on the even layers
    assert attention_features(big).window_layers == tuple(range(0, big.num_hidden_layers, 2))
    for arch in WINDOWED:  # the windows bind on these sequences: without them the model is another
        for name, plain in models.arch[arch].plain.items():
            diff = max((a - b).abs().max().item() for a, b in zip(plain, models.arch[arch].own))
            assert diff > DIFFERS, (arch, name, diff)


@pytest.mark.parametrize("arch, layout, attn", CASES)
def test_logps_are_the_models_own_or_refused(models, arch, layout, attn):
    from dpo_ds.engine.build import build_lm

    m = models.arch[arch]
    cfg = _run_config(m.dir, layout, attn)
    why = refusal(arch, layout, attn)
    if why is not None:
        with pytest.raises(ConfigError, match=why):
            for_config(cfg, on_cpu=True)
        return
    chosen = for_config(cfg, on_cpu=True)
    lm = build_lm(m.dir, {}, "float32", from_weights=False, attn=chosen.attn)
    lm.load_state_dict(m.state)
    micro = chosen.micro_batch(models.examples, PAD)
    got = LogprobLM(lm.eval(), "naive")(**per_token(micro).model_inputs())[0].detach()
    diff = (got - _expected(micro, m.own)).abs().max().item()
    assert diff <= TOL, (arch, layout, chosen.attn, diff)
    for name, plain in m.plain.items():  # the comparison can fail: what a dropped window or sink would give
        assert (got - _expected(micro, plain)).abs().max().item() > DIFFERS, (arch, layout, chosen.attn, name)


def test_gpt_oss_sinks_with_the_shared_prompt_dense_mask(tmp_path, models):
    """A window no shorter than max_length never binds: gpt-oss then runs shared_prompt rows on eager with the
    dense mask (the sinks are eager's own) and dpo_ds_blocks alike; its window shortened below max_length,
    the dense mask is refused again."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.engine.build import build_lm

    model_dir = tmp_path / "gpt_oss_wide"
    _config("gpt_oss", MAX_LENGTH).save_pretrained(model_dir)
    state = models.arch["gpt_oss"].state
    eager = AutoModelForCausalLM.from_config(_config("gpt_oss", MAX_LENGTH), attn_implementation="eager")
    eager.load_state_dict(state)
    own = _alone(eager.eval(), models.examples)
    eager.load_state_dict(
        {k: torch.full_like(v, -1e9) if k.endswith("sinks") else v for k, v in state.items()}
    )
    sinkless = _alone(eager, models.examples)
    for attn in ("eager", "auto"):
        chosen = for_config(_run_config(model_dir, "shared_prompt", attn), on_cpu=True)
        lm = build_lm(model_dir, {}, "float32", from_weights=False, attn=chosen.attn)
        lm.load_state_dict(state)
        micro = chosen.micro_batch(models.examples, PAD)
        got = LogprobLM(lm.eval(), "naive")(**per_token(micro).model_inputs())[0].detach()
        assert (got - _expected(micro, own)).abs().max().item() <= TOL, chosen.attn
        assert (got - _expected(micro, sinkless)).abs().max().item() > DIFFERS, chosen.attn
    cfg = _run_config(model_dir, "shared_prompt", "eager")
    cfg.max_length = MAX_LENGTH + 1
    with pytest.raises(
        ConfigError, match=r"sliding window of 24 tokens \(layers \[0\]\), shorter than max_length=25"
    ):
        for_config(cfg, on_cpu=True)


def test_refusal_messages_name_model_feature_layout_and_attention(models):
    """The exact words a user reads, for one case of each rule (ConfigError, before any model is built)."""
    cases = {
        ("mixtral", "shared_prompt", "sdpa", 1): (
            "config key 'model.attn_implementation': mixtral with data.layout=shared_prompt, "
            "model.attn_implementation=sdpa: its sliding window of 5 tokens (layers [0, 1]), shorter than "
            "max_length=24, would be dropped: the shared_prompt dense mask dpo_ds builds has none (one mask for "
            "every layer, over row positions); use model.attn_implementation=dpo_ds_blocks, or data.layout=packed"
        ),
        ("gpt_oss", "padded", "sdpa", 1): (
            "config key 'model.attn_implementation': gpt_oss with data.layout=padded, "
            "model.attn_implementation=sdpa: sdpa has no place for its attention sinks (a learned logit per "
            "head in every softmax); use eager, dpo_ds_blocks or auto"
        ),
        ("gpt_oss", "packed", "auto", 2): (
            "config key 'parallel.sequence_parallel_size': gpt_oss with data.layout=packed, "
            "model.attn_implementation=dpo_ds_blocks: its attention sinks (a learned logit per head in every "
            "softmax) cannot run under sequence parallelism (2): each rank attends with a slice of the heads and "
            "dpo_ds does not slice the sinks with them; use parallel.sequence_parallel_size=1"
        ),
        ("qwen3_moe", "padded", "sdpa", 2): (
            "config key 'model.attn_implementation': qwen3_moe with data.layout=padded, "
            "model.attn_implementation=sdpa: its sliding window of 6 tokens (layers [0, 1]), shorter than "
            "max_length=24, would be dropped under parallel.sequence_parallel_size=2: DeepSpeed's Ulysses gives "
            "sdpa no mask (plain causal); use model.attn_implementation=dpo_ds_blocks, which applies the window "
            "itself"
        ),
    }
    for (arch, layout, attn, sp), message in cases.items():
        with pytest.raises(ConfigError) as caught:
            for_config(
                _run_config(models.arch[arch].dir, layout, attn), on_cpu=True, sequence_parallel=(0, sp)
            )
        assert str(caught.value) == message
    # what sequence parallelism keeps: a window under dpo_ds_blocks, in every layout; no window, anything
    for arch, layout in (("mixtral", "padded"), ("mixtral", "packed"), ("qwen3_moe", "shared_prompt")):
        cfg = _run_config(models.arch[arch].dir, layout, "dpo_ds_blocks")
        assert for_config(cfg, on_cpu=True, sequence_parallel=(0, 2)).attn == "dpo_ds_blocks"
    assert for_config(_run_config(models.arch["olmoe"].dir, "padded", "auto"), True, (0, 2)).attn == "sdpa"


def test_auto_picks_what_keeps_the_models_attention(models):
    """auto's device-and-layout pick (flex_attention on a GPU, sdpa for padded rows under sequence
    parallelism) gives way to dpo_ds_blocks where it would drop the window or the model cannot be built with
    it; where dpo_ds_blocks cannot either (sinks under sequence parallelism) the refusal stands."""
    cases = {  # (arch, layout, on_cpu, sp size): what auto resolves to
        ("olmoe", "packed", False, 1): "dpo_ds_blocks",  # transformers builds no OLMoE on flex_attention
        ("olmoe", "packed", True, 1): "dpo_ds_blocks",
        ("mixtral", "shared_prompt", False, 1): "dpo_ds_blocks",  # flex's shared-prompt mask has no window
        ("mixtral", "packed", False, 1): "flex_attention",  # packed rows keep the window on flex
        ("qwen3_moe", "padded", True, 2): "dpo_ds_blocks",  # Ulysses gives sdpa no mask
        ("olmoe", "padded", True, 2): "sdpa",  # no window: the dense choice stands
        ("gpt_oss", "packed", False, 1): "dpo_ds_blocks",
    }
    for (arch, layout, on_cpu, sp), want in cases.items():
        got = for_config(_run_config(models.arch[arch].dir, layout, "auto"), on_cpu, (0, sp)).attn
        assert got == want, (arch, layout, on_cpu, sp, got)
    with pytest.raises(ConfigError, match=r"'parallel.sequence_parallel_size': gpt_oss"):
        for_config(_run_config(models.arch["gpt_oss"].dir, "padded", "auto"), True, (0, 2))


def _sp_worker(rank: int, dirs: dict, state_paths: dict, examples) -> dict:
    from dpo_ds.engine import sequence_parallel as engine_sp
    from dpo_ds.engine.build import build_lm

    sp = engine_sp.start_sequence_parallel(2, "dpo_ds_blocks", dirs["mixtral"], 2)
    lm = build_lm(dirs["mixtral"], {}, "float32", from_weights=False, attn="dpo_ds_blocks")
    lm.load_state_dict(torch.load(state_paths["mixtral"]))
    model = LogprobLM(lm.eval(), "naive", sp)
    result = {}
    for layout in ("padded", "packed", "shared_prompt"):
        chosen = for_config(_run_config(dirs["mixtral"], layout, "dpo_ds_blocks"), True, (sp.rank, 2))
        micro = per_token(chosen.collate(examples, PAD)).shard(sp.rank, 2)
        result[layout] = model(**micro.model_inputs())[0].detach().tolist()  # by value: no shared memory
    # a sink model the config check does not know: the sequence-parallel attention refuses it by name
    sinks = build_lm(dirs["gpt_oss"], {}, "float32", from_weights=False, attn="dpo_ds_blocks")
    try:
        sinks(
            input_ids=torch.ones(1, 8, dtype=torch.long),
            position_ids=torch.arange(8)[None],
            use_cache=False,
        )
        result["sinks"] = "ran"
    except ConfigError as e:
        result["sinks"] = str(e)
    return result


def test_sequence_parallel_window_is_the_models_own(tmp_path, models):
    """2 gloo ranks, DeepSpeed Ulysses over dpo_ds_blocks: Mixtral's window in padded, packed and shared-prompt
    rows sharded over the group gives the model's own per-token log-probs on every rank."""
    dirs = {arch: models.arch[arch].dir for arch in ("mixtral", "gpt_oss")}
    state_paths = {"mixtral": tmp_path / "mixtral.pt"}
    torch.save(models.arch["mixtral"].state, state_paths["mixtral"])
    results = on_two_ranks(_sp_worker, dirs, state_paths, models.examples, timeout=240)
    m = models.arch["mixtral"]
    for rank, result in results.items():
        assert isinstance(result, dict), (rank, result)
        for layout in ("padded", "packed", "shared_prompt"):
            chosen = for_config(_run_config(m.dir, layout, "dpo_ds_blocks"), on_cpu=True)
            whole = chosen.collate(models.examples, PAD)
            got = torch.tensor(result[layout])
            assert (got - _expected(whole, m.own)).abs().max().item() <= TOL, (rank, layout)
            assert (got - _expected(whole, m.plain["window"])).abs().max().item() > DIFFERS, (rank, layout)
        assert "gpt_oss with model.attn_implementation=dpo_ds_blocks: its attention sinks" in result["sinks"]
