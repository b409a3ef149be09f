"""(g) of bench/gpu_check.sh, the Mixture-of-Experts half of `gpu_check.py dpo --moe`: the model it writes,
its total and active parameter counts, which experts implementation transformers runs, and the report's rows.

The model is a random transformers Qwen3-MoE (Qwen3MoeForCausalLM): on the GPU 0.91B parameters in all,
0.18B active per token (hidden 1024, 16 layers, 16 heads of 64, 4 KV heads, 32 experts of width 512, top-4,
vocab 32000, untied). MFU is counted on the active parameters (ACTIVE_RULE).
"""

from __future__ import annotations

import json
from pathlib import Path

GIB = 2**30
ACTIVE_RULE = (
    "active = attention (every self_attn weight: q/k/v/o projections and the q/k RMSNorm weights) + router "
    "(mlp.gate) + top_k/num_experts of every layer's experts (gate_up_proj + down_proj) + lm_head; "
    "embeddings and the decoder's RMSNorm weights (input/post-attention/final) are not counted"
)


def moe_shape(cpu_smoke: bool) -> dict:
    if cpu_smoke:
        return dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=4, top_k=2,
                    moe_intermediate=32, vocab=1000)  # fmt: skip
    return dict(hidden=1024, layers=16, heads=16, kv_heads=4, head_dim=64, experts=32, top_k=4,
                moe_intermediate=512, vocab=32000)  # fmt: skip


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def param_counts(model, top_k: int, experts: int) -> dict:
    """Total and per-token active parameters of a transformers Qwen3-MoE, by parameter name (ACTIVE_RULE)."""
    parts = dict(embeddings=0, norms=0, attention=0, router=0, experts=0, lm_head=0, other=0)
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            key = "embeddings"
        elif name.endswith("layernorm.weight") or name == "model.norm.weight":
            key = "norms"
        elif ".self_attn." in name:
            key = "attention"
        elif ".mlp.experts." in name:
            key = "experts"  # (experts, 2 * moe_intermediate, hidden) and (experts, hidden, moe_intermediate)
        elif ".mlp.gate." in name:
            key = "router"  # (experts, hidden)
        elif name.startswith("lm_head."):
            key = "lm_head"
        else:
            key = "other"  # a dense MLP (mlp_only_layers): active on every token
        parts[key] += p.numel()
    total = sum(parts.values())
    active_experts = parts["experts"] * top_k // experts
    active = parts["attention"] + parts["router"] + active_experts + parts["lm_head"] + parts["other"]
    return dict(n_params=total, n_active=active, params_by_part=parts, n_active_experts=active_experts)


def _grouped_mm_kernel(model) -> str:
    """What transformers' grouped_mm experts run on this device: torch's grouped GEMM or its own fallback."""
    import torch

    try:
        from transformers.integrations.moe import _can_use_grouped_mm  # private: absent in some versions

        w = model.model.layers[0].mlp.experts.down_proj  # (experts, hidden, moe_intermediate)
        x = torch.zeros(8, w.shape[-1], device=w.device, dtype=w.dtype)
        offs = torch.full((w.shape[0],), 8, device=w.device, dtype=torch.int32)
        if not _can_use_grouped_mm(x, w, offs):
            return "transformers' fallback (a loop over experts)"
    except Exception as e:  # the probe only labels the row
        return f"unknown ({type(e).__name__}: {str(e)[:80]})"
    fn = (
        "torch.nn.functional.grouped_mm"
        if hasattr(torch.nn.functional, "grouped_mm")
        else "torch._grouped_mm"
    )
    return fn


def _build(config_kwargs: dict, requested: str | None, device):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**config_kwargs, **({"experts_implementation": requested} if requested else {}))
    with torch.device(device):  # initialised on the device: seconds for 1B params, not minutes on CPU
        return Qwen3MoeForCausalLM(config)


def write_moe_model(model_dir: Path, shape: dict, device, dtype) -> dict:
    """Write a random Qwen3-MoE to model_dir, asking for experts_implementation=grouped_mm in its config.json
    (transformers' config __init__ takes that key; from_pretrained then builds with it, and raises rather than
    falling back to eager if the class cannot run it). Returns the counts and the implementation used."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_kwargs = dict(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
        num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
        moe_intermediate_size=shape["moe_intermediate"], intermediate_size=4 * shape["hidden"],
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        rms_norm_eps=1e-6, attention_dropout=0.0, use_sliding_window=False, sliding_window=None,
    )  # fmt: skip
    torch.manual_seed(0)
    requested, refused = "grouped_mm", None
    try:
        model = _build(config_kwargs, requested, device)
    except Exception as e:  # this transformers cannot run grouped_mm for the model: its own default
        requested, refused = None, f"{type(e).__name__}: {str(e)[:160]}"
        model = _build(config_kwargs, None, device)
    model = model.to(dtype)
    info = param_counts(model, shape["top_k"], shape["experts"])
    used = getattr(model.config, "_experts_implementation", None)
    info.update(
        experts_impl_built=used, grouped_mm_kernel=_grouped_mm_kernel(model) if used == "grouped_mm" else None
    )
    model.save_pretrained(str(model_dir), safe_serialization=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if requested:  # save_pretrained drops the resolved choice (_experts_implementation_internal): ask by key
        path = model_dir / "config.json"
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "experts_implementation": requested}, indent=2)
        )
    # what the run's from_pretrained will build: the same resolution, from the saved config (no weights)
    with torch.device("meta"):
        reloaded = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    info.update(
        experts_impl_requested=requested,
        experts_impl_refused=refused,
        experts_impl=getattr(reloaded.config, "_experts_implementation", None),
        active_rule=ACTIVE_RULE,
    )
    print(
        f"dpo --moe: Qwen3-MoE {_count(info['n_params'])} total, {_count(info['n_active'])} active "
        f"({info['params_by_part']}); experts_implementation requested {requested}, built "
        f"{used}, from config.json {info['experts_impl']}; grouped_mm runs on {info['grouped_mm_kernel']}",
        flush=True,
    )
    return info


def report_rows(moe: dict | None) -> list[str]:
    """(g): one row per layout of `gpu_check.py dpo --moe`."""
    if moe is None:
        return ["| (g) MoE DPO steps | | | | | | no result (timed out or crashed; see the log) |"]
    if "skipped" in moe:
        return [f"| (g) MoE DPO steps | | | | | | SKIPPED: {moe['skipped']} |"]
    s, rows = moe["shape"], []
    for layout, run in (moe.get("runs") or {}).items():
        if "tokens_per_s" not in run:
            rows.append(
                f"| (g) MoE DPO steps, {layout} | | | | | | {run.get('status', 'no result')} (no step finished) |"
            )
            continue
        case = (
            f"Qwen3-MoE {_count(moe['n_params'])} total / {_count(moe['n_active'])} active, {s['experts']} "
            f"experts top-{s['top_k']}, ZeRO-{run['zero']} {run['dtype']} policy+ref, {run['batch_pairs']} pairs/step, "
            f"{layout}, {run['logprob_impl']}, experts {moe.get('experts_impl')}"
            + (f" on {moe['grouped_mm_kernel']}" if moe.get("grouped_mm_kernel") else "")
        )
        mfu = (
            "-"
            if run.get("mfu") is None
            else f"MFU {run['mfu']:.1%} ({run['mfu_with_ref']:.1%} incl. ref), active params"
        )
        losses = ", ".join(f"{x:.4f}" for x in run["first_losses"])
        aux = ", ".join(f"{x:.4g}" for x in run.get("first_aux") or []) or "none logged"
        rows.append(
            f"| (g) MoE DPO steps | {case} | {run['step_s']:.2f} s/step | {run['tokens_per_s']:,.0f} real tok/s "
            f"| {mfu} | {run['peak_gib']:.1f} GiB | {run['status']}; {run['timed_steps']} timed steps, "
            f"losses {losses}; aux_loss/train {aux} |"
        )
    return rows


def problems(moe: dict | None) -> list[str]:
    """(g)'s runs that did not finish their steps, or ran without the router loss (aux_loss/train)."""
    bad = []
    for layout, run in ((moe or {}).get("runs") or {}).items():
        if "tokens_per_s" not in run or run.get("status") != "ok":
            bad.append(f"(g) {layout}: {run.get('status', 'no result')}")
        elif not run.get("first_aux"):
            bad.append(f"(g) {layout}: no aux_loss/train in its metrics (router loss off?)")
    return bad
