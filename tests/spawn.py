"""Launch test workers as a 2-rank gloo group on CPU (shared by the distributed tests)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on localhost right now (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, args: tuple, nprocs: int = 2, seconds: float = 150) -> None:
    """Run worker(rank, *args) in `nprocs` spawned processes; fail the test after `seconds`."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {nprocs}-rank run did not finish in {seconds:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def join_group(rank: int, port: int, world: int = 2) -> None:
    """In a worker: one intra-op thread, then join the gloo group at localhost:`port`."""
    import torch
    import torch.distributed as dist

    from mmsoup.determinism import pin_process

    torch.set_num_threads(1)
    pin_process()  # oneDNN off in pinned mode, as in the single process it is compared with
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
