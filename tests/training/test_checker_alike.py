"""A checker that fails on one rank stops every rank with the same error, never one rank alone (which
would leave the other waiting in the eval's next collective): two gloo ranks spawned here."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp


def _checker_fails_on_rank0(prompt, generation, row):
    if row["rank"] == 0 and generation == "bad":
        raise KeyError("origin")
    return 2.0 if generation == "high" else 1.0


def _worker(rank: int, port: int, answers: list[str], out) -> None:
    import datetime

    from dpo_ds.training.generation import checked_total

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        scored = [("p", answers[rank], {"rank": rank})]
        out.put((rank, ("ok", checked_total(_checker_fails_on_rank0, scored))))
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        out.put((rank, (type(e).__name__, str(e))))
    finally:
        torch.distributed.destroy_process_group()


def _run(answers: list[str]) -> dict:
    from dpo_ds.dist.launcher import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, answers, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return results


@pytest.mark.parametrize(
    "answers, cause",
    [
        (["bad", "fine"], "rank 0: KeyError: 'origin'"),
        (["fine", "high"], "rank 1: ValueError: eval.checker returned 2.0"),
    ],
)
def test_one_ranks_checker_error_stops_both_ranks_alike(answers, cause):
    results = _run(answers)
    assert results[0] == results[1], results
    kind, message = results[0]
    assert kind == "ValueError" and message.startswith("eval.checker failed: ") and cause in message, results


def test_scores_sum_when_every_rank_checks():
    assert _run(["fine", "fine"]) == {0: ("ok", 1.0), 1: ("ok", 1.0)}
