"""`dpo-ds train`: start the ranks with DeepSpeed's launcher, or be one of them.

    dpo-ds train --gpus 8 --ds zero3 --config llama3_8b_full_dpo
    dpo-ds train --hostfile hosts --nodes 2 --gpus 8 --master-addr node0 --ds zero3 key=value...

Outside a launcher it runs `deepspeed [--num_gpus N] [--num_nodes N --hostfile F ...] --module dpo_ds.train`
with this interpreter, so the ranks import the installed package from any directory. Under torchrun, srun
or the deepspeed launcher (RANK and WORLD_SIZE set) this process is a rank: it trains in-process and never
starts a second launcher. Everything it does not know (--ds, --config, key=value) goes to the trainer.
"""

from __future__ import annotations

import argparse
import os
import sys

# dpo-ds train's flag -> the deepspeed launcher's
LAUNCHER_FLAGS = {
    "gpus": "--num_gpus",
    "nodes": "--num_nodes",
    "hostfile": "--hostfile",
    "master_addr": "--master_addr",
    "master_port": "--master_port",
    "include": "--include",
    "exclude": "--exclude",
    "node_rank": "--node_rank",
}


def parse(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    from dpo_ds.config.keys import add_help_keys, keys_overview

    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="The trainer's own arguments follow, and go to it: --ds NAME|FILE, --config RECIPE|FILE, "
        "key=value\n(`python -m dpo_ds.train --help` describes them).\n\n" + keys_overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_help_keys(ap)
    ap.add_argument("--gpus", type=int, help="ranks per node (default: all of this node's GPUs)")
    ap.add_argument("--nodes", type=int, help="nodes (with --hostfile)")
    ap.add_argument("--hostfile", help="DeepSpeed hostfile: one `host slots=N` line per node")
    ap.add_argument("--master-addr", "--master_addr", dest="master_addr", help="rank 0's host")
    ap.add_argument("--master-port", "--master_port", dest="master_port", type=int, help="rank 0's port")
    ap.add_argument("--include", help="hosts / GPUs to use, as deepspeed's --include")
    ap.add_argument("--exclude", help="hosts / GPUs to leave out, as deepspeed's --exclude")
    ap.add_argument(
        "--node-rank", "--node_rank", dest="node_rank", type=int, help="this node's rank (--no-ssh)"
    )
    ap.add_argument("--no-ssh", "--no_ssh", dest="no_ssh", action="store_true",
                    help="start only this node's ranks (each node runs the command, as under srun)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the launcher's command line and exit")
    return ap.parse_known_args(argv)


def launcher_cmd(args: argparse.Namespace, train_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    for key, flag in LAUNCHER_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            cmd += [flag, str(value)]
    if args.no_ssh:
        cmd.append("--no_ssh")
    return [*cmd, "--module", "dpo_ds.train", *train_args]


def under_launcher() -> bool:
    """Whether a launcher (torchrun, srun with the rank exported, deepspeed) already made this process a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def main(argv=None, prog: str = "dpo-ds train") -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv), prog)
    if under_launcher():
        given = [f"--{k.replace('_', '-')}" for k in LAUNCHER_FLAGS if getattr(args, k) is not None]
        if given and os.environ.get("RANK") == "0":
            print(f"{prog}: already a rank of {os.environ['WORLD_SIZE']} (RANK / WORLD_SIZE set by the "
                  f"launcher); {', '.join(given)} left to that launcher", file=sys.stderr)  # fmt: skip
        from dpo_ds.cli.train import exit_now
        from dpo_ds.cli.train import main as train_main

        exit_now(train_main(train_args))
    cmd = launcher_cmd(args, train_args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the ranks fork data workers
    sys.stdout.flush()
    os.execv(sys.executable, cmd)  # the launcher takes this process's place: signals reach it directly
    return 1  # not reached
