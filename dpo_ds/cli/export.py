"""Export a run's checkpoint as a standard Hugging Face model directory.

    python -m dpo_ds.export runs/dpo/LATEST exported/dpo                   # from LATEST/policy.pt
    python -m dpo_ds.export runs/dpo exported/dpo                          # a run dir: its LATEST
    python -m dpo_ds.export runs/dpo/step-640 exported/dpo --dtype float32  # not the run's own dtype
    python -m dpo_ds.export runs/dpo/LATEST exported/dpo --from-deepspeed  # from LATEST/ds/ alone
    python -m dpo_ds.export runs/lora-dpo/LATEST exported/merged            # LoRA: adapters merged in
    python -m dpo_ds.export runs/lora-dpo/LATEST exported/adapter --adapter # LoRA: the adapter alone

The result (model.safetensors, config.json, generation_config.json, tokenizer files) loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)`.

Weights come from the step directory's policy.pt (the full HF state dict rank 0 wrote), or, with
--from-deepspeed or when policy.pt is missing, from the DeepSpeed checkpoint in step-N/ds/:
ZeRO-3 partitions are consolidated by DeepSpeed's zero_to_fp32 (the fp32 master weights); below
ZeRO-3 the module state in mp_rank_00_model_states.pt is already whole. The model's config.json and
tokenizer come from the run's model directory (config.yaml's model.name_or_path, or --model), with
the config as shipped: the dropout that training zeroes is kept for whoever fine-tunes the export.
The weights are written in the dtype the run trained in (config.yaml's model.policy_dtype: a bfloat16
8B run exports ~16 GB, not float32's ~32 GB) unless --dtype says otherwise; stderr says which.

A LoRA run's step dir holds its adapter (peft's format), not the model. By default the export is the
merged model: the run's own base (its starting point, rebuilt from run_state.json: the model dir's
weights, a seeded init, or an archive, itself perhaps a LoRA run's) with every adapter merged in by
peft's merge_and_unload. With --adapter it is the adapter and the tokenizer, with base_model_name_or_path
naming the model directory: AutoModelForCausalLM.from_pretrained(OUT_DIR) loads base + adapter (peft
installed) when the base has its weights there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from dpo_ds.model.files import TORCH_DTYPES, ModelError, resolve_model_dir
from dpo_ds.run import archive as archives
from dpo_ds.run import dir as run_dirs
from dpo_ds.run.dir import ArchiveError, run_dir_of

DS_PREFIX = "lm."  # the DeepSpeed engine's module is LogprobLM, which holds the HF model as .lm
MAX_LISTED = 8


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names the file or key."""


# ----------------------------------------------------------------------------- locating inputs


def locate_step_dir(path: Path) -> Path:
    """The step dir CHECKPOINT names (run_dirs.find_step_dir). A directory that is no step dir must be a
    run dir with a LATEST: without one it is an error naming it, never read as a step dir (whose run
    would then be its parent directory)."""
    path = Path(path)
    if path.is_dir() and not _looks_like_step_dir(path):
        latest = run_dirs.RunDir(path).latest
        if latest.is_symlink() and not latest.exists():
            raise ExportError(f"{latest} names {os.readlink(latest)}, which does not exist")
        if not latest.exists():
            steps = [p.name for _, p in run_dirs.RunDir(path).step_dirs()]
            has = f"; it holds {', '.join(steps)}: pass one of them" if steps else ""
            raise ExportError(
                f"{path} has no {run_dirs.LATEST}/: expected a run dir whose run saved a checkpoint "
                f"(RUN_DIR/{run_dirs.LATEST} -> step-N), or a step dir (RUN_DIR/step-N) holding "
                f"{run_dirs.POLICY}, {run_dirs.DS_TAG}/ or a LoRA adapter{has}"
            )
    return run_dirs.find_step_dir(path)


def _looks_like_step_dir(path: Path) -> bool:
    from dpo_ds.model.adapters import ADAPTER_CONFIG

    tail = path.name[len(run_dirs.STEP_PREFIX) :]
    named = path.name == run_dirs.LATEST or (path.name.startswith(run_dirs.STEP_PREFIX) and tail.isdigit())
    held = (run_dirs.POLICY, run_dirs.DS_TAG, run_dirs.RUN_STATE, run_dirs.COMPLETE, ADAPTER_CONFIG)
    return named or any((path / name).exists() for name in held)


def run_config(step_dir: Path, instead: str) -> tuple[Path, dict | None]:
    """(path, mapping) of the config.yaml of the run the step dir belongs to; None when there is none.
    `instead` is the option that does without it, named in the error for a file that cannot be read."""
    import yaml

    cfg_path = run_dir_of(step_dir).config
    if not cfg_path.is_file():
        return cfg_path, None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{cfg_path}: not valid YAML ({e}); pass {instead}") from None
    return cfg_path, cfg if isinstance(cfg, dict) else {}


def _model_key(cfg: dict | None, key: str):
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get(key) if isinstance(model, dict) else None


def run_model_name(step_dir: Path) -> str:
    """model.name_or_path from the config.yaml of the run the step dir belongs to."""
    cfg_path, cfg = run_config(step_dir, "--model DIR")
    if cfg is None:
        raise ExportError(
            f"{cfg_path} does not exist: cannot tell which model {step_dir} holds; pass --model DIR"
        )
    name = _model_key(cfg, "name_or_path")
    if not isinstance(name, str) or not name:
        raise ExportError(f"{cfg_path}: no string key model.name_or_path; pass --model DIR")
    return name


def trained_dtype(step_dir: Path, state: dict[str, torch.Tensor] | None) -> tuple[str, str]:
    """(dtype name, where it comes from): the dtype the run trained in, which the export keeps unless
    --dtype says otherwise. The run's model.policy_dtype; without a config.yaml, the checkpoint's
    weights' own dtype (policy.pt holds the trained dtype; ZeRO-3 consolidation gives fp32 masters)."""
    cfg_path, cfg = run_config(step_dir, "--dtype")
    name = _model_key(cfg, "policy_dtype")
    if name is not None:
        if name not in TORCH_DTYPES:
            raise ExportError(
                f"{cfg_path}: model.policy_dtype is {name!r}, expected one of {sorted(TORCH_DTYPES)}; "
                "pass --dtype"
            )
        return name, f"the run's model.policy_dtype in {cfg_path}"
    floating = {t.dtype for t in (state or {}).values() if t.is_floating_point()}
    names = [k for k, v in TORCH_DTYPES.items() if floating == {v}]
    if names:
        return names[0], f"the checkpoint's weights ({cfg_path} gives no model.policy_dtype)"
    return "float32", f"{cfg_path} gives no model.policy_dtype"


# ----------------------------------------------------------------------------- reading weights


def read_deepspeed_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """The HF model's state dict from step_dir/ds/, without the LogprobLM 'lm.' prefix."""
    ds_dir = run_dirs.ds_dir(step_dir)
    if not ds_dir.is_dir():
        raise ExportError(f"{ds_dir} does not exist: {step_dir} holds no DeepSpeed checkpoint")
    if any(ds_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        # ZeRO-3: the model states hold empty placeholders; the weights live in the optimizer
        # shards' fp32 partitions, which zero_to_fp32 stitches back together.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for our result
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=run_dirs.DS_TAG)
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise ExportError(
                    f"{ds_dir}: cannot consolidate the ZeRO-3 checkpoint ({type(e).__name__}: {e})"
                ) from None
    else:
        path = ds_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ExportError(
                f"{ds_dir}: neither zero_pp_rank_*_model_states.pt (ZeRO-3) nor {path.name} (ZeRO-0/1/2)"
            )
        # DeepSpeed pickles its config and scheduler state beside the weights: not weights_only
        saved = torch.load(path, map_location="cpu", weights_only=False)
        state = saved.get("module") if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            raise ExportError(f"{path}: no 'module' state dict")
    bad = [k for k in state if not k.startswith(DS_PREFIX)]
    if bad:
        raise ExportError(
            f"{ds_dir}: keys without the '{DS_PREFIX}' prefix of dpo_ds.model.LogprobLM: {_some(bad)}"
        )
    return {k[len(DS_PREFIX) :]: v for k, v in state.items()}


def _some(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


# ----------------------------------------------------------------------------- building the model


def build_model(model_dir: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str):
    """The HF model of model_dir holding exactly `state`, cast to dtype.

    Built on the meta device (no random init, no second copy of the weights) and filled with
    load_state_dict(assign=True). Every parameter and persistent buffer must be in `state` (one name
    of each tied group is enough), and nothing else may be.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    # tied weights (e.g. lm_head.weight and model.embed_tokens.weight) are one tensor under two names
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    unexpected = sorted(set(state) - set(expected))
    missing = [names[0] for names in groups.values() if not any(n in state for n in names)]
    if missing or unexpected:
        raise ExportError(
            f"{source} does not match the model in {model_dir}: "
            + (f"missing keys: {_some(missing)}; " if missing else "")
            + (f"unexpected keys: {_some(unexpected)}; " if unexpected else "")
            + "check that --model (or the run's model.name_or_path) is the model this run trained"
        )
    full = {}
    for names in groups.values():
        present = [n for n in names if n in state]
        first = state[present[0]]
        for n in present[1:]:
            if state[n].shape != first.shape or not torch.equal(state[n], first):
                raise ExportError(
                    f"{source}: '{n}' and '{present[0]}' are tied in {model_dir} but differ in the checkpoint"
                )
        t = first.to(dtype) if first.is_floating_point() else first
        for n in names:
            full[n] = t.contiguous()
    try:
        model.load_state_dict(full, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ExportError(f"{source} does not fit the model in {model_dir}: {e}") from None
    model.tie_weights()  # assign=True gave each tied name its own Parameter object: make them one again
    # non-persistent buffers (e.g. rotary inv_freq) are not saved and not needed in the export
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ExportError(f"{source}: parameters still unset after loading: {_some(left)}")
    model.config.dtype = dtype
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model


def merged_model(model_dir: Path, step_dir: Path, dtype: torch.dtype, runnable: bool = False):
    """A LoRA run's policy as a plain HF model: its base (start.py: what that run started from) with its
    adapter, and any adapter its own start merged, merged in by peft, in fp32, then cast to dtype.
    Built on the meta device for saving (non-persistent buffers such as rotary inv_freq stay unset);
    runnable=True builds it on the CPU so it can run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_ds.model.files import load_config
    from dpo_ds.run.start import starting_point

    start = starting_point(model_dir, "auto", str(step_dir), 0)  # the run's own base + its adapters
    if start.from_weights:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    elif runnable:
        model = AutoModelForCausalLM.from_config(load_config(model_dir), dtype=torch.float32)
        model.load_state_dict(start.state, strict=True)
    else:
        model = build_model(model_dir, start.state, torch.float32, start.source)
    for adapter_dir in start.adapters:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.to(dtype)


# ----------------------------------------------------------------------------- export


def export(
    checkpoint_path: Path,
    out_dir: Path,
    dtype: str | None = None,
    from_deepspeed: bool = False,
    model: str | None = None,
    overwrite: bool = False,
    adapter: bool = False,
) -> Path:
    """Write the HF model directory; dtype None keeps the dtype the run trained in (trained_dtype).
    Says on stderr which dtype the weights were written in, and why."""
    from transformers import AutoTokenizer

    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    step_dir = locate_step_dir(checkpoint_path)
    model_dir = resolve_model_dir(model if model is not None else run_model_name(step_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose another OUT_DIR or pass --overwrite")

    from dpo_ds.model import adapters

    lora = adapters.is_adapter_dir(step_dir)
    if adapter and not lora:
        raise ExportError(
            f"--adapter: {step_dir} holds no LoRA adapter ({adapters.ADAPTER_CONFIG} is missing)"
        )
    if adapter:
        _adapter_base_is(model_dir, step_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # as shipped, without training's pad fix-ups
    # write beside the target and swap in at the end, so OUT_DIR is never a half-written model
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if adapter:
        for name in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS):
            shutil.copyfile(step_dir / name, tmp / name)
        _say(f"the adapter as the run saved it, from {step_dir}")
    else:
        hf_model = _model_to_export(model_dir, step_dir, dtype, from_deepspeed, lora)
        hf_model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    os.replace(tmp, out_dir)
    return out_dir


def _adapter_base_is(model_dir: Path, step_dir: Path) -> None:
    """--adapter writes the adapter with base_model_name_or_path = model_dir: refused when the run's base
    is anything else (an archive: an SFT policy.pt or a LoRA SFT adapter merged in; a seeded init), which
    loading the adapter onto model_dir's weights would silently get wrong. Decided from the run's own
    config: the weights themselves need not be here, since the adapter alone never reads them."""
    from dpo_ds.model.files import start_from_weights

    model = run_dirs.read_run_state(step_dir).get("config", {}).get("model", {})
    archive, init = model.get("archive"), model.get("init", "auto")
    try:
        on_weights = start_from_weights(model_dir, init, archive)
    except ModelError:  # the directory's weights are not here; the run, which trained, started from them
        on_weights = archive is None and init != "random"
    if not on_weights:
        what = f"model.archive={archive}" if archive else f"a seeded init of {model_dir} (model.init={init})"
        raise ExportError(
            f"--adapter: {step_dir}'s adapter was trained on {what}, not on the weights of {model_dir}, which "
            f"the adapter alone would be loaded onto; export the merged model (without --adapter)"
        )


def _model_to_export(model_dir: Path, step_dir: Path, dtype: str | None, from_deepspeed: bool, lora: bool):
    """The HF model of the step dir in `dtype` (None: the run's own), the dtype said on stderr."""
    if lora:
        state, source = None, f"{step_dir} (LoRA adapters merged into the run's base)"
    else:
        policy = run_dirs.policy_file(step_dir)
        if from_deepspeed or not policy.is_file():
            state, source = (
                read_deepspeed_state(step_dir),
                f"DeepSpeed checkpoint {run_dirs.ds_dir(step_dir)}",
            )
        else:
            state, source = archives.read_archive(policy)["state"], str(policy)
    name, why = (dtype, "--dtype") if dtype is not None else trained_dtype(step_dir, state)
    _say(f"weights in {name} ({why}{'' if dtype is not None else '; --dtype to change'}), from {source}")
    if lora:
        return merged_model(model_dir, step_dir, TORCH_DTYPES[name])
    return build_model(model_dir, state, TORCH_DTYPES[name], source)


def _say(message: str) -> None:
    """What the export chose, on stderr: stdout's last line is the exported directory, for scripts."""
    print(f"dpo_ds.export: {message}", file=sys.stderr)


def main(argv=None, prog: str | None = None) -> int:
    # usage names the command as it was run: dpo-ds-export or python -m (`dpo-ds export` passes prog)
    launched = Path(sys.argv[0]).name
    prog = prog or (launched if launched and not launched.endswith(".py") else "python -m dpo_ds.export")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "checkpoint", type=Path, metavar="CHECKPOINT", help="RUN_DIR/LATEST, RUN_DIR/step-N, or a run dir"
    )
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="Hugging Face model directory to write")
    ap.add_argument(
        "--dtype",
        choices=sorted(TORCH_DTYPES),
        default=None,
        help="dtype of the saved weights (default: the dtype the run trained in, its model.policy_dtype)",
    )
    ap.add_argument(
        "--from-deepspeed",
        action="store_true",
        help="read the DeepSpeed checkpoint CHECKPOINT/ds/ even when policy.pt exists",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="model dir (or shipped name) for config.json and tokenizer; default: the run's model.name_or_path",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write the adapter (peft format), not the merged model",
    )
    args = ap.parse_args(argv)
    from dpo_ds.model.adapters import AdapterError

    try:
        out = export(
            args.checkpoint,
            args.out_dir,
            args.dtype,
            args.from_deepspeed,
            args.model,
            args.overwrite,
            args.adapter,
        )
    except (ExportError, ModelError, ArchiveError, AdapterError) as e:
        print(f"dpo_ds.export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
