"""`dpo-ds`: one command for what users do, each a subcommand with its own --help.

dpo-ds train --gpus 8 --ds zero3 --config llama3_8b_full_dpo
dpo-ds plan --ds zero3 --config llama3_8b_full_dpo --gpus 8 --gpu-mem 80
dpo-ds recipes                      # the shipped recipes;  dpo-ds recipes cp NAME [DEST] to edit one
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def _train(argv, prog):
    from dpo_ds.cli.launch import main as run

    return run(argv, prog=prog)


def _plan(argv, prog):
    from dpo_ds.plan.planner import main as run

    return run(argv, prog=prog)


def _prepare(argv, prog):
    from dpo_ds.cli.prepare import main as run

    return run(argv, prog=prog)


def _export(argv, prog):
    from dpo_ds.cli.export import main as run

    return run(argv, prog=prog)


def _plot(argv, prog):
    from dpo_ds.cli.plot import main as run

    return run(argv, prog=prog)


def _env(argv, prog):
    from dpo_ds.cli.env import main as run

    return run(argv, prog=prog)


# subcommand -> (its function of (argv, prog), what it does); each imports its module only when run
COMMANDS = {
    "train": (_train, "start the ranks with DeepSpeed's launcher (or be one, under torchrun)"),
    "plan": (_plan, "will it fit? memory per rank from config.json, before any GPU"),
    "prepare": (_prepare, "tokenize the data sets into the token cache once; report on the data"),
    "export": (_export, "a run's policy as a Hugging Face model directory (or its LoRA adapter)"),
    "plot": (_plot, "a run's training curves as a PNG (needs dpo_ds[plot])"),
    "recipes": (
        lambda argv, prog: recipes_main(argv, prog),
        "list the shipped recipes; `cp NAME [DEST]` copies one",
    ),
    "env": (_env, "versions, the accelerator, DeepSpeed's ops: paste it into a bug report"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.split("\n\n")[0], "", "usage: dpo-ds COMMAND [args...]   (dpo-ds COMMAND --help)", ""]
    return "\n".join([*lines, *(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from dpo_ds.config.errors import did_you_mean

        print(f"dpo-ds: unknown command {name!r}{did_you_mean(name, COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest, f"dpo-ds {name}")


def recipes_main(argv=None, prog: str = "dpo-ds recipes") -> int:
    """`dpo-ds recipes`: the shipped recipes; `dpo-ds recipes cp NAME [DEST]`; `dpo-ds recipes show NAME`."""
    from dpo_ds.config import ConfigError
    from dpo_ds.config.shipped import comment_field, ds_config_names, ds_config_path, recipe_path, recipes

    ap = argparse.ArgumentParser(prog=prog, description=recipes_main.__doc__)
    ap.add_argument("action", nargs="?", choices=["ls", "cp", "show"], default="ls",
                    help="ls: list the recipes and DeepSpeed configs; cp: copy one to edit; show: print one")  # fmt: skip
    ap.add_argument("name", nargs="?", help="a recipe's name (cp, show), or with --ds a DeepSpeed config's")
    ap.add_argument("dest", nargs="?", help="cp: a file or directory (default ./NAME.yaml)")
    ap.add_argument("--force", action="store_true", help="cp: overwrite DEST")
    ap.add_argument(
        "--ds", action="store_true", help="cp, show: NAME is a shipped DeepSpeed config (zero3, ...)"
    )
    args = ap.parse_intermixed_args(argv)  # `cp --ds NAME` as well as `cp NAME --ds`
    if args.action == "ls":
        for r in recipes():
            planned = (
                f"\n    planned: {r.verdict} ({comment_field(r.path.read_text(), 'plan')})"
                if r.verdict
                else ""
            )
            print(f"{r.name}\n    {r.summary}{planned}")
        print(f"\nDeepSpeed configs (--ds NAME): {', '.join(ds_config_names())}")
        print(
            f"use one: dpo-ds train --config NAME --ds NAME ...; edit one: {prog} cp NAME, {prog} cp --ds NAME"
        )
        return 0
    if not args.name:
        ap.error(f"{args.action} needs a recipe's name (`{prog}` lists them)")
    try:
        find = ds_config_path if args.ds else recipe_path
        src = find(args.name, flag=f"{prog} {args.action}" + (" --ds" if args.ds else ""))
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if args.action == "show":
        print(src.read_text(), end="")
        return 0
    dest = Path(args.dest or src.name)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        print(f"{prog}: error: {dest} exists (--force overwrites it)", file=sys.stderr)
        return 2
    shutil.copyfile(src, dest)
    print(f"copied {src.stem} to {dest}; run it: dpo-ds train {'--ds' if args.ds else '--config'} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
