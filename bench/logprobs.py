"""Benchmark per-token log-prob implementations: forward+backward time and extra peak memory.

    python bench/logprobs.py                      # CPU: fp32, tokens 1024 4096 8192, vocab 32000
    python bench/logprobs.py --triton --tokens 32 # CPU: include the kernel under the Triton interpreter
    python bench/logprobs.py                      # GPU: bf16, triton included, torch.cuda peak memory

Table 1: impl x tokens. "extra" is peak memory above the logits and the logits' gradient, which every
impl has to hold; what remains is what the impl itself adds (naive: an fp32 (N, V) log-softmax plus
its gradient; chunked: about one fp32 chunk).
Table 2: an lm_head (hidden -> vocab) applied at every position, versus only at the positions that
have a label (hidden[mask] @ W.T): DPO ignores prompt tokens, so the logits there are wasted work.
Table 3: lm_head + log-probs together, from hidden states and the lm_head weight: the logits materialised
(F.linear, then naive or chunked) versus fused_linear, which only ever builds (chunk, V) rows of them.
"extra" there is peak memory above the hidden and weight gradients, which every path has to hold, as a
fraction of the fp32 (tokens, V) logits. For fused_linear the peak comes while both gradients exist, so
that is exactly what it adds; the materialised paths peak before dL/dW exists, so theirs is a lower bound.
Table 4 (--wpo): what WPO's per-token log sum_v p_v^2 (with_sq=True, loss.wpo) adds to each path, from hidden
states and the lm_head weight as in table 3: fwd+bwd time and peak memory without and with it.

CPU has no max_memory_allocated, so peak memory there is tracked with a TorchDispatchMode that adds each
new tensor storage's bytes when an op creates it and subtracts them when the storage is freed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dpo_ds.model.logprobs import token_logprobs
from dpo_ds.model.logprobs.fused_linear import fused_linear_logprobs

IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


class LiveStorageTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (views and in-place ops create none)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A return with alias info is a view or an in-place/out= result: memory that already existed.
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._sizes:
            return
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """(peak bytes allocated by fn above what was live before it, fn's result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, result
    with LiveStorageTracker() as tracker:
        result = fn()
    return tracker.peak, result


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_labels(n: int, vocab: int, response_frac: float, device: torch.device) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[: n - int(round(n * response_frac))] = IGNORE  # the prompt part: no label
    return labels


def logprobs_step(logits: torch.Tensor, labels: torch.Tensor, impl: str) -> torch.Tensor:
    out = token_logprobs(logits, labels, IGNORE, impl=impl)
    out.sum().backward()
    logits.grad = None
    return out.detach()


def bench_logprobs(args, device, dtype, impls) -> list[dict]:
    rows = []
    for n in args.tokens:
        logits = torch.randn(n, args.vocab, device=device).to(dtype).requires_grad_()  # (N, V)
        labels = make_labels(n, args.vocab, args.response_frac, device)
        logits_bytes = logits.numel() * logits.element_size()
        naive_out = None
        for impl in impls:
            step = functools.partial(logprobs_step, logits, labels, impl)
            # The memory run doubles as the warm-up (the first call pays one-off costs).
            peak, out = peak_bytes(step, device)
            naive_out = out if naive_out is None else naive_out
            ms = median_ms(step, device, args.reps)
            extra = peak - logits_bytes  # the logits' gradient is the one (N, V) tensor every impl needs
            diff = (out - naive_out).abs().max().item()
            rows.append(dict(impl=impl, tokens=n, ms=ms, extra=extra, ratio=extra / logits_bytes, diff=diff))
    return rows


def lm_head_all_positions(hidden, weight, labels, impl):
    logits = hidden @ weight.T  # (T, V): prompt positions too
    return token_logprobs(logits, labels, IGNORE, impl=impl)  # (T,)


def lm_head_labelled_positions(hidden, weight, labels, impl):
    idx = (labels != IGNORE).nonzero().squeeze(1)  # (R,)
    logits = hidden[idx] @ weight.T  # (R, V), R = response_frac * T
    picked = token_logprobs(logits, labels[idx], IGNORE, impl=impl)  # (R,)
    return torch.zeros(len(labels), dtype=picked.dtype, device=picked.device).index_put(
        (idx,), picked
    )  # (T,)


def lm_head_step(fn, hidden, weight, labels, impl) -> torch.Tensor:
    out = fn(hidden, weight, labels, impl)
    out.sum().backward()
    hidden.grad = weight.grad = None
    return out.detach()


def bench_lm_head(args, device, dtype, impls) -> list[dict]:
    n, hidden_size, vocab = args.lm_tokens, args.hidden, args.vocab
    hidden = torch.randn(n, hidden_size, device=device).to(dtype).requires_grad_()  # (T, H)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)  # (V, H)
    weight.requires_grad_()
    labels = make_labels(n, vocab, args.response_frac, device)  # (T,)

    rows, reference = [], None
    for impl in impls:
        for name, fn in (
            ("all positions", lm_head_all_positions),
            ("labelled only", lm_head_labelled_positions),
        ):
            step = functools.partial(lm_head_step, fn, hidden, weight, labels, impl)
            peak, out = peak_bytes(step, device)
            reference = out if reference is None else reference
            ms = median_ms(step, device, args.reps)
            diff = (out - reference).abs().max().item()
            rows.append(dict(impl=impl, path=name, ms=ms, peak=peak, diff=diff))
    return rows


# Each maps (hidden (N, H), weight (V, H), labels (N,)) to log p (N,).
LINEAR_PATHS = {
    "naive": lambda h, w, y: token_logprobs(h @ w.T, y, IGNORE, impl="naive"),  # (N, V) logits + fp32 copy
    "chunked": lambda h, w, y: token_logprobs(h @ w.T, y, IGNORE, impl="chunked"),  # (N, V) logits
    "fused_linear": lambda h, w, y: fused_linear_logprobs(h, w, y, ignore_index=IGNORE),  # (chunk, V) only
}


def linear_logprobs_step(fn, hidden, weight, labels) -> torch.Tensor:
    out = fn(hidden, weight, labels)
    out.sum().backward()
    hidden.grad = weight.grad = None
    return out.detach()


def wpo_step(impl, hidden, weight, labels, with_sq: bool) -> torch.Tensor:
    if impl == "fused_linear":
        out = fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE, with_sq=with_sq)
    else:
        out = token_logprobs(hidden @ weight.T, labels, IGNORE, impl=impl, with_sq=with_sq)
    logp = out[0] if with_sq else out
    logp.sum().backward()
    hidden.grad = weight.grad = None
    return logp.detach()


def bench_wpo(args, device, dtype, impls) -> list[dict]:
    """Per path: (ms, peak) of fwd+bwd without and with WPO's log sum p^2, from hidden states (table 4)."""
    weight = (
        (torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5).to(dtype).requires_grad_()
    )
    hidden = torch.randn(args.wpo, args.hidden, device=device).to(dtype).requires_grad_()
    labels = make_labels(args.wpo, args.vocab, args.response_frac, device)
    rows = []
    for impl in [*impls, "fused_linear"]:
        r = dict(impl=impl)
        for with_sq in (False, True):
            step = functools.partial(wpo_step, impl, hidden, weight, labels, with_sq)
            r[with_sq] = (median_ms(step, device, args.reps), peak_bytes(step, device)[0])
        rows.append(r)
    return rows


def print_wpo(args, device, dtype, impls) -> None:
    print(f"\nWPO's log sum p^2 (loss.wpo): tokens {args.wpo}, hidden {args.hidden}, vocab {args.vocab}\n")
    print("| path | fwd+bwd ms | with log sum p^2 | time | peak MiB | with log sum p^2 | peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in bench_wpo(args, device, dtype, impls):
        (t0, m0), (t1, m1) = r[False], r[True]
        print(
            f"| {r['impl']} | {t0:.1f} | {t1:.1f} | {t1 / t0:.2f}x | {m0 / MIB:.1f} | {m1 / MIB:.1f} | {m1 / m0:.2f}x |"
        )


def bench_fused_linear(args, device, dtype) -> list[dict]:
    rows = []
    hidden_size, vocab = args.hidden, args.vocab
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype)  # (V, H)
    weight.requires_grad_()
    for n in args.fused_tokens:
        hidden = torch.randn(n, hidden_size, device=device).to(dtype).requires_grad_()  # (N, H)
        labels = make_labels(n, vocab, args.response_frac, device)  # (N,)
        logits_fp32_bytes = n * vocab * 4
        grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()  # dL/dh, dL/dW
        reference = None
        for impl, fn in LINEAR_PATHS.items():
            step = functools.partial(linear_logprobs_step, fn, hidden, weight, labels)
            peak, out = peak_bytes(step, device)
            reference = out if reference is None else reference
            ms = median_ms(step, device, args.reps)
            extra = peak - grads_bytes
            diff = (out - reference).abs().max().item()
            rows.append(
                dict(
                    impl=impl,
                    tokens=n,
                    ms=ms,
                    peak=peak,
                    extra=extra,
                    ratio=extra / logits_fp32_bytes,
                    diff=diff,
                )
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default 1024 4096 8192)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=DTYPES, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--impls", nargs="+", default=["naive", "chunked"], help="triton is added on a GPU")
    p.add_argument("--triton", action="store_true", help="on CPU: add triton under the interpreter (tiny)")
    p.add_argument("--hidden", type=int, default=512, help="lm_head tables: hidden size")
    p.add_argument("--lm-tokens", type=int, default=2048, help="lm_head table: token count (0 skips it)")
    p.add_argument(
        "--fused-tokens",
        type=int,
        nargs="+",
        help="fused_linear table: token counts (default --tokens; 0 skips)",
    )
    p.add_argument("--response-frac", type=float, default=0.5, help="fraction of positions with a label")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wpo", type=int, default=0, help="WPO's cost table at this many tokens (0 skips it)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    impls = list(args.impls)
    if (device.type == "cuda" or args.triton) and "triton" not in impls:
        impls.append("triton")
    if device.type == "cpu" and "triton" in impls:
        # Must be set before triton is imported (lazily, at the first triton call).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if args.tokens is None:
            args.tokens = [32]  # the interpreter runs ~seconds per call at 32 x 32k
            args.lm_tokens = 0
            args.fused_tokens = args.fused_tokens or [0]
        print("note: triton runs under the CPU interpreter here: its times mean nothing, memory does\n")
    if args.tokens is None:
        args.tokens = [1024, 4096, 8192]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {str(dtype)[6:]}; vocab {args.vocab}")
    print(f"label fraction {args.response_frac}; median of {args.reps} fwd+bwd runs after one warm-up\n")

    if args.wpo:
        print_wpo(args, device, dtype, impls)
        return
    rows = bench_logprobs(args, device, dtype, impls)
    print("| impl | tokens | fwd+bwd ms | extra peak MiB | extra / logits | max abs diff vs naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['impl']} | {r['tokens']} | {r['ms']:.1f} | {r['extra'] / MIB:.1f} | "
            f"{r['ratio']:.3f} | {r['diff']:.1e} |"
        )

    by_key = {(r["impl"], r["tokens"]): r for r in rows}
    ratios = [
        by_key[("chunked", n)]["extra"] / by_key[("naive", n)]["extra"]
        for n in args.tokens
        if ("chunked", n) in by_key and ("naive", n) in by_key
    ]
    if ratios:
        worst = max(ratios)
        verdict = "PASS" if worst <= 0.25 else "FAIL"
        print(
            f"\ntarget: chunked extra memory <= 1/4 of naive extra at vocab {args.vocab}: {verdict} "
            f"(worst ratio {worst:.3f}; per token count: {', '.join(f'{x:.3f}' for x in ratios)})"
        )

    if args.lm_tokens > 0:
        print(
            f"\nlm_head restricted to response positions: tokens {args.lm_tokens}, hidden {args.hidden}, "
            f"vocab {args.vocab}, label fraction {args.response_frac}; peak counts everything the step "
            "allocates (logits, their grad, hidden/weight grads)\n"
        )
        lm_rows = bench_lm_head(
            args, device, dtype, [i for i in impls if i != "triton" or device.type == "cuda"]
        )
        print("| impl | lm_head at | fwd+bwd ms | peak MiB | max abs diff vs first row |")
        print("|---|---|---:|---:|---:|")
        for r in lm_rows:
            print(f"| {r['impl']} | {r['path']} | {r['ms']:.1f} | {r['peak'] / MIB:.1f} | {r['diff']:.1e} |")

    if args.fused_tokens is None:
        args.fused_tokens = args.tokens
    args.fused_tokens = [n for n in args.fused_tokens if n > 0]
    if args.fused_tokens:
        print(
            f"\nlm_head + log-probs from hidden states: hidden {args.hidden}, vocab {args.vocab}, "
            f"label fraction {args.response_frac}; extra = peak above the hidden and weight gradients, "
            "/ fp32 (tokens, V) logits\n"
        )
        fused_rows = bench_fused_linear(args, device, dtype)
        print(
            "| path | tokens | fwd+bwd ms | peak MiB | extra MiB | extra / fp32 logits "
            "| max abs diff vs naive |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in fused_rows:
            print(
                f"| {r['impl']} | {r['tokens']} | {r['ms']:.1f} | {r['peak'] / MIB:.1f} | "
                f"{r['extra'] / MIB:.1f} | {r['ratio']:.3f} | {r['diff']:.1e} |"
            )
        fused = [r["ratio"] for r in fused_rows if r["impl"] == "fused_linear"]
        verdict = "PASS" if max(fused) <= 1 / 8 else "FAIL"
        print(
            f"\ntarget: fused_linear extra memory <= 1/8 of the fp32 logits at vocab {args.vocab}: {verdict} "
            f"(worst {max(fused):.3f}; per token count: {', '.join(f'{x:.3f}' for x in fused)})"
        )


if __name__ == "__main__":
    main()
