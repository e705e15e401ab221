"""Pieces the benchmark scripts share: message limits and the two load loops.

The scripts run as ``python bench/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

MiB = 1024 * 1024
LIMIT = 512 * MiB
OPTIONS = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]

Call = Callable[[], Awaitable[Any]]


async def latencies(call: Call, count: int) -> list[float]:
    """Seconds per call for ``count`` calls made one after another."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        out.append(time.perf_counter() - started)
    return out


async def throughput(call: Call, total: int, concurrency: int) -> tuple[float, list[float]]:
    """Calls per second over ``total`` calls at ``concurrency``, and each call's latency."""
    remaining = total
    each: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            each.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started), each


def run_and_save(main: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
                 parser: argparse.ArgumentParser) -> None:
    """Run ``main`` with the parsed arguments; with ``--json FILE``, write its figures there."""
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(figures, handle, indent=2)
        print(f"\nwrote {arguments.json}")
