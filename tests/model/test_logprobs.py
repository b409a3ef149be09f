"""Per-token log-prob implementations against an fp64 reference: forward, gradient, edge cases.

On CPU the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set before triton is imported).
With a GPU the same tests also run on "cuda" and are the GPU parity check: conftest sets
TRITON_INTERPRET only where there is no GPU, so there the compiled kernel is tested (the CPU-tensor
triton cases then skip).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton` (the @triton.jit decorator reads it); conftest does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dpo_ds.model import logprobs
from dpo_ds.model.logprobs import available_impls, interpreter_requested, token_logprobs

IGNORE = -100
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The forward accumulates in fp32 from exactly-upcast inputs, so it is fp32-accurate for every input dtype.
FWD_TOL = dict(atol=1e-5, rtol=1e-5)
# The gradient is rounded once to the logits' dtype at the end: about one ulp of that dtype.
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-7, rtol=2**-7),
    torch.float16: dict(atol=1e-7, rtol=2**-9),
}


def skip_unless_runnable(impl: str, device: str) -> None:
    if impl != "triton":
        return
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if device == "cpu" and not interpreter_requested():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")


def fp64_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p = x[y] - logsumexp(x), in float64, written independently of the code under test."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE, 0.0, picked - lse)


def fwd_bwd(logits: torch.Tensor, labels: torch.Tensor, upstream: torch.Tensor, fn):
    """(output, d(sum(output * upstream))/d logits) for a leaf copy of logits; checks fn left it alone."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels)
    (out * upstream).sum().backward()
    assert torch.equal(x.detach(), logits), "the logits passed in were modified by forward/backward"
    return out.detach(), x.grad


def make_case(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, vocab = shape
    logits = (3 * torch.randn(shape, generator=g)).to(dtype)  # rounded to dtype once; every impl sees this
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.3] = IGNORE
    labels[0] = IGNORE  # a fully ignored sequence (3D) / row (2D)
    assert bool((labels != IGNORE).any())
    upstream = torch.randn(lead, generator=g, dtype=torch.float32)  # a non-uniform incoming gradient
    return logits.to(device), labels.to(device), upstream.to(device)


def impl_fn(impl, **kw):
    return lambda x, y: token_logprobs(x, y, IGNORE, impl=impl, **kw)


# (shape, dtype, chunk_rows, block_v): vocab is never a multiple of block_v, chunks end part-full.
CASES = [
    ((3, 37, 1000), torch.float32, 16, 512),
    ((3, 37, 1000), torch.bfloat16, 16, 512),
    ((5, 257), torch.float32, 2, 128),
    ((5, 257), torch.bfloat16, 2, 128),
    ((5, 257), torch.float16, 2, 128),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}")
def test_matches_fp64_reference_and_naive(case, impl, device):
    skip_unless_runnable(impl, device)
    shape, dtype, chunk_rows, block_v = case
    logits, labels, upstream = make_case(shape, dtype, device)

    kw = {"chunked": dict(chunk_rows=chunk_rows), "triton": dict(block_v=block_v)}.get(impl, {})
    out, grad = fwd_bwd(logits, labels, upstream, impl_fn(impl, **kw))
    ref_out, ref_grad = fwd_bwd(logits.double(), labels, upstream.double(), fp64_reference)
    naive_out, naive_grad = fwd_bwd(logits, labels, upstream, impl_fn("naive"))

    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL)
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), **GRAD_TOL[dtype])
    torch.testing.assert_close(out, naive_out, **FWD_TOL)
    torch.testing.assert_close(grad.double(), naive_grad.double(), **GRAD_TOL[dtype])

    ignored = labels == IGNORE
    assert bool((out[ignored] == 0).all()) and bool((grad[ignored] == 0).all())
    assert not bool((out[~ignored] == 0).any())  # the mask is not zeroing real positions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_extreme_logits_stay_finite(impl, dtype, device):
    skip_unless_runnable(impl, device)
    g = torch.Generator().manual_seed(1)
    n, vocab, block_v = 4, 300, 128
    logits = 1e4 * (2 * torch.randint(0, 2, (n, vocab), generator=g).float() - 1)  # (N, V) of +-1e4
    logits[1] = -1e4  # every logit equal: uniform softmax
    logits[2, :block_v] = float("-inf")  # a whole block -inf (masked vocab): the running-max NaN trap
    logits[3, 7] = 1e4
    labels = torch.tensor([5, 17, 200, 7])
    labels[0] = int((logits[0] < 0).nonzero()[0])  # a -1e4 label next to +1e4 logits: logp ~ -2e4
    logits, labels = logits.to(dtype).to(device), labels.to(device)
    upstream = torch.ones(n, device=device)

    kw = {"chunked": dict(chunk_rows=3), "triton": dict(block_v=block_v)}.get(impl, {})
    out, grad = fwd_bwd(logits, labels, upstream, impl_fn(impl, **kw))
    ref_out, ref_grad = fwd_bwd(logits.double(), labels, upstream.double(), fp64_reference)

    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL)
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), **GRAD_TOL[dtype])
    assert out[0] < -1.9e4 and abs(float(out[1]) + torch.log(torch.tensor(float(vocab)))) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_all_ignored_gives_exact_zeros(impl, device):
    skip_unless_runnable(impl, device)
    logits = torch.randn(2, 3, 50, device=device)
    labels = torch.full((2, 3), IGNORE, device=device)
    out, grad = fwd_bwd(logits, labels, torch.ones(2, 3, device=device), impl_fn(impl))
    assert torch.equal(out, torch.zeros(2, 3, device=device))
    assert torch.equal(grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_non_contiguous_logits(impl, device):
    skip_unless_runnable(impl, device)
    g = torch.Generator().manual_seed(2)
    vocab = 130
    # The usual shift: drop the last position of (B, T+1, V) logits -> a (B, T, V) non-contiguous view.
    full = torch.randn(2, 6, vocab, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (2, 5), generator=g).to(device)
    labels[1, 0] = IGNORE
    # And a vocab dim with stride != 1: the transpose of a (V, N) buffer.
    base_t = torch.randn(vocab, 7, generator=g).to(device).requires_grad_()
    labels_t = torch.randint(0, vocab, (7,), generator=g).to(device)

    kw = {"triton": dict(block_v=64)}.get(impl, {})
    for src, view, lab in ((full, lambda t: t[:, :-1, :], labels), (base_t, lambda t: t.t(), labels_t)):
        assert not view(src).is_contiguous()
        before = src.detach().clone()
        out = token_logprobs(view(src), lab, IGNORE, impl=impl, **kw)
        out.sum().backward()
        assert torch.equal(src.detach(), before)
        ref_src = src.detach().double().requires_grad_()
        ref = fp64_reference(view(ref_src), lab)
        ref.sum().backward()
        torch.testing.assert_close(out.double(), ref, **FWD_TOL)
        torch.testing.assert_close(src.grad.double(), ref_src.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_output_may_be_modified_in_place(impl, device):
    # Callers mask or scale log-probs in place; that must not invalidate what backward saved.
    skip_unless_runnable(impl, device)
    logits, labels, upstream = make_case((4, 40), torch.float32, device, seed=4)
    x = logits.clone().requires_grad_()
    out = token_logprobs(x, labels, IGNORE, impl=impl)
    out.mul_(2.0)
    (out * upstream).sum().backward()
    _, ref_grad = fwd_bwd(logits.double(), labels, 2.0 * upstream.double(), fp64_reference)
    torch.testing.assert_close(x.grad.double(), ref_grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_inplace_backward_writes_grad_into_logits(device):
    skip_unless_runnable("triton", device)
    logits, labels, upstream = make_case((6, 70), torch.float32, device, seed=3)
    # Logits as they come out of a layer (a non-leaf), which is where inplace_backward is meant to be used.
    w = torch.ones((), device=device, requires_grad=True)
    leaf = logits.clone().requires_grad_()
    produced = leaf * w
    out = token_logprobs(produced, labels, IGNORE, impl="triton", block_v=32, inplace_backward=True)
    (out * upstream).sum().backward()

    ref_out, ref_grad = fwd_bwd(logits.double(), labels, upstream.double(), fp64_reference)
    torch.testing.assert_close(out.double(), ref_out, **FWD_TOL)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, **GRAD_TOL[torch.float32])
    # Documented behaviour: the logits buffer now holds the gradient (so nothing else may read it).
    torch.testing.assert_close(produced.detach(), leaf.grad)


def test_inplace_backward_is_triton_only():
    with pytest.raises(ValueError, match="inplace_backward"):
        token_logprobs(
            torch.randn(2, 5), torch.zeros(2, dtype=torch.long), impl="chunked", inplace_backward=True
        )


def test_bad_inputs_fail_loudly():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        token_logprobs(logits, torch.full((2, 3), 10), impl="chunked")
    with pytest.raises(ValueError, match="already shifted"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), impl="fused")


def test_triton_without_gpu_or_interpreter_says_what_to_set(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "triton" not in available_impls()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), impl="triton")


def test_available_impls_lists_triton_when_runnable():
    expected = HAS_TRITON and (torch.cuda.is_available() or interpreter_requested())
    assert ("triton" in available_impls()) == expected
    assert available_impls()[:2] == ["naive", "chunked"]


def test_import_does_not_import_triton():
    code = "import sys, dpo_ds.model.logprobs; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    repo = Path(logprobs.__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)
