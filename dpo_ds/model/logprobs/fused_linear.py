"""Per-token log p(label) straight from hidden states and the lm_head weight, without the (M, V) logits.

    x = h W^T + b                                  (M, V), only ever built (chunk, V) rows at a time
    log p[i] = x[i, y_i] - logsumexp_j x[i, j] = (x[i, y_i] - m_i) - log s_i,   s_i = sum_j exp(x[i, j] - m_i)
    dlogits[i, j] = g_i * (onehot(y_i)_j - softmax(x[i])_j)
    dL/dh = dlogits W        dL/dW = dlogits^T h        dL/db = sum_i dlogits[i]

Forward keeps, besides its inputs, only the two (M,) row stats m and log s (kept apart, as in
reference.ChunkedTokenLogprobs: x_y - m is exact, x_y - lse is not); backward recomputes each chunk's
logits from h and W. So the logits and their gradient never exist whole: the extra memory is one fp32
(chunk, V) buffer (plus one in the inputs' dtype for bf16/fp16), against the naive path's (M, V) logits,
an fp32 log-softmax and their gradients. The price is a second h W^T in backward (four matmuls, not three).

Under DeepSpeed ZeRO-3 the weight is a partitioned parameter whose storage is emptied after use and
re-gathered when needed. So backward reads the weight parameter object itself (saved with
save_for_backward, never a copy, which would be stale or empty), and, as DeepSpeed's own
LinearFunctionForZeroStage3 (deepspeed/runtime/zero/linear.py) does, gathers it there if it is still
partitioned and re-partitions it afterwards. Forward does not gather: the caller must have the weight
gathered (e.g. deepspeed.zero.register_external_parameter on the module whose forward calls this, or
GatheredParameters); a partitioned weight fails the shape check with a message that says so.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .reference import default_chunk_rows


def _zero3_partitioned(param: torch.Tensor | None) -> bool:
    """A ZeRO-3 parameter whose full data is not here now (duck-typed: no deepspeed import)."""
    return (
        param is not None
        and hasattr(param, "ds_id")
        and getattr(getattr(param, "ds_status", None), "name", None) == "NOT_AVAILABLE"
    )


@contextlib.contextmanager
def _gathered(*params: torch.Tensor | None):
    """Gather partitioned ZeRO-3 parameters for the duration, then partition them again."""
    gathered = [p for p in params if _zero3_partitioned(p)]
    for p in gathered:
        p.all_gather()
    try:
        yield
    finally:
        for p in gathered:
            p.partition()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) stay fp64."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # The matmul runs in the inputs' dtype (as the model's lm_head would), then one fresh fp32 buffer:
    # for fp32 inputs the cast is a no-op on F.linear's own output, so in-place ops on it never touch
    # an input. Autocast is off around every call (see forward), so backward recomputes the same bits.
    return F.linear(h, weight, bias).to(_acc_dtype(h.dtype))  # (c, V) x = h W^T + b


class FusedLinearLogprobs(torch.autograd.Function):
    """log p(y) from (hidden, weight, bias) in row chunks; saves the inputs and two (M,) row stats."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_rows: int, with_sq: bool = False):
        m, _ = hidden.shape
        dev = hidden.device
        valid = labels != ignore_index  # (M,)
        safe = torch.where(valid, labels, 0)  # (M,) gather needs an in-range index even where ignored
        acc = _acc_dtype(hidden.dtype)  # fp32 (fp64 for fp64 inputs)
        row_max = torch.empty(m, dtype=acc, device=dev)  # (M,) m
        log_sum = torch.empty(m, dtype=acc, device=dev)  # (M,) log s
        picked = torch.empty(m, dtype=acc, device=dev)  # (M,) x_y - m
        sq = torch.zeros(m, dtype=acc, device=dev) if with_sq else None  # (M,) log s2 (WPO, reference.py)
        # Autocast would run the matmul in another dtype than the one backward sees; compute in the
        # inputs' dtype, always (fused_linear_logprobs checks they share one).
        with torch.autocast(dev.type, enabled=False):
            for s in range(0, m, chunk_rows):
                e = min(s + chunk_rows, m)
                x = _chunk_logits(hidden[s:e], weight, bias)  # (c, V) fp32
                row_max[s:e] = x.amax(dim=-1)
                x.sub_(row_max[s:e, None])  # x - m <= 0
                picked[s:e] = x.gather(-1, safe[s:e, None]).squeeze(-1)  # x_y - m, exact
                log_sum[s:e] = x.exp_().sum(dim=-1).log_()  # log s = log sum_j exp(x_j - m)
                if sq is not None:  # log s2 = 2 log ||exp(x - m)||_2, read from the same buffer
                    sq[s:e] = 2 * torch.linalg.vector_norm(x, dim=-1).log_()
                del x  # free it before the next chunk is allocated, or two chunks are live at the peak
        # The weight object itself, not a copy: under ZeRO-3 its storage is swapped out and back in.
        ctx.save_for_backward(hidden, weight, bias, safe, valid, row_max, log_sum)
        ctx.chunk_rows = chunk_rows
        logp = torch.where(valid, picked - log_sum, 0.0)  # (M,) log p = (x_y - m) - log s
        if sq is None:
            return logp
        sq = torch.where(valid, sq - 2 * log_sum, 0.0)  # (M,) log sum_j p_j^2 = log s2 - 2 log s
        ctx.mark_non_differentiable(sq)
        return logp, sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_):  # a with_sq call's second output has no gradient
        hidden, weight, bias, safe, valid, row_max, log_sum = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        m, _ = hidden.shape
        dev = hidden.device
        # Ignored rows get g = 0, hence an exactly-zero dlogits row (softmax is finite, <= 1): they add
        # nothing to dW and db and get zero rows of dh.
        g = torch.where(valid, grad_out.to(log_sum.dtype), 0.0)  # (M,)
        # softmax * g = exp(x - m) * (g / s): the per-row factor folds 1/s and g into one multiply.
        scale = -g * torch.exp(-log_sum)  # (M,)
        # Inside _gathered the weight has its full (V, H) shape again, so allocate from it there.
        with _gathered(weight, bias), torch.autocast(dev.type, enabled=False):
            # New tensors throughout: never write a gradient into an input.
            # (M, H) hidden's dtype
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
            # (V, H) dW accumulates chunk by chunk in the weight's dtype: an fp32 (V, H) buffer would cost
            # as much as an fp32 copy of the lm_head. For bf16/fp16 each addmm_ rounds the running sum to
            # that dtype (2^-9 relative for bf16), so dW carries one rounding per chunk where the naive
            # path's single dlogits^T h matmul has one in all: typically sqrt(n_chunks) * 2^-9 of dW's
            # size, n_chunks * 2^-9 at worst (8192 tokens at V = 32000 are 63 default chunks).
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
            # (V,) db is small: accumulate it in fp32 and round once at the end.
            grad_bias = torch.zeros(weight.shape[0], dtype=log_sum.dtype, device=dev) if need_b else None
            for s in range(0, m, ctx.chunk_rows):
                e = min(s + ctx.chunk_rows, m)
                h = hidden[s:e]  # (c, H)
                p = _chunk_logits(h, weight, bias)  # (c, V) fp32, the same logits as forward
                p.sub_(row_max[s:e, None]).exp_().mul_(scale[s:e, None])  # -g softmax = -g exp(x - m) / s
                rows = torch.arange(e - s, device=dev)
                p[rows, safe[s:e]] += g[s:e]  # dlogits = g * (onehot(y) - softmax)
                if grad_bias is not None:
                    grad_bias += p.sum(dim=0)  # (V,) dL/db = sum_i dlogits[i]
                # One rounding of dlogits to the weight's dtype (a no-op for fp32), as the naive path's
                # logits.float() backward does; the matmuls below accumulate in fp32.
                dl = p.to(weight.dtype)  # (c, V)
                del p  # in fp32 dl *is* p; for bf16/fp16 the fp32 buffer goes now
                if grad_hidden is not None:
                    torch.mm(dl, weight, out=grad_hidden[s:e])  # (c, H) dL/dh = dlogits W
                if grad_weight is not None:
                    grad_weight.addmm_(dl.t(), h)  # (V, H) dL/dW += dlogits^T h
                del dl  # one chunk buffer at a time, as in forward
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    with_sq: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) under softmax(hidden @ weight.T + bias), fp32, without materialising the logits.

    hidden: (M, H) float (fp32, bf16, fp16), the final hidden states at the positions to score (already
    aligned with labels: no shift here; pass only labelled positions to skip wasted work).
    weight: (V, H) the lm_head weight, same dtype as hidden; bias: (V,) same dtype, or None.
    labels: (M,) integer; entries equal to ignore_index give 0.0 and zero gradient.
    Returns (M,) fp32 (fp64 for fp64 inputs, for gradcheck). Differentiable w.r.t. hidden, weight and
    bias; each gradient has its input's dtype. Works with tied embeddings (autograd sums this gradient
    with the embedding's).
    chunk_tokens: rows of logits per chunk; by default one fp32 (chunk, V) buffer is about 16 MiB.
    with_sq: also return log sum_j p_j^2 per row (M,), no gradient (WPO's weights; one more (M,) row stat).
    """
    if not hidden.is_floating_point() or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2D (M, H) float tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        hint = ""
        if weight.numel() == 0 and hasattr(weight, "ds_id"):
            hint = (
                " (this is a partitioned DeepSpeed ZeRO-3 parameter: call from inside the owning module's "
                "forward or gather it with deepspeed.zero.GatheredParameters / register_external_parameter)"
            )
        raise ValueError(
            f"weight must be (V, H={hidden.shape[1]}) to match hidden, got {tuple(weight.shape)}{hint}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    vocab = weight.shape[0]
    if bias is not None and (bias.shape != (vocab,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be ({vocab},) {weight.dtype} like the weight, got {tuple(bias.shape)} {bias.dtype}"
        )
    if labels.shape != hidden.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"labels must be integer of shape ({hidden.shape[0]},) like hidden's rows, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.long()
    # Out-of-range labels would be a device-side assert on GPU; fail here instead (one sync per call).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_rows(vocab)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return FusedLinearLogprobs.apply(hidden, weight, bias, labels, ignore_index, chunk_tokens, with_sq)
