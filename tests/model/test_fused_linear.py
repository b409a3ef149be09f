"""fused_linear_logprobs against an fp64 F.linear -> log_softmax -> gather reference: values, the three
gradients, chunking edge cases, tied embeddings, what is saved for backward, and no in-place writes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dpo_ds.model.logprobs.fused_linear import fused_linear_logprobs
from dpo_ds.model.logprobs.reference import default_chunk_rows

IGNORE = -100

# Forward, against fp64 on the same (dtype-rounded) inputs. fp32: the logits' matmul error, ~1e-7 * |x|.
# bf16: the logits are rounded to bf16 (2^-9 relative, |x| up to ~12 here: 0.02), as the model's would be.
FWD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=0.0)}
# Gradients, max |error| relative to max |reference| (gradient entries near 0 have no relative accuracy).
# bf16: logits and dlogits are each rounded to bf16 (2^-9), and dW is re-rounded once per chunk.
GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.2e} > {rel:.0e} * max |ref| {scale:.2e}"


def make_case(m, h, v, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g).to(dtype)  # (M, H)
    weight = (torch.randn(v, h, generator=g) * (2 / h**0.5)).to(dtype)  # (V, H): logits of std ~2
    b = torch.randn(v, generator=g).to(dtype) if bias else None  # (V,)
    labels = torch.randint(0, v, (m,), generator=g)  # (M,)
    labels[torch.rand(m, generator=g) < 0.3] = IGNORE
    if m:
        labels[0] = IGNORE
    upstream = torch.randn(m, generator=g)  # (M,) a non-uniform incoming gradient
    return hidden, weight, b, labels, upstream


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def fused_fwd_bwd(hidden, weight, bias, labels, upstream, **kw):
    """(out, grad_hidden, grad_weight, grad_bias) for leaf copies; checks that no input was modified."""
    before = [None if t is None else t.clone() for t in (hidden, weight, bias, labels)]
    h, w, b = leaves(hidden, weight, bias)
    out = fused_linear_logprobs(h, w, labels, b, ignore_index=IGNORE, **kw)
    (out * upstream).sum().backward()
    for t, t0 in zip((h, w, b, labels), before):
        assert t is None or torch.equal(t.detach(), t0), "an input was modified by forward/backward"
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


def naive_logprobs(hidden, weight, bias, labels):
    """The naive path, written independently of the code under test: (M, V) logits, log_softmax, gather."""
    logits = F.linear(hidden, weight, bias)  # (M, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    logp = torch.log_softmax(logits, dim=-1)  # (M, V)
    picked = logp.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)  # (M,)
    return torch.where(labels == IGNORE, 0.0, picked)


def reference_fwd_bwd(hidden, weight, bias, labels, upstream):
    """The naive path in float64."""
    h, w, b = leaves(*(None if t is None else t.double() for t in (hidden, weight, bias)))
    out = naive_logprobs(h, w, b, labels)
    (out * upstream.double()).sum().backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


# (M, H, V, chunk_tokens): chunk not dividing M, a single chunk larger than M, one row per chunk.
SHAPES = [(37, 24, 1000, 8), (37, 24, 1000, 64), (37, 24, 1000, 1), (5, 16, 257, 2)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-H{}-V{}-chunk{}".format(*s))
def test_matches_fp64_reference(shape, dtype, bias):
    m, h, v, chunk = shape
    hidden, weight, b, labels, upstream = make_case(m, h, v, dtype, bias=bias)
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream, chunk_tokens=chunk)
    ref_out, ref_gh, ref_gw, ref_gb = reference_fwd_bwd(hidden, weight, b, labels, upstream)

    assert out.dtype == torch.float32 and out.shape == (m,)
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[dtype])
    assert_close_rel(gh, ref_gh, GRAD_REL[dtype], "grad hidden")
    assert_close_rel(gw, ref_gw, GRAD_REL[dtype], "grad weight")
    if bias:
        assert gb.dtype == dtype
        assert_close_rel(gb, ref_gb, GRAD_REL[dtype], "grad bias")

    ignored = labels == IGNORE
    assert bool((out[ignored] == 0).all()) and bool((gh[ignored] == 0).all())
    assert not bool((out[~ignored] == 0).any()) and bool((gh[~ignored] != 0).any())


def test_bf16_matches_naive_bf16_path():
    # With the same bf16 logits the rest is fp32 math, so forward and dh agree with the naive bf16 path
    # far better than with fp64; only dW differs, by its per-chunk bf16 re-rounding (5 chunks here).
    hidden, weight, b, labels, upstream = make_case(37, 24, 1000, torch.bfloat16)
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream, chunk_tokens=8)
    h, w, bb = leaves(hidden, weight, b)
    naive = naive_logprobs(h, w, bb, labels)  # bf16 logits, fp32 log-softmax
    (naive * upstream).sum().backward()
    torch.testing.assert_close(out, naive.detach(), atol=1e-5, rtol=1e-5)
    assert_close_rel(gh, h.grad, 2**-8, "grad hidden")
    assert_close_rel(gw, w.grad, 5 * 2**-8, "grad weight")


def test_float16_runs_and_matches():
    hidden, weight, b, labels, upstream = make_case(9, 8, 100, torch.float16)
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream, chunk_tokens=4)
    ref_out, ref_gh, ref_gw, ref_gb = reference_fwd_bwd(hidden, weight, b, labels, upstream)
    assert gh.dtype == gw.dtype == gb.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=0.0)  # fp16 logits: 2^-11 relative
    for got, ref, name in ((gh, ref_gh, "hidden"), (gw, ref_gw, "weight"), (gb, ref_gb, "bias")):
        assert_close_rel(got, ref, 5e-3, f"grad {name}")


def test_gradcheck_fp64():
    hidden, weight, b, labels, _ = make_case(5, 3, 7, torch.float64, seed=1)
    labels[1] = 6  # the last vocabulary entry

    def fn(h, w, bb):
        return fused_linear_logprobs(h, w, labels, bb, ignore_index=IGNORE, chunk_tokens=2)

    assert torch.autograd.gradcheck(fn, tuple(leaves(hidden, weight, b)))


def test_empty_input():
    hidden, weight, b, labels, upstream = make_case(0, 8, 50, torch.float32)
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream)
    assert out.shape == (0,) and out.dtype == torch.float32
    assert gh.shape == (0, 8)
    assert torch.equal(gw, torch.zeros(50, 8)) and torch.equal(gb, torch.zeros(50))


def test_all_ignored_gives_exact_zeros():
    hidden, weight, b, labels, upstream = make_case(6, 8, 50, torch.float32)
    labels[:] = IGNORE
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream, chunk_tokens=4)
    assert torch.equal(out, torch.zeros(6))
    assert torch.equal(gh, torch.zeros(6, 8)) and torch.equal(gw, torch.zeros(50, 8))
    assert torch.equal(gb, torch.zeros(50))


def test_non_contiguous_hidden():
    g = torch.Generator().manual_seed(3)
    m, h, v = 11, 8, 300
    _, weight, b, labels, upstream = make_case(m, h, v, torch.float32, seed=3)
    # The usual shift, hidden[:, :-1], flattened by the caller keeps a row stride of the full buffer;
    # and a transposed (H, M) buffer, whose rows are not contiguous at all.
    for base, view in (
        (torch.randn(m + 1, 2 * h, generator=g), lambda t: t[1:, ::2]),
        (torch.randn(h, m, generator=g), lambda t: t.t()),
    ):
        src = base.clone().requires_grad_()
        assert not view(src).is_contiguous()
        out = fused_linear_logprobs(view(src), weight, labels, b, ignore_index=IGNORE, chunk_tokens=3)
        (out * upstream).sum().backward()
        assert torch.equal(src.detach(), base)
        ref_src = base.double().requires_grad_()
        ref_out = naive_logprobs(view(ref_src), weight.double(), b.double(), labels)
        (ref_out * upstream.double()).sum().backward()
        torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
        assert_close_rel(src.grad, ref_src.grad, GRAD_REL[torch.float32], "grad of the viewed buffer")


def test_tied_embeddings_sum_both_gradients():
    # The lm_head weight is the input embedding: autograd must add this function's dW to the embedding's.
    torch.manual_seed(4)
    v, h, m = 97, 12, 23
    ids = torch.randint(0, v, (m,))
    labels = torch.randint(0, v, (m,))
    labels[::4] = IGNORE
    upstream = torch.randn(m)
    mix = torch.randn(h, h) / h**0.5  # (H, H) a stand-in for the transformer between embedding and head

    def run(emb: torch.nn.Embedding, head):
        hidden = torch.tanh(emb(ids) @ mix.to(emb.weight.dtype))  # (M, H)
        out = head(hidden, emb.weight)
        (out * upstream.to(out.dtype)).sum().backward()
        return out.detach(), emb.weight.grad

    emb = torch.nn.Embedding(v, h)
    ref_emb = torch.nn.Embedding(v, h).double()
    ref_emb.weight.data.copy_(emb.weight.data)
    out, grad = run(
        emb, lambda x, w: fused_linear_logprobs(x, w, labels, ignore_index=IGNORE, chunk_tokens=5)
    )

    ref_out, ref_grad = run(ref_emb, lambda x, w: naive_logprobs(x, w, None, labels))
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
    assert_close_rel(grad, ref_grad, GRAD_REL[torch.float32], "tied embedding grad")

    # Both paths contribute: the head-only gradient (hidden detached) is not the whole answer.
    head_only = emb.weight.detach().clone().requires_grad_()
    hidden = torch.tanh(emb(ids) @ mix).detach()
    (fused_linear_logprobs(hidden, head_only, labels, ignore_index=IGNORE) * upstream).sum().backward()
    assert (grad - head_only.grad).abs().max() > 1e-3


def test_masked_vocab_bias_stays_finite():
    # Padded vocabularies are masked with a -inf bias: exp(-inf - m) = 0, no NaN in either pass.
    hidden, weight, b, labels, upstream = make_case(10, 8, 64, torch.float32, seed=5)
    b[-5:] = float("-inf")
    labels[labels >= 59] = 3
    out, gh, gw, gb = fused_fwd_bwd(hidden, weight, b, labels, upstream, chunk_tokens=3)
    ref_out, ref_gh, ref_gw, ref_gb = reference_fwd_bwd(hidden, weight, b, labels, upstream)
    for t in (out, gh, gw, gb):
        assert bool(torch.isfinite(t).all())
    assert torch.equal(gb[-5:], torch.zeros(5)) and torch.equal(gw[-5:], torch.zeros(5, 8))
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL[torch.float32])
    assert_close_rel(gh, ref_gh, GRAD_REL[torch.float32], "grad hidden")
    assert_close_rel(gw, ref_gw, GRAD_REL[torch.float32], "grad weight")


def test_nothing_vocab_sized_is_saved_for_backward():
    m, h, v = 64, 8, 4096  # M * V = 262144 >> M * H + V * H = 33280
    hidden, weight, b, labels, _ = make_case(m, h, v, torch.float32)
    hl, wl, bl = leaves(hidden, weight, b)
    out = fused_linear_logprobs(hl, wl, labels, bl, ignore_index=IGNORE)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert saved and all(t.numel() < m * v for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) < m * h + v * h + v + 8 * m  # inputs + a few (M,) vectors
    # The weight parameter itself, not a copy (ZeRO-3 swaps its storage in and out).
    assert any(t is wl for t in saved)
    assert out.grad_fn.chunk_rows == default_chunk_rows(v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inputs_unchanged_and_gradients_are_new_tensors(dtype):
    # fp32 is the case to watch: there the fp32 chunk buffer is F.linear's own output, worked on in place.
    hidden, weight, b, labels, upstream = make_case(10, 8, 70, dtype, seed=8)
    h, w, bb = leaves(hidden, weight, b)
    y = labels.clone()
    out = fused_linear_logprobs(h, w, y, bb, ignore_index=IGNORE, chunk_tokens=3)
    (out * upstream).sum().backward()
    for t, t0 in ((h, hidden), (w, weight), (bb, b), (y, labels)):
        assert torch.equal(t.detach(), t0)
    storages = {t.untyped_storage().data_ptr() for t in (h, w, bb, y)}
    assert not storages & {t.grad.untyped_storage().data_ptr() for t in (h, w, bb)}


def test_output_may_be_modified_in_place():
    # Callers mask or scale log-probs in place; that must not invalidate what backward saved.
    hidden, weight, b, labels, upstream = make_case(9, 8, 100, torch.float32, seed=6)
    h, w, bb = leaves(hidden, weight, b)
    out = fused_linear_logprobs(h, w, labels, bb, ignore_index=IGNORE, chunk_tokens=4)
    out.mul_(2.0)
    (out * upstream).sum().backward()
    _, ref_gh, ref_gw, _ = reference_fwd_bwd(hidden, weight, b, labels, 2.0 * upstream)
    assert_close_rel(h.grad, ref_gh, GRAD_REL[torch.float32], "grad hidden")
    assert_close_rel(w.grad, ref_gw, GRAD_REL[torch.float32], "grad weight")


def test_frozen_weight_gets_no_gradient_work():
    hidden, weight, _, labels, upstream = make_case(7, 8, 60, torch.float32)
    (h,) = leaves(hidden)
    out = fused_linear_logprobs(h, weight, labels, ignore_index=IGNORE, chunk_tokens=3)
    (out * upstream).sum().backward()
    _, ref_gh, _, _ = reference_fwd_bwd(hidden, weight, None, labels, upstream)
    assert weight.grad is None
    assert_close_rel(h.grad, ref_gh, GRAD_REL[torch.float32], "grad hidden")


def fake_zero3_param(full: torch.Tensor) -> torch.nn.Parameter:
    """A Parameter that acts like a ZeRO-3 one: partition() empties its storage, all_gather() refills it."""
    p = torch.nn.Parameter(full.clone())
    p.ds_id = 0
    p.gathers = 0

    def all_gather():
        p.data = full.clone()  # a new storage, as after a real all-gather
        p.ds_status = SimpleNamespace(name="AVAILABLE")
        p.gathers += 1

    def partition():
        p.data = torch.empty(0, dtype=full.dtype)
        p.ds_status = SimpleNamespace(name="NOT_AVAILABLE")

    p.all_gather, p.partition = all_gather, partition
    p.ds_status = SimpleNamespace(name="AVAILABLE")
    return p


def test_zero3_partitioned_weight_is_regathered_in_backward():
    hidden, weight, _, labels, upstream = make_case(13, 8, 90, torch.float32, seed=7)
    w = fake_zero3_param(weight)
    (h,) = leaves(hidden)
    out = fused_linear_logprobs(h, w, labels, ignore_index=IGNORE, chunk_tokens=4)
    w.partition()  # what ZeRO-3 does once the owning module's forward is done
    gh, gw = torch.autograd.grad((out * upstream).sum(), [h, w])
    _, ref_gh, ref_gw, _ = reference_fwd_bwd(hidden, weight, None, labels, upstream)
    assert_close_rel(gh, ref_gh, GRAD_REL[torch.float32], "grad hidden")
    assert_close_rel(gw, ref_gw, GRAD_REL[torch.float32], "grad weight")
    assert w.gathers == 1 and w.numel() == 0 and w.ds_status.name == "NOT_AVAILABLE"  # partitioned again

    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_logprobs(h, w, labels, ignore_index=IGNORE)


def test_bad_inputs_fail_loudly():
    hidden, weight, b, labels, _ = make_case(4, 8, 50, torch.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_linear_logprobs(hidden, weight, torch.full((4,), 50))
    with pytest.raises(ValueError, match="labels must be integer of shape"):
        fused_linear_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_logprobs(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_logprobs(hidden, weight, labels, b[:10])
    with pytest.raises(ValueError, match="hidden must be"):
        fused_linear_logprobs(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_logprobs(hidden, weight, labels, chunk_tokens=0)


# ----------------------------------------------------------------------------- inside the model wrapper


@pytest.mark.parametrize("tied", [False, True])
def test_logprob_lm_fused_head_matches_naive(tied):
    """model.LogprobLM with logprob_impl=fused_linear gives the naive path's per-sequence log-probs
    and parameter gradients, tied embeddings or not; generation (head(hidden)) still gets logits."""
    from transformers import AutoModelForCausalLM

    from dpo_ds.data.collate import collate_padded
    from dpo_ds.data.tokenize import TokenizedSeq
    from dpo_ds.model.files import SHIPPED_MODELS, load_config
    from dpo_ds.model.lm import LogprobLM, sequence_logps

    config = load_config(SHIPPED_MODELS["tiny"])
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    seqs = [
        [
            TokenizedSeq([1, 5, 6, 7, 8, 2], [-100, -100, 6, 7, 8, 2]),
            TokenizedSeq([1, 5, 9, 2], [-100, -100, 9, 2]),
        ]
    ]
    batch = collate_padded(seqs, 0)
    out = {}
    for impl in ("naive", "fused_linear"):
        lm = AutoModelForCausalLM.from_config(config)
        lm.load_state_dict(base.state_dict())
        model = LogprobLM(lm, impl)
        s = sequence_logps(model, batch)
        s.logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        out[impl] = (s.logps.detach(), grads)
        assert lm.get_output_embeddings()(torch.zeros(1, config.hidden_size)).shape == (1, config.vocab_size)
    assert torch.allclose(out["naive"][0], out["fused_linear"][0], atol=1e-5)
    assert out["naive"][1].keys() == out["fused_linear"][1].keys()
    for name, g in out["naive"][1].items():
        assert torch.allclose(g, out["fused_linear"][1][name], atol=1e-5), name
