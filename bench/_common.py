"""Pieces the benchmark scripts share: message limits, the two load loops, the bare grpc.aio
echo server that baselines are measured against, and the server-side CPU probe.

The scripts run as ``python bench/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

MiB = 1024 * 1024
LIMIT = 512 * MiB
OPTIONS = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length", LIMIT)]

Call = Callable[[], Awaitable[Any]]

# A bare grpc.aio server whose generic handler returns the request bytes unchanged (identity
# serializers): the floor any gRPC service on this machine pays. On the loop the environment
# names (TENSORLINE_EVENT_LOOP), resolved like `tensorline serve`; with BENCH_ECHO_HEAP_BUFFERS
# set (bytes), with the allocator tuning tensorline's server applies (Settings.heap_buffer_bytes),
# to tell that tuning's share of a large-payload figure from the rest.
ECHO_SERVER = """
import asyncio, os, sys, grpc
from tensorline.server._eventloop import run
from tensorline.server._memory import keep_heap_buffers
LIMIT = 512 * 1024 * 1024
keep_heap_buffers(int(os.environ.get("BENCH_ECHO_HEAP_BUFFERS", "0")))
async def main():
    server = grpc.aio.server(options=[("grpc.max_send_message_length", LIMIT),
                                      ("grpc.max_receive_message_length", LIMIT)])
    async def echo(request, context):
        return request
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
run(main(), os.environ.get("TENSORLINE_EVENT_LOOP", "auto"))
"""
ECHO_METHOD = "/bench.Echo/Echo"


def start_server(code: str, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], int]:
    """Run ``code`` (a server that prints its port as its first line) in a new interpreter
    (``prefix``, e.g. ``taskset -c 0``, goes before it); the process and its port."""
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("server process exited before reporting its port")
    return proc, int(line)


def rotated(keys: list[Any], round_: int) -> list[Any]:
    """The servers' order in round ``round_``: each goes first in turn, so that no server
    always follows the same one (measured: two identical servers differed by up to 10% when
    one always ran right after the echo)."""
    shift = round_ % len(keys)
    return keys[shift:] + keys[:shift]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """CPU time of a server process and its children (sandbox or inference workers): unlike
    wall time it barely moves with the load other processes put on the machine."""
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds of a server process by where they were spent: its event loop's thread (the
    main thread: both servers run their loop there), its other threads (gRPC's own, thread
    pools) and its children (sandbox workers). Threads and children that ended meanwhile are
    not counted, so compare splits over spans in which none did."""
    import psutil

    proc = psutil.Process(pid)
    loop = other = 0.0
    for thread in proc.threads():
        if thread.id == pid:
            loop += thread.user_time + thread.system_time
        else:
            other += thread.user_time + thread.system_time
    children = 0.0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += sum(child.cpu_times()[:2])
    return {"event loop": loop, "other threads": other, "workers": children}


def machine_ticks() -> tuple[int, int, int]:
    """The machine's CPU time so far, in clock ticks (``/proc/stat``): idle (idle and iowait),
    steal (taken by the hypervisor for other guests) and the total."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return fields[3] + fields[4], fields[7], sum(fields)


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
