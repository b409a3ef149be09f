"""Two "nodes" on one machine over loopback: a hostfile with two hosts of one slot each, and one
`deepspeed --hostfile H --no_ssh --node_rank R` launcher per node, as launch/multi_node.sh runs them
with NO_SSH=1. Each launcher starts only its own node's rank; together they make a world of 2.

`localhost` and `127.0.0.1` are two names in the hostfile (so two nodes) for the same machine.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, env, free_port, launcher, metrics, small_demo

pytestmark = pytest.mark.integration
LN2 = math.log(2)
TIMEOUT = 300


def _node_cmd(hostfile: Path, node_rank: int, port: int, *args: str) -> list[str]:
    return [
        launcher(),
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(ROOT / "dpo_ds" / "train.py"),
        *args,
    ]


def _run_nodes(cmds: list[list[str]], logs: list[Path], timeout: float) -> list[int | None]:
    """Each launcher command started at once, its output to its log (files, not pipes: two chatty
    children never block on a full pipe); their exit codes, None for one still running after timeout
    (then it and the ranks it started are killed)."""
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        cmd, env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: stop this launcher and the ranks it started
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return codes


def test_two_nodes_no_ssh(tmp_path):
    data = small_demo(tmp_path / "data")
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    args = [
        "--ds",
        str(ROOT / "ds_configs/zero3.json"),
        "loss=dpo",
        "loss.beta=0.1",
        "exp_name=two_nodes",
        f"run_dir={run_dir}",
        "model.name_or_path=tiny",
        f"datasets=[{data}]",
        "batch_size=16",
        "eval_batch_size=16",
        "n_eval_examples=32",
        "n_epochs=1",
        "max_length=16",
        "max_prompt_length=8",
        "lr=1e-3",
        "warmup_steps=0",
        f"data.cache_dir={tmp_path / 'hf_cache'}",
    ]
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    codes = _run_nodes([_node_cmd(hostfile, r, port, *args) for r in (0, 1)], logs, TIMEOUT)
    out0, out1 = (log.read_text() for log in logs)
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0\n{out0[-5000:]}\n--- node 1\n{out1[-5000:]}"

    # each launcher ran one local process of a 2-node world
    for r, out in enumerate((out0, out1)):
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in out, out[-3000:]
        assert "dist_world_size=2" in out, out[-3000:]
    assert "world 2 on cpu" in out0  # global rank 0 (node 0) sees a world of 2 ...
    assert "world 2 on cpu" not in out1  # ... and only rank 0 logs, so node 1 ran rank 1 alone

    # one run: metrics written once, by global rank 0
    train, evals = metrics(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3]  # 48 rows / batch 16, each step once
    assert [r["counters/examples"] for r in train] == [16, 32, 48]
    assert len(evals) == 2  # the first eval and the final one
    # seeded init on both ranks: policy == reference, so the first DPO loss is exactly ln 2
    assert evals[0]["loss/eval"] == pytest.approx(LN2, abs=1e-5)
    assert train[0]["loss/train"] == pytest.approx(LN2, abs=1e-5)
    assert train[-1]["loss/train"] != pytest.approx(LN2, abs=1e-6)  # and the policy did train

    # one checkpoint set: the final step dir, LATEST pointing at it, shards of both ranks
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-48"]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("LATEST")] == ["LATEST"]
    assert os.readlink(run_dir / "LATEST") == "step-48"
    assert (run_dir / "LATEST" / "policy.pt").is_file()
    shards = sorted(p.name for p in (run_dir / "step-48" / "ds").iterdir())
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in name for name in shards), shards
    assert not any("zero_pp_rank_2_" in name for name in shards), shards


def test_a_node_whose_peer_never_starts_ends_named_within_dist_timeout(tmp_path):
    """Found by the soak (bench/soak.py): rank 0 SIGSTOPped in its start-up, before the process group
    formed, left rank 1 in torch's store connect, which timed out after the backend's timeout and then
    retried, 180 s and more with no watchdog running yet. Reproduced here with each node's launcher started
    alone (its peer never starts), so that the other side is never there: node 0's rank 0 waits for a
    worker, node 1's rank 1 for a master. Each must end within dist_timeout_s, naming it, before anything
    is written; without the deadline each waits 65 s and more (the backend's timeout: 5 + 60)."""
    data = small_demo(tmp_path / "data")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    ports = [free_port(), free_port()]
    runs = [tmp_path / f"run{r}" for r in (0, 1)]
    cmds = [
        _node_cmd(hostfile, r, ports[r], "--ds", str(ROOT / "ds_configs/zero3.json"), "model.name_or_path=tiny",
                  f"datasets=[{data}]", f"run_dir={runs[r]}", "dist_timeout_s=5")
        for r in (0, 1)
    ]  # fmt: skip
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    codes = _run_nodes(cmds, logs, timeout=50)
    outs = [log.read_text() for log in logs]
    for r in (0, 1):
        assert codes[r] is not None, f"node {r} alone still waited after 50 s:\n{outs[r][-3000:]}"
        assert codes[r] != 0, outs[r][-3000:]
        assert f"rank {r} of 2: the process group did not form within" in outs[r], outs[r][-3000:]
        assert "(dist_timeout_s=5)" in outs[r], outs[r][-3000:]
        assert f"127.0.0.1:{ports[r]}" in outs[r], outs[r][-3000:]
        assert not runs[r].exists()  # refused before the run dir was claimed: nothing to clean up
    assert f"the other ranks did not all join it at 127.0.0.1:{ports[0]}" in outs[0]
    assert f"rank 0 at 127.0.0.1:{ports[1]} did not answer" in outs[1]
