"""`dpo-ds env`: what a bug report needs, in one paste: versions, the accelerator, DeepSpeed's ops.

Imports nothing it does not report on; a package that is missing is named with the extra that brings it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys

# distribution -> the extra of dpo_ds that installs it (None: a core dependency)
PACKAGES = {
    "dpo_ds": None,
    "torch": None,
    "deepspeed": None,
    "transformers": None,
    "accelerate": None,
    "datasets": None,
    "huggingface_hub": None,
    "tokenizers": None,
    "safetensors": None,
    "peft": "lora",
    "triton": "triton",
    "matplotlib": "plot",
    "wandb": "wandb",
    "trl": "bench",
}


def versions() -> list[tuple[str, str]]:
    rows = [("python", f"{platform.python_version()} ({sys.executable})"), ("platform", platform.platform())]
    for dist, extra in PACKAGES.items():
        try:
            rows.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            how = f"pip install 'dpo_ds[{extra}]'" if extra else "a core dependency: reinstall dpo_ds"
            rows.append((dist, f"not installed ({how})"))
    return rows


def accelerator() -> list[tuple[str, str]]:
    import torch

    rows = [("torch CUDA build", str(torch.version.cuda)), ("torch HIP build", str(torch.version.hip))]
    if torch.cuda.is_available():
        rows.append(("GPUs", str(torch.cuda.device_count())))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"GPU {i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}")
            )
        rows.append(("bf16 supported", str(torch.cuda.is_bf16_supported())))
        if torch.distributed.is_nccl_available():
            rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    else:
        rows.append(("GPUs", "none visible to torch (CPU ranks, gloo)"))
    rows.append(("torch threads", str(torch.get_num_threads())))
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        rows.append(("DeepSpeed accelerator", f"{acc.device_name()} ({acc.communication_backend_name()})"))
    except Exception as e:  # a broken DeepSpeed install is what this report is for
        rows.append(("DeepSpeed accelerator", f"error: {type(e).__name__}: {e}"))
    return rows


def deepspeed_ops() -> list[tuple[str, str]]:
    """Each op: prebuilt into the install, and whether this machine could JIT-build it (as ds_report says)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as e:
        return [("ops", f"error: {type(e).__name__}: {e}")]
    rows = []
    for name, builder in sorted(ALL_OPS.items()):
        try:
            ok = builder.is_compatible(verbose=False)
        except Exception as e:  # an op builder that cannot even check itself
            ok = f"error ({type(e).__name__})"
        rows.append((name, f"installed {'yes' if installed_ops.get(name) else 'no'}, compatible {ok}"))
    return rows


def report() -> str:
    sections = [("versions", versions()), ("accelerator", accelerator()), ("DeepSpeed ops", deepspeed_ops())]
    lines = []
    for title, rows in sections:
        lines += [f"## {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    return "\n".join(lines)


def main(argv=None, prog: str = "dpo-ds env") -> int:
    argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())
    return 0
