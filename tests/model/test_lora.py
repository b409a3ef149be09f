"""LoRA through peft without a launcher: the adapters-off forward is the base model's, in every layout
and log-prob path; targets are checked on the meta model; an adapter merged into a base gives the
peft model's outputs; an adapter archive names its base."""

from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from dpo_ds.config import ConfigError, load_config  # noqa: E402
from dpo_ds.data.collate import collate_padded  # noqa: E402
from dpo_ds.data.packing import collate_packed  # noqa: E402
from dpo_ds.data.shared_prompt import collate_shared  # noqa: E402
from dpo_ds.model import adapters  # noqa: E402
from dpo_ds.model.files import SHIPPED_MODELS, load_tokenizer, random_init_state  # noqa: E402
from dpo_ds.model.files import load_config as load_model_config  # noqa: E402
from dpo_ds.model.lm import LogprobLM, sequence_logps  # noqa: E402
from tests.data.test_shared_prompt import _examples  # noqa: E402

TINY = SHIPPED_MODELS["tiny"]


def _settings(**kw):
    return load_config(None, [f"model.lora.{k}={v}" for k, v in {"r": 4, **kw}.items()]).model.lora


def _base():
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(load_model_config(TINY), dtype=torch.float32)
    lm.load_state_dict(random_init_state(TINY, seed=3))
    return lm.eval()


def _lora(lm, seed=0, nonzero_b=True):
    model = adapters.wrap(lm, _settings(), seed=seed, gradient_checkpointing=False, base=TINY)
    if nonzero_b:  # a trained adapter: B no longer zero, so the adapters change the outputs
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


LAYOUTS = {
    "padded": lambda ex, pad: collate_padded(ex, pad),
    "packed": lambda ex, pad: collate_packed(ex, pad, row_len=64),
    "shared_prompt": lambda ex, pad: collate_shared(ex, pad, row_len=64),
}


@pytest.mark.parametrize("impl", ["naive", "chunked", "fused_linear"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_adapters_off_is_the_base_model(tok, layout, impl):
    """The reference of a LoRA run: the same model with its adapters off gives the plain base model's
    per-sequence log-probs exactly; with the adapters on (B trained) it does not; at init (B zero) the
    adapters add nothing, so step 0 of DPO is ln 2."""
    from dpo_ds.model.attention import register

    register()
    base = _base()
    attn = "dpo_ds_blocks" if layout != "padded" else None
    if attn:
        base.config._attn_implementation = attn
    plain = LogprobLM(copy.deepcopy(base), impl)
    batch = LAYOUTS[layout](_examples(tok, 6, seed=1), tok.pad_token_id)
    want = sequence_logps(plain, batch).logps
    policy = LogprobLM(_lora(copy.deepcopy(base)), impl)
    with torch.no_grad(), policy.lm.disable_adapter():
        off = sequence_logps(policy, batch).logps
    on = sequence_logps(policy, batch).logps
    assert torch.equal(off, want), (off - want).abs().max()
    assert (on - want).abs().max() > 1e-3
    fresh = LogprobLM(_lora(copy.deepcopy(base), nonzero_b=False), impl)
    assert torch.equal(sequence_logps(fresh, batch).logps, want)


def test_only_the_adapters_train_and_checkpointing_gives_them_gradients(tok):
    base = _base()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    model = adapters.wrap(base, _settings(), seed=0, gradient_checkpointing=True, base=TINY)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = LogprobLM(model, "fused_linear")
    batch = collate_padded(_examples(tok, 4, seed=2), tok.pad_token_id)
    sequence_logps(wrapped, batch).logps.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n) or any(
        g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n
    )
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_targets_are_checked_before_any_engine():
    wrapped = adapters.check_targets(_settings(), TINY)
    kinds = {name.rsplit(".", 1)[-1] for name in wrapped}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in wrapped
    assert adapters.check_targets(_settings(target_modules="[q_proj,v_proj]"), TINY) == sorted(
        n for n in wrapped if n.endswith(("q_proj", "v_proj"))
    )
    with pytest.raises(
        adapters.AdapterError, match=r"model.lora.target_modules.*'qkv' matches no module.*q_proj"
    ):
        adapters.check_targets(_settings(target_modules="[q_proj,qkv]"), TINY)
    with pytest.raises(adapters.AdapterError, match="lm_head cannot take an adapter"):
        adapters.check_targets(_settings(target_modules="[lm_head]"), TINY)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.lora.r=-1"], "model.lora.r"),
        (["model.reference_mode=adapters_off"], "adapters_off, which needs LoRA"),
        (["model.lora.r=8", "model.reference_mode=engine"], "second copy of the base model"),
        (["model.lora.r=8", "model.lora.adapter_dtype=float16"], "model.lora.adapter_dtype"),
        (["model.lora.r=8", "model.lora.dropout=1"], "model.lora.dropout"),
    ],
)
def test_lora_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_reference_mode_defaults_by_lora():
    assert load_config(None, []).model.reference_mode == "engine"
    assert load_config(None, ["model.lora.r=8"]).model.reference_mode == "adapters_off"
    assert (
        load_config(None, ["model.lora.r=8", "model.reference_mode=precomputed"]).model.reference_mode
        == "precomputed"
    )


def test_a_merged_adapter_gives_the_peft_models_outputs(tmp_path, tok):
    """engine.build.merge_adapter (peft's merge, layer by layer) on a plain model: its forward equals the peft
    model's with the adapter on, and the modules are the base's again."""
    from dpo_ds.engine.build import merge_adapter

    trained = _lora(_base())
    trained.save_pretrained(str(tmp_path / "adapter"))
    batch = collate_padded(_examples(tok, 4, seed=5), tok.pad_token_id)
    want = sequence_logps(LogprobLM(trained, "naive"), batch).logps
    base = _base()
    merge_adapter(base, tmp_path / "adapter")
    assert not any("lora" in n for n, _ in base.named_parameters())
    got = sequence_logps(LogprobLM(base, "naive"), batch).logps
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_an_adapter_archive_must_name_this_runs_base(tmp_path):
    from dpo_ds.run.dir import ArchiveError, mark_complete
    from dpo_ds.run.start import starting_point

    step = tmp_path / "run" / "step-16"
    step.mkdir(parents=True)
    (step / adapters.ADAPTER_CONFIG).write_text(
        json.dumps({"base_model_name_or_path": str(SHIPPED_MODELS["demo"])})
    )
    mark_complete(step, {"step": 1, "config": {"seed": 5, "model": {"init": "auto", "archive": None}}})
    with pytest.raises(
        ArchiveError, match=r"a LoRA adapter trained on .*demo/model, but model.name_or_path is .*tiny"
    ):
        starting_point(TINY, "auto", str(step), 0)
    (step / adapters.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(TINY)}))
    start = starting_point(TINY, "auto", str(step), 0)
    # its base is that run's own start: the shipped config's seeded init with that run's seed (5), not ours
    assert start.adapters == [step.resolve()] and start.seed == 5 and "seed 5" in start.describe()


def test_an_adapter_archive_accepts_its_base_moved(tmp_path):
    """The base directory moved (or another install's copy of a shipped config): the same config.json is
    the same base; a different one is not."""
    import shutil

    from dpo_ds.run.dir import ArchiveError, mark_complete
    from dpo_ds.run.start import starting_point

    moved = tmp_path / "moved-tiny"
    shutil.copytree(TINY, moved)
    step = tmp_path / "run" / "step-16"
    step.mkdir(parents=True)
    (step / adapters.ADAPTER_CONFIG).write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "gone")})
    )
    mark_complete(
        step, {"step": 1, "config": {"seed": 1, "model": {"name_or_path": str(moved), "init": "random"}}}
    )
    with pytest.raises(ArchiveError, match="a LoRA adapter trained on"):
        starting_point(TINY, "auto", str(step), 0)  # its base is nowhere to compare: refused
    (step / adapters.ADAPTER_CONFIG).write_text(json.dumps({"base_model_name_or_path": str(moved)}))
    assert starting_point(TINY, "auto", str(step), 0).adapters == [step.resolve()]  # same config.json
    (moved / "config.json").write_text((SHIPPED_MODELS["demo"] / "config.json").read_text())
    with pytest.raises(ArchiveError, match="a LoRA adapter trained on"):
        starting_point(TINY, "auto", str(step), 0)
