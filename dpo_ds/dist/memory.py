"""Memory of this rank and across ranks: device allocations on a GPU, the process's resident set on CPU."""

from __future__ import annotations

import os

import torch

from dpo_ds.dist.comm import across_ranks

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """A size in the largest binary unit it reaches, so a 200 KiB checkpoint is not "0.00 GiB":
    512 -> "512 B", 1536 -> "1.50 KiB", 3 * 2**30 -> "3.00 GiB". Negative sizes keep their sign."""
    size, unit = abs(float(n)), 0
    while round(size, 2) >= 1024 and unit < len(BYTE_UNITS) - 1:  # 1024.00 KiB is 1.00 MiB
        size, unit = size / 1024, unit + 1
    sign = "-" if n < 0 else ""
    return f"{sign}{int(size)} B" if unit == 0 else f"{sign}{size:.2f} {BYTE_UNITS[unit]}"


def proc_status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmHWM, VmRSS, RssAnon, ...): the one reader of that file."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_across_ranks(named: dict[str, float]) -> dict[str, float]:
    """Rank 0's memory figures as given, plus for each the largest over the ranks and which rank has it
    (`memory/peak_gib` -> `memory/peak_gib_max`, `memory/peak_gib_max_rank`): rank 0 holds what the
    other ranks do not (the save's writer, the metrics), and the rank that runs out is the one to know."""
    names = list(named)
    table = across_ranks([named[k] for k in names])  # (world, k)
    out = {k: float(table[0, i]) for i, k in enumerate(names)}
    for i, k in enumerate(names):
        r = int(table[:, i].argmax())
        out[f"{k}_max"], out[f"{k}_max_rank"] = float(table[r, i]), r
    return out


def peak_memory_gib() -> float:
    """This rank's peak memory since reset_peak_memory(): device allocations on a GPU, the process's
    resident-set high-water mark (VmHWM) on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return proc_status("VmHWM").get("VmHWM", 0) / 2**30


def reset_peak_memory() -> None:
    """Start peak_memory_gib() over from now (the build phase's peak is not training's)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        pass


def memory_now_gib() -> float:
    """This rank's memory now: device allocations on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def free_memory_bytes() -> int:
    """Memory this rank could still take: free device memory on a GPU; on CPU the node's MemAvailable
    shared by its ranks (LOCAL_WORLD_SIZE / LOCAL_SIZE, as the launchers set them)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("MemAvailable:")), 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return kib * 1024 // max(local, 1)
