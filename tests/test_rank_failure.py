"""A rank that dies in the middle of a call: the others raise, naming the step and
the peer, within the transfer timeout, and the processes exit cleanly."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time

import pytest
import torch

from pool import free_port

TIMEOUT_S = 10  # TOKENRING_TIMEOUT_S for this test's workers


def _worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    import tokenring as tr

    # read when the runtime is made (the first call), not when tokenring is imported
    os.environ["TOKENRING_TIMEOUT_S"] = str(TIMEOUT_S)

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    q = torch.randn(1, 64, 4, 16)
    tr.token_ring_attn(q, q, q, causal=True, layout="zigzag")  # agreed: the next call skips checks
    dist.barrier()
    if rank == world - 1:
        os._exit(17)  # dies instead of making its second call
    start = time.monotonic()
    try:
        tr.token_ring_attn(q, q, q, causal=True, layout="zigzag")
        results.put((rank, "no error", time.monotonic() - start))
    except RuntimeError as err:
        results.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - start))
    results.close()
    results.join_thread()  # flush the report before leaving without teardown
    os._exit(0)  # the process group cannot be torn down cleanly with a dead peer


@pytest.mark.timeout(120)
def test_survivors_raise_naming_step_and_peer_when_a_rank_dies():
    world = 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    reports = {}
    try:
        while len(reports) < world - 1:
            rank, message, seconds = results.get(timeout=TIMEOUT_S + 60)
            reports[rank] = (message, seconds)
    except queue.Empty:
        pytest.fail(f"survivors did not report within the timeout; got {reports}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode is not None for p in procs), "a worker process was left running"
    assert procs[-1].exitcode == 17
    for rank, (message, seconds) in reports.items():
        assert message.startswith("TransferFailed: tokenring tokenring forward"), message
        assert f"rank {rank} of {world}, step " in message, message
        assert "group rank(s) [" in message, message
        assert f"within the timeout of {TIMEOUT_S} s" in message, message
        assert seconds <= TIMEOUT_S + 5, f"rank {rank} took {seconds:.1f}s to notice"
    # the rank that talks to the dead one directly must name it
    assert any(f"{world - 1}]" in m or f", {world - 1}" in m for m, _ in reports.values()), reports


@pytest.mark.timeout(120)
def test_a_transfer_timeout_given_to_the_launcher_is_the_one_a_stalled_transfer_reports():
    """``run_local(transfer_timeout_s=...)`` (the CLI's ``--transfer-timeout``) reaches the
    lanes: a peer that stalls past it makes the waiting rank fail, naming that timeout."""
    from reliability_cases import stall_worker
    from tokenring_bench.launch import WorkerFailed, run_local

    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_local(
            stall_worker, (20.0,), world=2, backend="gloo", timeout_s=60, transfer_timeout_s=3
        )
    message = str(info.value)
    assert "worker 0 failed" in message, message
    assert "TransferFailed" in message and "within the timeout of 3 s" in message, message
    assert time.monotonic() - start < 30, "the stall was noticed by the transfer timeout"


ABSENT_TIMEOUT_S = 3  # TOKENRING_TIMEOUT_S for the workers of the never-calls test


def _absent_worker(rank: int, world: int, port: int, results, lanes_first: bool) -> None:
    """Rank 0 makes a first call; rank 1 never does (it sleeps until it is killed)."""
    import torch.distributed as dist

    import tokenring as tr

    os.environ["TOKENRING_TIMEOUT_S"] = str(ABSENT_TIMEOUT_S)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    if lanes_first:
        tr.setup_lanes()  # collective: both ranks; only the agreement is left to wait for
    if rank == 1:
        time.sleep(120)
        os._exit(0)
    q = torch.randn(1, 16, 2, 8)
    start = time.monotonic()
    try:
        tr.token_ring_attn(q, q, q, causal=True)
        results.put((rank, "no error", time.monotonic() - start))
    except Exception as err:  # what a user sees, whatever its type
        results.put((rank, f"{type(err).__name__}: {err}", time.monotonic() - start))
    results.close()
    results.join_thread()
    os._exit(0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lanes_first", [True, False], ids=["agreement", "lanes"])
def test_a_rank_that_never_calls_makes_the_others_raise_within_the_timeout(lanes_first):
    """The first call waits for every rank (the lanes, then the agreement on the call's
    description) at most the runtime's timeout, not the process group's own."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_absent_worker, args=(r, 2, port, results, lanes_first), daemon=True)
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        rank, message, seconds = results.get(timeout=ABSENT_TIMEOUT_S + 60)
    except queue.Empty:
        pytest.fail("rank 0 did not report: its first call waited past the timeout")
    finally:
        procs[1].kill()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert rank == 0
    assert message.startswith("TransferFailed: "), message
    assert f"within the timeout of {ABSENT_TIMEOUT_S} s" in message, message
    assert seconds <= ABSENT_TIMEOUT_S + 5, f"rank 0 took {seconds:.1f}s to notice"
