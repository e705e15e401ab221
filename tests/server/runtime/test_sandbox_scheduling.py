"""The sandbox pool's scheduling in isolation: round robin among callers' waiters, stale
scratch dirs of dead servers removed at start (only theirs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tensorline.server.runtime.sandbox._records import _Waiters
from tensorline.server.runtime.sandbox._runtime import _remove_stale_scratch


async def test_waiters_are_served_round_robin_by_caller() -> None:
    loop = asyncio.get_running_loop()
    waiters = _Waiters()
    flood = [loop.create_future() for _ in range(4)]
    for f in flood:
        waiters.add("flooder", f)
    cheap = loop.create_future()
    waiters.add("other", cheap)
    flood[1].cancel()  # gave up: skipped
    order = [waiters.pop() for _ in range(4)]
    assert order == [flood[0], cheap, flood[2], flood[3]]
    assert waiters.pop() is None and not waiters


async def test_a_woken_waiter_that_found_no_worker_keeps_its_turn() -> None:
    loop = asyncio.get_running_loop()
    waiters = _Waiters()
    a, b, c = (loop.create_future() for _ in range(3))
    waiters.add("x", a)
    waiters.add("y", b)
    assert waiters.pop() is a
    waiters.add("x", c, again=True)
    assert waiters.pop() is c and waiters.pop() is b


def test_stale_scratch_dirs_of_dead_servers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"tensorline-sandbox-{dead.pid}"
    live = tmp_path / f"tensorline-sandbox-{os.getppid()}"
    other = tmp_path / "tensorline-proc-1"
    for d in (stale, live, other):
        (d / "w1").mkdir(parents=True)
    _remove_stale_scratch(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()
