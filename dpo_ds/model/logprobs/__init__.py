"""Per-token log p(label) behind one function, with three interchangeable implementations.

    naive    log_softmax(logits.float()).gather(labels): the reference, an fp32 (N, V) copy lives until backward
    chunked  plain torch, rows in chunks; saves only logits + two (N,) row stats, recomputes softmax
    triton   one Triton program per row, online logsumexp over vocabulary blocks

Triton is imported only when impl="triton" is asked for, so this package imports fast anywhere.

A fourth path never has the logits at all: fused_linear.fused_linear_logprobs takes the final hidden
states and the lm_head weight and computes the log-probs in chunks of tokens, forward and backward
(model.logprob_impl=fused_linear; model.LogprobLM runs it inside the lm_head module's call).

Each path can also return, per token, log sum_j p_j^2 over the vocabulary (with_sq=True, WPO's weights,
reference.py has the formula) from the pass it already makes, without keeping the logits.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import chunked_token_logprobs, naive_token_logprobs

IMPLS = ("naive", "chunked", "triton")

__all__ = [
    "IMPLS",
    "available_impls",
    "chunked_token_logprobs",
    "interpreter_requested",
    "naive_token_logprobs",
    "token_logprobs",
    "triton_unavailable_reason",
]


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (the values triton itself reads as true)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(on_cpu: bool | None = None) -> str | None:
    """Why the Triton kernel cannot run here, or None when it can; on_cpu: the run's ranks are CPU
    processes (whatever GPU the machine has), None: as torch sees the machine."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if interpreter_requested():
        return None
    if on_cpu:
        return (
            "the ranks run on CPU and TRITON_INTERPRET is not set: set TRITON_INTERPRET=1 in the environment "
            "to run the kernel under the Triton interpreter (slow, for tests)"
        )
    if not torch.cuda.is_available():
        return (
            "no CUDA device and TRITON_INTERPRET is not set: set TRITON_INTERPRET=1 in the environment "
            "before importing triton to run the kernel under the Triton interpreter (slow, for tests)"
        )
    return None


def available_impls() -> list[str]:
    """The implementations that can run here; 'triton' needs CUDA or TRITON_INTERPRET=1."""
    impls = ["naive", "chunked"]
    if triton_unavailable_reason() is None:
        impls.append("triton")
    return impls


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "naive",
    *,
    chunk_rows: int | None = None,
    block_v: int | None = None,
    inplace_backward: bool = False,
    with_sq: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) under softmax(logits), fp32, 0.0 (and zero gradient) where labels == ignore_index.

    logits: (..., V) any float dtype; labels: (...) int64, already aligned with logits (no shift here).
    Returns (...) fp32. Differentiable w.r.t. logits; the gradient has the logits' dtype.
    chunk_rows: rows per chunk for impl="chunked" (default keeps a chunk around 16 MiB of fp32).
    block_v: vocabulary block for impl="triton" (power of two).
    inplace_backward: impl="triton" only; writes the gradient over the logits buffer (see
    triton_kernel.triton_token_logprobs for when that is safe).
    with_sq: return (log p, log sum_j p_j^2), the second (...) fp32 without a gradient, 0.0 where ignored.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if inplace_backward and impl != "triton":
        raise ValueError("inplace_backward is only supported by impl='triton'")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])} (labels are expected already shifted)"
        )
    vocab = logits.shape[-1]
    labels = labels.long()
    # The kernels would read out of bounds silently on a bad label; fail here instead. On a GPU this
    # is one small reduction and a sync per call.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")

    lead = labels.shape
    logits2d = logits.reshape(-1, vocab)  # (N, V); copies only when the layout can't be viewed as 2D
    labels1d = labels.reshape(-1)  # (N,)
    if impl == "naive":
        out = naive_token_logprobs(logits2d, labels1d, ignore_index, with_sq=with_sq)
    elif impl == "chunked":
        out = chunked_token_logprobs(logits2d, labels1d, ignore_index, chunk_rows=chunk_rows, with_sq=with_sq)
    else:
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run: {reason}")
        from .triton_kernel import DEFAULT_BLOCK_V, triton_token_logprobs

        out = triton_token_logprobs(
            logits2d,
            labels1d,
            ignore_index,
            block_v=block_v or DEFAULT_BLOCK_V,
            inplace_backward=inplace_backward,
            with_sq=with_sq,
        )
    if with_sq:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
