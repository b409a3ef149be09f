"""Per-token log p(label) in plain torch: the naive reference and a chunked, memory-bounded version.

Both take 2D inputs: logits (N, V) of any float dtype, labels (N,) int64, already aligned (the caller
shifts). Output is fp32 (N,), exactly 0.0 where label == ignore_index.

    logp[i] = x[i, y_i] - logsumexp_j x[i, j]
    d logp[i] / d x[i, j] = onehot(y_i)_j - softmax(x[i])_j

With with_sq=True each also returns, per row, the log of the sum over the vocabulary of p^2 (WPO's weights,
Zhou et al. 2024, Eq. 2), without a gradient:

    log_sum_sq[i] = log sum_j p[i, j]^2 = logsumexp_j 2 x[i, j] - 2 logsumexp_j x[i, j] = log s2 - 2 log s,
    s = sum_j exp(x[i, j] - m),  s2 = sum_j exp(x[i, j] - m)^2

(the max m cancels; s2 >= 1 since the max term is 1, so neither log underflows).
"""

from __future__ import annotations

import torch

# Elements of one fp32 chunk (16 MiB). The chunked path never holds more than a couple of
# (chunk_rows, V) fp32 buffers, so its extra memory is bounded by this, whatever N is.
CHUNK_ELEMENTS = 1 << 22


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def naive_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, with_sq: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The reference, as in the original DPO code: materialises an fp32 (N, V) log-softmax.
    with_sq: also log sum_j p_j^2 per row (N,), from two more (N, V) fp32 temporaries, no gradient."""
    valid = labels != ignore_index  # (N,)
    safe = torch.where(valid, labels, 0)  # gather needs an in-range index even where ignored
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (N,)
    logp = torch.where(valid, logp, 0.0)
    if not with_sq:
        return logp
    with torch.no_grad():
        x = logits.float()
        sq = torch.logsumexp(2 * x, dim=-1) - 2 * torch.logsumexp(x, dim=-1)  # (N,) log sum_j p_j^2
    return logp, torch.where(valid, sq, 0.0)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward keeps only the logits (no fp32 copy) and two (N,) row stats; backward recomputes softmax.

    The row stats are the max m and log s, s = sum_j exp(x_j - m), rather than their sum lse = m + log s:
    x_y - m is exact, while x_y - lse loses |x| * eps_fp32 (0.001 at logits of 1e4), as log_softmax avoids too.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, chunk_rows: int, with_sq: bool = False):
        n, _ = logits.shape
        valid = labels != ignore_index  # (N,)
        safe = torch.where(valid, labels, 0)  # (N,) gather needs an in-range index even where ignored
        row_max = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,) m
        log_sum = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,) log s
        picked = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,) x_y - m
        sq = torch.zeros(n, dtype=torch.float32, device=logits.device) if with_sq else None  # (N,) log s2
        for s in range(0, n, chunk_rows):
            e = min(s + chunk_rows, n)
            row_max[s:e] = logits[s:e].amax(dim=-1)  # exact in any dtype
            # bf16/fp16 - fp32 promotes to fp32: one fresh (c, V) fp32 buffer, whatever the logits' dtype,
            # so the in-place ops below never touch the input.
            x = logits[s:e] - row_max[s:e, None]  # (c, V) x - m <= 0
            picked[s:e] = x.gather(-1, safe[s:e, None]).squeeze(-1)
            log_sum[s:e] = x.exp_().sum(dim=-1).log_()
            if sq is not None:  # log s2 = 2 log ||exp(x - m)||_2: no second (c, V) buffer
                sq[s:e] = 2 * torch.linalg.vector_norm(x, dim=-1).log_()
            del x  # free it before the next chunk is allocated, or two chunks are live at the peak
        ctx.save_for_backward(logits, safe, valid, row_max, log_sum)
        ctx.chunk_rows = chunk_rows
        logp = torch.where(valid, picked - log_sum, 0.0)  # log p = (x_y - m) - log s
        if sq is None:
            return logp
        sq = torch.where(valid, sq - 2 * log_sum, 0.0)  # log sum_j p_j^2 = log s2 - 2 log s
        ctx.mark_non_differentiable(sq)
        return logp, sq

    @staticmethod
    def backward(ctx, grad_out, *_):  # a with_sq call's second output has no gradient
        logits, safe, valid, row_max, log_sum = ctx.saved_tensors
        n, _ = logits.shape
        # Ignored rows get g = 0, hence an exactly-zero gradient row (softmax is finite, <= 1).
        g = torch.where(valid, grad_out.float(), 0.0)  # (N,)
        # A new tensor: never write the gradient into the caller's logits.
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V) logits' dtype
        # softmax * g = exp(x - m) * (g / s): the per-row factor folds 1/s and g into one multiply.
        scale = -g * torch.exp(-log_sum)  # (N,)
        for s in range(0, n, ctx.chunk_rows):
            e = min(s + ctx.chunk_rows, n)
            p = logits[s:e] - row_max[s:e, None]  # (c, V) fresh fp32 buffer, as in forward
            p.exp_().mul_(scale[s:e, None])  # -softmax * g
            rows = torch.arange(e - s, device=logits.device)
            p[rows, safe[s:e]] += g[s:e]  # + onehot(y) * g: d log p / dx = onehot - softmax
            grad[s:e].copy_(p)  # rounds once to the logits' dtype
            del p  # as in forward: one chunk buffer at a time
        return grad, None, None, None, None


def chunked_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    with_sq: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(logits.shape[-1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return ChunkedTokenLogprobs.apply(logits, labels, ignore_index, chunk_rows, with_sq)
