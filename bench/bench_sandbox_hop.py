"""Cost of one sandboxed hop against the in-process call, by payload size (run by hand).

    python bench/bench_sandbox_hop.py [--rounds 7] [--sizes 1KiB,1MiB,64MiB]

A pass-through node is called through ``InProcessRuntime`` and ``SandboxRuntime`` in the same
process, interleaved in rounds (A B A B ...) so drift on a shared machine hits both; the tables
show per-call medians over all rounds:

* ``warm``: ``process()`` on an acquired reusable instance (the hop itself);
* ``per request``: ``acquire`` + ``process`` + ``release`` of a fresh non-reusable instance,
  which is what the executor does for each request.

"direct" is a plain call of the node's method, for scale. ``--io`` also measures the bare
wake-up floor: a ping-pong with a child that sleeps, polls or shares one CPU (what the
wake-ups of a round trip cost on this machine), and the two ways the event loop can wait for a
worker's reply (why the runtime uses ``loop.add_reader`` rather than a reader thread).
``--batches 1,4,16`` also times a one-shot node's ``call_batch`` (what a stream session sends
for the chunks queued for a sandboxed node) per input set. ``--no-co-locate`` turns off the
runtime's CPU placement (``sandbox._placement``), to measure the hop with its two cross-CPU
wake-ups. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import Node, NodeEntry
from tensorline.server.runtime import ExecutionScope, InProcessRuntime, Runtime, SandboxRuntime
from tensorline.server.selector import RuntimeDecision

# The worker imports the node by module name: make this directory's module importable there.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {"1KiB": 1 << 10, "16KiB": 16 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20,
         "16MiB": 16 << 20, "64MiB": 64 << 20}


class BenchPassThrough(Node):
    """Returns its input (warm: kept across calls)."""

    reusable = True

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class BenchFresh(Node):
    """Returns its input (a fresh instance per request)."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


def spec_for(cls: type[Node]) -> NodeSpec:
    params = cls.Params()
    return NodeSpec("bench", NodeEntry.of(cls, cls.__module__, True), params,
                    params.model_dump_json(), RuntimeDecision("sandbox", "bench"), None, {})


async def timed_calls(runtime: Runtime, spec: NodeSpec, data: np.ndarray, n: int) -> list[float]:
    instance = await runtime.acquire(spec, ExecutionScope("bench"))
    try:
        out: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            await instance.process({"in": data})
            out.append(time.perf_counter() - start)
        return out
    finally:
        await runtime.release(instance)


async def timed_requests(runtime: Runtime, spec: NodeSpec, data: np.ndarray,
                         n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        instance = await runtime.acquire(spec, ExecutionScope("bench"))
        try:
            await instance.process({"in": data})
        finally:
            await runtime.release(instance)
        out.append(time.perf_counter() - start)
    return out


def timed_direct(node: Node, data: np.ndarray, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        node.process({"in": data})
        out.append(time.perf_counter() - start)
    return out


async def io_floor(n: int = 5000) -> None:
    """Round trip of 1 KiB to an echoing child process: add_reader vs a reader thread."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()  # a bare child: no gRPC in this process
    if pid == 0:
        parent.close()
        while data := child.recv(1 << 17):
            child.send(data)
        os._exit(0)
    child.close()
    loop = asyncio.get_running_loop()
    payload = b"x" * 1024

    async def with_add_reader() -> float:
        parent.setblocking(False)
        box: list[asyncio.Future[bytes]] = []
        loop.add_reader(parent.fileno(), lambda: box[0].set_result(parent.recv(1 << 17)))
        start = time.perf_counter()
        for _ in range(n):
            box[:] = [loop.create_future()]
            parent.send(payload)
            await box[0]
        loop.remove_reader(parent.fileno())
        return (time.perf_counter() - start) / n

    async def with_thread() -> float:
        parent.setblocking(True)
        box: list[asyncio.Future[bytes]] = []
        ready = threading.Semaphore(0)

        def reader() -> None:
            for _ in range(n):
                data = parent.recv(1 << 17)
                loop.call_soon_threadsafe(box[0].set_result, data)
                ready.acquire()

        thread = threading.Thread(target=reader)
        thread.start()
        start = time.perf_counter()
        for _ in range(n):
            box[:] = [loop.create_future()]
            parent.send(payload)
            await box[0]
            ready.release()
        elapsed = (time.perf_counter() - start) / n
        thread.join()
        return elapsed

    try:
        a = [await with_add_reader() for _ in range(3)]
        b = [await with_thread() for _ in range(3)]
    finally:
        parent.close()
        await asyncio.to_thread(os.waitpid, pid, 0)
    print(f"bare 1 KiB round trip: loop.add_reader {fmt(statistics.median(a))}, "
          f"reader thread + call_soon_threadsafe {fmt(statistics.median(b))}")


def wake_floor(n: int = 5000) -> None:
    """(``--io``) What the wake-ups of a round trip cost on this machine: a bare 1 KiB ping-pong
    with a forked child (no event loop), p50 of ``n``, when the child sleeps in ``recv`` (as a
    worker does), when it polls instead (never asleep: no wake-up to pay for it), and when
    both sleep but share one CPU (a wake-up with no other CPU to interrupt)."""

    def trips(mode: str) -> float:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        allowed = os.sched_getaffinity(0)
        pid = os.fork()
        if pid == 0:
            parent.close()
            if mode == "one CPU":
                os.sched_setaffinity(0, {min(allowed)})
            while True:
                if mode == "polls":
                    try:
                        data = child.recv(1 << 17, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                else:
                    data = child.recv(1 << 17)
                if not data:
                    os._exit(0)
                child.send(data)
        child.close()
        if mode == "one CPU":
            os.sched_setaffinity(0, {min(allowed)})
        payload = b"x" * 1024
        each = []
        try:
            for _ in range(n):
                start = time.perf_counter()
                parent.send(payload)
                parent.recv(1 << 17)
                each.append(time.perf_counter() - start)
        finally:
            parent.close()
            os.waitpid(pid, 0)
            os.sched_setaffinity(0, allowed)
        return statistics.median(each)

    modes = ("sleeps", "polls", "one CPU")
    figures = {mode: statistics.median(trips(mode) for _ in range(3)) for mode in modes}
    print("bare 1 KiB round trip, no event loop (p50): the child "
          + ", ".join(f"{mode} {fmt(value)}" for mode, value in figures.items()))


def calls_for(nbytes: int) -> int:
    return max(5, min(2000, (256 << 20) // max(nbytes, 1)))


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f} µs" if us < 10_000 else f"{us / 1000:,.2f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="1KiB,1MiB,64MiB")
    parser.add_argument("--io", action="store_true", help="also measure the wake-up floor")
    parser.add_argument("--no-co-locate", action="store_true",
                        help="leave workers where the scheduler puts them (the sandbox's "
                             "co_locate off: two cross-CPU wake-ups a call)")
    parser.add_argument("--batches", default="", metavar="K,K,...",
                        help="also time call_batch of K input sets (e.g. 1,4,16)")
    args = parser.parse_args()
    if args.io:
        wake_floor()
        await io_floor()
    # Import by module name (not __main__) so the worker can load the node classes.
    from bench_sandbox_hop import BenchFresh, BenchPassThrough

    from tensorline.server.nodes import NodeContext

    warm, fresh = spec_for(BenchPassThrough), spec_for(BenchFresh)
    direct = BenchPassThrough(BenchPassThrough.Params(), NodeContext("d", "d", "direct"))
    inprocess = InProcessRuntime()
    sandbox = SandboxRuntime(workers=1, co_locate=not args.no_co_locate)
    await inprocess.start()
    await sandbox.start()
    try:
        tables: dict[str, list[tuple[str, ...]]] = {"warm": [], "per request": []}
        for label in args.sizes.split(","):
            nbytes = SIZES[label]
            data = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
            n = calls_for(nbytes)
            for mode, measure, spec in (("warm", timed_calls, warm),
                                        ("per request", timed_requests, fresh)):
                for runtime in (inprocess, sandbox):  # warm-up: segments grown, modules loaded
                    await measure(runtime, spec, data, min(n, 50))
                d: list[float] = []
                a: list[float] = []
                b: list[float] = []
                for _ in range(args.rounds):
                    d += timed_direct(direct, data, n)
                    a += await measure(inprocess, spec, data, n)
                    b += await measure(sandbox, spec, data, n)
                md, ma, mb = (statistics.median(x) for x in (d, a, b))
                tables[mode].append((label, fmt(md), fmt(ma), fmt(mb), fmt(mb - md),
                                     fmt(mb - ma), str(len(b))))
        header = ("payload", "direct", "in-process", "sandbox", "sandbox - direct",
                  "sandbox - in-process", "calls")
        for mode, rows in tables.items():
            print(f"\n{mode} (p50 per call)")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, tuple("-" * w for w in widths), *rows]:
                print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if args.batches:
            await batch_table(sandbox, fresh, [int(k) for k in args.batches.split(",")],
                              args.rounds)
    finally:
        await sandbox.shutdown()
        await inprocess.shutdown()


async def batch_table(runtime: SandboxRuntime, spec: NodeSpec, sizes: list[int],
                      rounds: int) -> None:
    """A one-shot node on 1 KiB input sets, ``k`` per ``call_batch`` (k = 1 is a plain
    ``call``), as a stream session's stage sends what queued in its inbox: time per input set
    with one caller, and with 32 callers at once the input sets per second and the CPU each
    costs (this process and the workers together)."""
    from _common import cpu_seconds

    data = np.random.default_rng(0).random(256, dtype=np.float32)

    def cpu() -> float:
        return cpu_seconds(os.getpid())

    async def one_caller(k: int, n: int) -> list[float]:
        scope, out = ExecutionScope("bench"), []
        for _ in range(n):
            start = time.perf_counter()
            values, failure, _ = await runtime.call_batch(spec, scope, [{"in": data}] * k)
            assert failure is None and len(values) == k
            out.append((time.perf_counter() - start) / k)
        return out

    async def callers(k: int, seconds: float) -> tuple[float, float]:
        done = [0]

        async def caller() -> None:
            scope, stop = ExecutionScope("bench"), time.perf_counter() + seconds
            while time.perf_counter() < stop:
                values, failure, _ = await runtime.call_batch(spec, scope, [{"in": data}] * k)
                assert failure is None and len(values) == k
                done[0] += k

        before, start = cpu(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(32)))
        return done[0] / (time.perf_counter() - start), (cpu() - before) / done[0]

    rows: dict[int, tuple[list[float], list[float], list[float]]] = {k: ([], [], []) for k in sizes}
    for k in sizes:  # warm-up
        await one_caller(k, 20)
    for _ in range(rounds):
        for k in sizes:
            latency, rate, cost = rows[k]
            latency += await one_caller(k, max(20, 2000 // k))
            per_second, per_set = await callers(k, 1.0)
            rate.append(per_second)
            cost.append(per_set)
    header = ("input sets per call", "1 caller: per input set", "32 callers: input sets/s",
              "CPU per input set")
    table = [(str(k), fmt(statistics.median(a)), f"{statistics.median(b):,.0f}",
              fmt(statistics.median(c))) for k, (a, b, c) in rows.items()]
    print("\nbatches of a one-shot node, 1 KiB input sets (medians over rounds)")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    asyncio.run(main())
