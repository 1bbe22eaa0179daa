"""Run a function in several spawned processes with a deadline, for the multi-process tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def spawn_and_wait(
    worker: Callable[..., Any], args: tuple[Any, ...], nprocs: int, *, timeout_s: float, what: str
) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes; fail the test past ``timeout_s``.

    A worker that hangs (a collective whose peer died) would otherwise hang the suite: the
    processes are killed at the deadline, and a worker's exception fails the test with its
    traceback (``ProcessRaisedException``).
    """
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
