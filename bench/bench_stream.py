"""StreamPipeline benchmark (run by hand): chunks/s and added latency versus a bare grpc.aio echo.

    python bench/bench_stream.py [--rounds 5] [--chunks 4000] [--streams 32] [--json FILE]
    python bench/bench_stream.py --against DIR   # also DIR's server (a source tree of this
        # repository, e.g. from ``git archive REV``), its variants in the same rounds

A server process hosts both a tensorline server and a bare grpc.aio bidirectional echo (a generic
handler with identity serializers that writes back every message it reads), on the event loop
`tensorline serve` runs (``Settings.event_loop``: uvloop by default), with the server's default
settings (sandbox pool included) but for the address. This process is the load generator. Each
round runs, interleaved, the echo and tensorline with a 1-node and a 3-node in-process pipeline
(PassThrough nodes) and a 3-node pipeline whose middle node runs sandboxed, on 1 KiB float32
chunks:

* throughput, 1 stream: one stream, a sender task writes ``--chunks`` chunks while the reader
  counts results; chunks/s = chunks / time from first send to last result;
* throughput, N streams: ``--streams`` such streams at once sharing the total, timed from the
  moment all of them are open (steady-state streaming; session setup is measured apart);
* latency: one stream, ping-pong (send one chunk, wait for its result), p50 over the round;
* session: open (init -> Ready) + one chunk + close (metrics), p50 over 20 sessions;
* server CPU per chunk: the server process's CPU time (its sandbox workers' included) over the
  N-stream throughput test, divided by the chunks: unlike wall time it barely moves with other
  load on the machine.

Tensorline is measured with its public client (encode, send, receive, decode); the echo client
sends pre-built bytes of the same size, so the ratio includes everything tensorline adds. The
table shows medians over rounds and the ratio to the echo of the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

CHUNK = np.zeros(256, dtype=np.float32)  # 1 KiB
ECHO_METHOD = "/bench.Echo/Stream"


# The tensorline variants: label -> (nodes, index of the node that runs sandboxed or None).
VARIANTS: dict[str, tuple[int, int | None]] = {
    "1-node": (1, None), "3-node": (3, None), "3-node sandbox": (3, 1)}


def manifest(variant: str) -> dict[str, Any]:
    nodes, sandboxed = VARIANTS[variant]
    declared: list[dict[str, Any]] = [{"id": f"n{i}", "node_type": "PassThrough"}
                                      for i in range(nodes)]
    if sandboxed is not None:
        declared[sandboxed]["runtime_hint"] = "sandbox"
    return {"version": "v1", "nodes": declared,
            "connections": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(nodes - 1)]}


# --- server process -----------------------------------------------------------------------------


async def _echo(request_iterator: Any, context: Any) -> None:
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        await context.write(message)


async def serve(settings: Any) -> None:
    from tensorline.server import create_server

    server, port = await create_server(settings)
    await server.start()
    await server.warmed()
    echo = grpc.aio.server()
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(_echo)}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    loop = type(asyncio.get_running_loop())
    print(f"{port} {echo_port} {loop.__module__}.{loop.__name__}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await echo.stop(0)
    await server.stop(0)


# --- load generator -----------------------------------------------------------------------------


class Gate:
    """Starts every stream's timed part at once, after all of them are open and warm: the
    figure is steady-state streaming, not session setup (reported separately)."""

    def __init__(self, streams: int) -> None:
        self.waiting = streams
        self.go = asyncio.Event()

    async def ready(self) -> float:
        self.waiting -= 1
        if self.waiting == 0:
            self.go.set()
        await self.go.wait()
        return time.perf_counter()


async def echo_throughput(channel: grpc.aio.Channel, chunks: int,
                          gate: Gate | None = None) -> tuple[float, float]:
    from tensorline.wire import encode_stream_chunk

    payload = encode_stream_chunk(0, "n0", "", CHUNK)  # same bytes as a tensorline chunk
    call = channel.stream_stream(ECHO_METHOD)()
    await call.write(payload)  # warm the call up before timing
    await call.read()
    started = await gate.ready() if gate else time.perf_counter()

    async def send() -> None:
        for _ in range(chunks):
            await call.write(payload)
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    received = 0
    while received < chunks:
        await call.read()
        received += 1
    ended = time.perf_counter()
    await sender
    return started, ended


async def tl_throughput(client: Any, variant: str, chunks: int,
                        gate: Gate | None = None) -> tuple[float, float]:
    async with client.stream(manifest(variant)) as s:
        await s.send("n0", CHUNK)
        await s.__anext__()
        started = await gate.ready() if gate else time.perf_counter()

        async def send() -> None:
            for _ in range(chunks):
                await s.send("n0", CHUNK)

        sender = asyncio.ensure_future(send())
        received = 0
        async for _ in s:
            received += 1
            if received == chunks:
                break
        ended = time.perf_counter()
        await sender
        await s.close()
    return started, ended


async def tl_session(client: Any, variant: str) -> float:
    """Open (init, every node initialized, Ready) + one chunk + close (drain, metrics)."""
    started = time.perf_counter()
    async with client.stream(manifest(variant)) as s:
        await s.send("n0", CHUNK)
        await s.close()
    return time.perf_counter() - started


async def echo_latency(channel: grpc.aio.Channel, count: int) -> list[float]:
    from tensorline.wire import encode_stream_chunk

    payload = encode_stream_chunk(0, "n0", "", CHUNK)
    call = channel.stream_stream(ECHO_METHOD)()
    times = []
    for _ in range(count + 10):
        started = time.perf_counter()
        await call.write(payload)
        await call.read()
        times.append(time.perf_counter() - started)
    await call.done_writing()
    return times[10:]


async def tl_latency(client: Any, variant: str, count: int) -> list[float]:
    times = []
    async with client.stream(manifest(variant)) as s:
        for _ in range(count + 10):
            started = time.perf_counter()
            await s.send("n0", CHUNK)
            await s.__anext__()
            times.append(time.perf_counter() - started)
        await s.close()
    return times[10:]


async def sessions(client: Any, variant: str, count: int = 20) -> list[float]:
    return [await tl_session(client, variant) for _ in range(count)]


async def single(run: Any) -> float:
    started, ended = await run()
    return float(ended - started)


async def concurrent(streams: int, run: Any) -> float:
    gate = Gate(streams)
    spans = await asyncio.gather(*(run(gate) for _ in range(streams)))
    return max(end for _, end in spans) - min(start for start, _ in spans)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` and its children (sandbox workers)."""
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return float(total)


async def bench(args: argparse.Namespace, port: int, echo_port: int, server_pid: int,
                against: tuple[int, int] | None = None) -> dict[str, float]:
    """``against``: the port and pid of a second server (``--against``): its variants run in
    the same rounds, labelled "... (against)"."""
    from tensorline.client import AsyncClient

    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    per_stream = max(1, args.chunks // args.streams)
    total_n = per_stream * args.streams
    many = f"c={args.streams}"
    async with contextlib.AsyncExitStack() as stack:
        echo = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}"))
        # label -> (client, variant, server pid)
        servers = [("", port, server_pid)] + ([(" (against)", *against)] if against else [])
        targets: dict[str, tuple[Any, str, int]] = {}
        for suffix, server_port, pid in servers:
            client = await stack.enter_async_context(AsyncClient(f"127.0.0.1:{server_port}"))
            for variant in VARIANTS:
                targets[variant + suffix] = (client, variant, pid)
        variants = ["echo", *targets]
        for round_ in range(args.rounds):
            # Interleaved: every variant of every test in each round, in an order that rotates
            # from round to round so that none always runs first (warm caches, drift).
            shift = round_ % len(variants)
            tests: list[Any] = []
            for variant in variants[shift:] + variants[:shift]:
                if variant == "echo":
                    tests.append(("echo c=1", lambda: single(
                        lambda: echo_throughput(echo, args.chunks)), args.chunks))
                    tests.append((f"echo {many}", lambda: concurrent(
                        args.streams, lambda g: echo_throughput(echo, per_stream, g)), total_n))
                    tests.append(("echo p50", lambda: echo_latency(echo, args.latency), 0))
                    continue
                label = variant
                c, v, _ = targets[label]
                tests.append((f"{label} c=1", lambda c=c, v=v: single(
                    lambda: tl_throughput(c, v, args.chunks)), args.chunks))
                tests.append((f"{label} {many}", lambda c=c, v=v: concurrent(
                    args.streams, lambda g: tl_throughput(c, v, per_stream, g)), total_n))
                tests.append((f"{label} p50", lambda c=c, v=v: tl_latency(c, v, args.latency),
                              0))
                tests.append((f"{label} session", lambda c=c, v=v: sessions(c, v), 0))
            for key, run, count in sorted(tests, key=lambda t: ("c=1" not in t[0],
                                                                "p50" in t[0])):
                pid = server_pid if key.startswith("echo") else targets[key.rsplit(" ", 1)[0]][2]
                cpu_before = cpu_seconds(pid)
                value = await run()
                if key.endswith(many):
                    add(key.replace(many, "cpu"), (cpu_seconds(pid) - cpu_before) / count)
                add(key, statistics.median(value) if count == 0 else count / value)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    figures: dict[str, float] = dict(med)
    names = list(targets)
    print(f"\n1 KiB float32 chunks, {args.rounds} interleaved rounds, medians "
          f"(server in a separate process)\n")
    print(f"{'test':<24}{'echo':>10}" + "".join(f"{n:>16}{'ratio':>8}" for n in names))
    for label, key in (("chunks/s, 1 stream", "c=1"),
                       (f"chunks/s, {args.streams} streams", many)):
        e = med[f"echo {key}"]
        row = f"{label:<24}{e:>10,.0f}"
        for n in names:
            figures[f"{n} {key} ratio"] = med[f"{n} {key}"] / e
            row += f"{med[f'{n} {key}']:>16,.0f}{med[f'{n} {key}'] / e:>7.2f}x"
        print(row)
    e = med["echo p50"]
    print(f"{'p50 latency (us)':<24}{e * 1e6:>10.0f}" + "".join(
        f"{med[f'{n} p50'] * 1e6:>16.0f}{med[f'{n} p50'] / e:>7.2f}x" for n in names))
    row = f"{'added p50 (us)':<24}{'':>10}"
    for n in names:
        figures[f"{n} added p50"] = med[f"{n} p50"] - e
        row += f"{(med[f'{n} p50'] - e) * 1e6:>16.0f}{'':>8}"
    print(row)
    print(f"{'session p50 (us)':<24}{'':>10}" + "".join(
        f"{med[f'{n} session'] * 1e6:>16.0f}{'':>8}" for n in names)
        + "   (open + 1 chunk + close)")
    print(f"{'server CPU/chunk (us)':<24}{med['echo cpu'] * 1e6:>10.1f}" + "".join(
        f"{med[f'{n} cpu'] * 1e6:>16.1f}{'':>8}" for n in names)
        + f"   (during the {args.streams}-stream test)")
    print("\ntargets: in-process 1-node and 3-node >= 0.8x echo at 1 stream, >= 0.6x at "
          f"{args.streams} streams, added p50 <= 150 us; 3-node with a sandboxed node >= 0.5x "
          "at 1 and at 32 streams")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--latency", type=int, default=1000, help="ping-pongs per round")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-server", metavar="FILE", help="cProfile the server into FILE")
    parser.add_argument("--against", metavar="DIR",
                        help="also measure DIR's server (a source tree of this repository)")
    args = parser.parse_args()
    if args.serve:
        from tensorline.server import Settings
        from tensorline.server._eventloop import run as run_on_event_loop

        # The product's defaults (event loop, sandbox pool, ...) but for the address.
        settings = Settings(host="127.0.0.1", port=0)
        run_on_event_loop(serve(settings), settings.event_loop)
        return
    profile = ["-m", "cProfile", "-o", args.profile_server] if args.profile_server else []
    servers: list[subprocess.Popen[str]] = []
    shim = tempfile.TemporaryDirectory(prefix="bench-stream-")

    def start(prefix: list[str], env: dict[str, str] | None = None) -> tuple[int, int, str]:
        server = subprocess.Popen([sys.executable, *prefix, os.path.abspath(__file__), "--serve"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        servers.append(server)
        assert server.stdout is not None
        port, echo_port, loop = server.stdout.readline().split()
        return int(port), int(echo_port), loop

    try:
        port, echo_port, loop = start(profile)
        against = None
        if args.against:
            from bench_unary import shim_for

            against_port, _, _ = start([], {"PYTHONPATH": shim_for(Path(args.against),
                                                                   Path(shim.name))})
            against = (against_port, servers[-1].pid)
        print(f"server and echo on {loop}", file=sys.stderr, flush=True)
        figures = asyncio.run(bench(args, port, echo_port, servers[0].pid, against))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"loop": loop, **figures}, handle, indent=2)
    finally:
        for server in servers:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=30)
        shim.cleanup()


if __name__ == "__main__":
    main()
