"""Per-token log p(label) as Triton kernels: kernel -> host launch -> autograd.Function.

One program per row. Forward: an online logsumexp over vocabulary blocks in fp32 (reads bf16/fp16/fp32),
    m_k = max(m_{k-1}, max_j x_j),  s_k = s_{k-1} * exp(m_{k-1} - m_k) + sum_j exp(x_j - m_k),
    log p = (x_y - m) - log s.
m and log s are kept apart (not summed into lse): x_y - m is exact, x_y - lse would lose |x| * eps_fp32.
The same pass keeps s2 = sum_j exp(x_j - m)^2 (rescaled by exp(m_old - m_new)^2) and stores WPO's
log sum_j p_j^2 = log s2 - 2 log s per row: one multiply-add per element and one (N,) fp32 store, so it is
always computed and handed out only when asked for (reference.py has the formula).
Backward: d log p / d x_j = onehot(y)_j - exp(x_j - m - log s), times the incoming gradient.

On CPU this runs under the Triton interpreter, which needs TRITON_INTERPRET=1 in the environment
before this module (or triton) is imported: the @triton.jit decorator picks the interpreter then.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_V = 1024

# Compile specs: how each @triton.jit function in this module is compiled for a real GPU target on a machine
# without one (tests/test_triton_compile.py, bench/triton_kernels.py). One entry per kernel, written right
# below it, so a change to a kernel's arguments or to its host launch is made next to its spec. Keys:
#   signature        argument -> Triton type as the JIT specialises the host launch: "*bf16" a pointer to
#                    bf16, "i32" a Python int in [-2**31, 2**31), "constexpr" a tl.constexpr argument;
#                    "{logits}" stands for each dtype in `dtypes`.
#   dtypes           placeholder -> the Triton dtypes it takes; every combination is compiled.
#   constexprs       constexpr argument -> the values the host code passes.
#   divisible_by_16  variant -> the arguments the JIT marks tt.divisibility=16 in it: a tensor whose
#                    data_ptr() % 16 == 0 (every fresh torch allocation) or an int % 16 == 0 (vocab 32000 or
#                    128256, not GPT-2's 50257). Each variant is compiled: they generate different code.
# tests/test_triton_compile.py launches the host functions below and fails unless each launch is one of
# these combinations, and fails if a @triton.jit function in dpo_ds has no entry.
COMPILE_SPECS: dict[str, dict] = {}
LOGITS_DTYPES = ("fp32", "bf16", "fp16")  # torch.float32, bfloat16, float16 as Triton names them


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (N, V), last dim contiguous
    labels_ptr,  # (N,) int64
    out_ptr,  # (N,) fp32 log p
    row_max_ptr,  # (N,) fp32 m, saved for backward
    log_sum_ptr,  # (N,) fp32 log s, saved for backward
    sq_ptr,  # (N,) fp32 log sum_j p_j^2 (WPO), no gradient
    row_stride,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    row_ptr = logits_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    # The running max starts at a finite "minus infinity": starting at -inf, exp(m_old - m_new) would be
    # exp(-inf - -inf) = NaN whenever a block is all -inf (a masked vocabulary); a finite floor gives 0.
    m = tl.full((), -3.0e38, tl.float32)
    s = tl.zeros((), tl.float32)
    s2 = tl.zeros((), tl.float32)
    # Ignored rows are reduced too (zeroed at the end): no data-dependent branch around the loop.
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        # Lanes past V read -inf, so exp(x - m) = 0 there.
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)  # (BLOCK_V,)
        s = s * scale + tl.sum(e, axis=0)
        s2 = s2 * scale * scale + tl.sum(e * e, axis=0)
        m = m_new
    log_s = tl.log(s)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    tl.store(out_ptr + row, tl.where(valid, (x_label - m) - log_s, 0.0))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    tl.store(sq_ptr + row, tl.where(valid, tl.log(s2) - 2.0 * log_s, 0.0))


_FWD_POINTERS = ("logits_ptr", "labels_ptr", "out_ptr", "row_max_ptr", "log_sum_ptr", "sq_ptr")
COMPILE_SPECS["_logprobs_fwd_kernel"] = {
    "signature": {
        "logits_ptr": "*{logits}",
        "labels_ptr": "*i64",
        "out_ptr": "*fp32",
        "row_max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "sq_ptr": "*fp32",
        "row_stride": "i32",
        "V": "i32",
        "ignore_index": "i32",  # -100 by default: neither 1 (a constexpr then) nor a multiple of 16
        "BLOCK_V": "constexpr",
    },
    "dtypes": {"logits": LOGITS_DTYPES},
    "constexprs": {"BLOCK_V": (DEFAULT_BLOCK_V,)},  # the default: dpo_ds never passes another block_v
    "divisible_by_16": {
        "V%16==0": (*_FWD_POINTERS, "row_stride", "V"),
        "V%16!=0": _FWD_POINTERS,
    },
}


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (N, V), last dim contiguous
    grad_ptr,  # (N, V) output in logits' dtype; may alias logits_ptr (inplace_backward)
    labels_ptr,  # (N,) int64
    row_max_ptr,  # (N,) fp32
    log_sum_ptr,  # (N,) fp32
    grad_out_ptr,  # (N,) fp32, contiguous
    row_stride,
    grad_row_stride,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # Ignored rows: g = 0, so their gradient row is exactly zero (the softmax is finite, <= 1).
    g = tl.where(valid, tl.load(grad_out_ptr + row), 0.0)
    m = tl.load(row_max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        softmax = tl.exp((x - m) - log_s)
        onehot = tl.where(cols == label, 1.0, 0.0)  # g = 0 already zeroes ignored rows
        dx = (onehot - softmax) * g  # (BLOCK_V,)
        # A block is read before it is written and no other program touches this row, so grad may alias
        # the logits (inplace_backward).
        tl.store(grad_row_ptr + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask)


_BWD_POINTERS = ("logits_ptr", "grad_ptr", "labels_ptr", "row_max_ptr", "log_sum_ptr", "grad_out_ptr")
COMPILE_SPECS["_logprobs_bwd_kernel"] = {
    "signature": {
        "logits_ptr": "*{logits}",
        "grad_ptr": "*{logits}",  # the gradient has the logits' dtype
        "labels_ptr": "*i64",
        "row_max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "grad_out_ptr": "*fp32",
        "row_stride": "i32",
        "grad_row_stride": "i32",
        "V": "i32",
        "ignore_index": "i32",
        "BLOCK_V": "constexpr",
    },
    "dtypes": {"logits": LOGITS_DTYPES},
    "constexprs": {"BLOCK_V": (DEFAULT_BLOCK_V,)},
    "divisible_by_16": {
        "V%16==0": (*_BWD_POINTERS, "row_stride", "grad_row_stride", "V"),
        "V%16!=0": _BWD_POINTERS,
    },
}


def _check_runnable(kernel, device: torch.device) -> None:
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "triton logprobs on a non-CUDA tensor needs the Triton interpreter: set TRITON_INTERPRET=1 in "
            "the environment before importing triton (or dpo_ds.model.logprobs.triton_kernel)."
        )


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device; make that the logits' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def triton_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, block_v: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) with unit stride on V, labels (N,) int64 -> log p, m, log s, log sum_j p_j^2: each
    (N,) fp32."""
    _check_runnable(_logprobs_fwd_kernel, logits.device)
    n, v = logits.shape
    # Separate tensors, not views of one: views share a version counter, so an in-place op by the
    # caller on `out` would make autograd reject the saved row stats.
    out, row_max, log_sum, sq = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4))
    if n == 0:
        return out, row_max, log_sum, sq
    with _on_device(logits.device):
        _logprobs_fwd_kernel[(n,)](
            logits, labels, out, row_max, log_sum, sq, logits.stride(0), v, ignore_index, BLOCK_V=block_v
        )
    return out, row_max, log_sum, sq


def triton_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    grad_out: torch.Tensor,
    ignore_index: int,
    block_v: int,
    inplace: bool = False,
) -> torch.Tensor:
    """Gradient (N, V) in logits' dtype. inplace=True writes it over `logits` and returns that tensor."""
    _check_runnable(_logprobs_bwd_kernel, logits.device)
    n, v = logits.shape
    grad = logits if inplace else torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    grad_out = grad_out.float().contiguous()  # sum() hands back an expanded, stride-0 gradient
    with _on_device(logits.device):
        _logprobs_bwd_kernel[(n,)](
            logits,
            grad,
            labels,
            row_max,
            log_sum,
            grad_out,
            logits.stride(0),
            grad.stride(0),
            v,
            ignore_index,
            BLOCK_V=block_v,
        )
    return grad


class TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, block_v: int, inplace_backward: bool, with_sq: bool):
        out, row_max, log_sum, sq = triton_logprobs_forward(logits, labels, ignore_index, block_v)
        ctx.save_for_backward(logits, labels, row_max, log_sum)
        ctx.ignore_index = ignore_index
        ctx.block_v = block_v
        ctx.inplace_backward = inplace_backward
        if not with_sq:
            return out
        ctx.mark_non_differentiable(sq)
        return out, sq

    @staticmethod
    def backward(ctx, grad_out, *_):  # a with_sq call's second output has no gradient
        logits, labels, row_max, log_sum = ctx.saved_tensors
        grad = triton_logprobs_backward(
            logits,
            labels,
            row_max,
            log_sum,
            grad_out,
            ctx.ignore_index,
            ctx.block_v,
            inplace=ctx.inplace_backward,
        )
        return grad, None, None, None, None, None


def triton_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    block_v: int = DEFAULT_BLOCK_V,
    inplace_backward: bool = False,
    with_sq: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), labels (N,) -> fp32 (N,); with_sq: and log sum_j p_j^2, (N,) fp32 without a gradient.

    inplace_backward=True overwrites the logits buffer with its gradient during backward, saving one
    (N, V) tensor. Use it only when nothing else reads those logits after this call (e.g. logits that
    come straight out of an lm_head matmul, whose backward needs its inputs, not its output).
    """
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return TritonTokenLogprobs.apply(
        logits, labels.contiguous(), ignore_index, block_v, inplace_backward, with_sq
    )
