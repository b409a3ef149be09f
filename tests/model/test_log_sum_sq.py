"""WPO's per-token log sum_j p_j^2 from every log-prob path (naive, chunked, Triton, fused_linear) against a
plain fp64 torch computation: the value, zero where ignored, no gradient, and log p and its gradient unchanged.

On CPU the Triton kernel runs under the interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU);
with a GPU the same tests run on "cuda" too (bench/gpu_check.sh runs this file there).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dpo_ds.model.logprobs import token_logprobs
from dpo_ds.model.logprobs.fused_linear import fused_linear_logprobs
from tests.model.test_logprobs import DEVICES, IGNORE, skip_unless_runnable

IMPLS = ["naive", "chunked", "triton", "fused_linear"]


def fp64_log_sum_sq(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log sum_j softmax(x)_j^2, in float64 straight from its definition (the probabilities squared and summed)."""
    p = torch.softmax(logits.double(), dim=-1)
    return torch.where(labels == IGNORE, 0.0, (p * p).sum(dim=-1).log())


def run(impl: str, hidden, weight, labels, **kw):
    """(log p, log sum p^2) of one path on logits = hidden @ weight.T; fused_linear never forms those logits."""
    if impl == "fused_linear":
        return fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE, with_sq=True, **kw)
    logits = hidden @ weight.t()
    return token_logprobs(logits, labels, IGNORE, impl=impl, with_sq=True, **kw)


def case(dtype, device, n=37, h=16, v=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).to(device)
    weight = torch.randn(v, h, generator=g).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE
    return hidden, weight, labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_fp64(impl, dtype, device):
    skip_unless_runnable(impl, device)
    hidden, weight, labels = case(dtype, device)
    kw = {"chunked": dict(chunk_rows=5), "triton": dict(block_v=64), "fused_linear": dict(chunk_tokens=6)}
    logp, sq = run(impl, hidden, weight, labels, **kw.get(impl, {}))
    logits = (
        hidden @ weight.t()
    ).double()  # the logits the path saw (fused_linear: in the inputs' dtype too)
    want = fp64_log_sum_sq(logits, labels)
    assert sq.dtype == torch.float32 and sq.shape == labels.shape
    assert not sq.requires_grad
    torch.testing.assert_close(sq.double().cpu(), want.cpu(), atol=2e-5, rtol=1e-5)
    assert bool((sq[labels == IGNORE] == 0).all())
    assert bool((sq[labels != IGNORE] < 0).all())  # sum p^2 < 1 unless one token holds all the mass
    # the values really vary by row: a constant would not pass the comparison above by chance
    assert float(want[labels != IGNORE].std()) > 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_log_p_and_its_gradient_are_unchanged(impl, device):
    skip_unless_runnable(impl, device)
    hidden, weight, labels = case(torch.float32, device, seed=1)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(2)).to(device)
    grads = []
    for with_sq in (False, True):
        h = hidden.clone().requires_grad_()
        if impl == "fused_linear":
            out = fused_linear_logprobs(h, weight, labels, ignore_index=IGNORE, with_sq=with_sq)
        else:
            out = token_logprobs(h @ weight.t(), labels, IGNORE, impl=impl, with_sq=with_sq)
        logp = out[0] if with_sq else out
        (logp * upstream).sum().backward()
        grads.append((logp.detach(), h.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["naive", "chunked", "triton"])
def test_one_token_holding_the_mass_gives_zero_and_uniform_gives_minus_log_v(impl):
    skip_unless_runnable(impl, "cpu")
    v = 50
    logits = torch.zeros(2, v)
    logits[0, 3] = 200.0  # p = (1, 0, ...): sum p^2 = 1
    _, sq = token_logprobs(logits, torch.tensor([3, 7]), IGNORE, impl=impl, with_sq=True, **(
        {"block_v": 16} if impl == "triton" else {}))  # fmt: skip
    torch.testing.assert_close(sq, torch.tensor([0.0, -torch.log(torch.tensor(float(v)))]), atol=1e-6, rtol=0)
