"""StreamPipeline benchmark (run by hand): chunks/s and added latency versus a bare grpc.aio echo.

    python bench/bench_stream.py [--rounds 5] [--chunks 4000] [--streams 32]

A server process hosts both a tensorline server and a bare grpc.aio bidirectional echo (a generic
handler with identity serializers that writes back every message it reads). This process is the
load generator. Each round runs, interleaved, the echo and tensorline with a 1-node and a 3-node
in-process pipeline (PassThrough nodes) on 1 KiB float32 chunks:

* throughput, 1 stream: one stream, a sender task writes ``--chunks`` chunks while the reader
  counts results; chunks/s = chunks / time from first send to last result;
* throughput, N streams: ``--streams`` such streams at once sharing the total, timed from the
  moment all of them are open (steady-state streaming; session setup is measured apart);
* latency: one stream, ping-pong (send one chunk, wait for its result), p50 over the round;
* session: open (init -> Ready) + one chunk + close (metrics), p50 over 20 sessions.

Tensorline is measured with its public client (encode, send, receive, decode); the echo client
sends pre-built bytes of the same size, so the ratio includes everything tensorline adds. The
table shows medians over rounds and the ratio to the echo of the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc
import numpy as np

CHUNK = np.zeros(256, dtype=np.float32)  # 1 KiB
ECHO_METHOD = "/bench.Echo/Stream"


def manifest(nodes: int) -> dict[str, Any]:
    return {"version": "v1",
            "nodes": [{"id": f"n{i}", "node_type": "PassThrough"} for i in range(nodes)],
            "connections": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(nodes - 1)]}


# --- server process -----------------------------------------------------------------------------


async def _echo(request_iterator: Any, context: Any) -> None:
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        await context.write(message)


async def serve() -> None:
    from tensorline.server import Settings, create_server

    server, port = await create_server(Settings(host="127.0.0.1", port=0, reflection=False,
                                                load_entry_points=False))
    await server.start()
    echo = grpc.aio.server()
    echo.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Stream": grpc.stream_stream_rpc_method_handler(_echo)}),))
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    print(f"{port} {echo_port}", flush=True)
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


async def tl_throughput(client: Any, nodes: int, chunks: int,
                        gate: Gate | None = None) -> tuple[float, float]:
    async with client.stream(manifest(nodes)) as s:
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


async def tl_session(client: Any, nodes: int) -> float:
    """Open (init, every node initialized, Ready) + one chunk + close (drain, metrics)."""
    started = time.perf_counter()
    async with client.stream(manifest(nodes)) as s:
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


async def tl_latency(client: Any, nodes: int, count: int) -> list[float]:
    times = []
    async with client.stream(manifest(nodes)) as s:
        for _ in range(count + 10):
            started = time.perf_counter()
            await s.send("n0", CHUNK)
            await s.__anext__()
            times.append(time.perf_counter() - started)
        await s.close()
    return times[10:]


async def sessions(client: Any, nodes: int, count: int = 20) -> list[float]:
    return [await tl_session(client, nodes) for _ in range(count)]


async def single(run: Any) -> float:
    started, ended = await run()
    return float(ended - started)


async def concurrent(streams: int, run: Any) -> float:
    gate = Gate(streams)
    spans = await asyncio.gather(*(run(gate) for _ in range(streams)))
    return max(end for _, end in spans) - min(start for start, _ in spans)


async def bench(args: argparse.Namespace, port: int, echo_port: int) -> None:
    from tensorline.client import AsyncClient

    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    per_stream = max(1, args.chunks // args.streams)
    total_n = per_stream * args.streams
    async with AsyncClient(f"127.0.0.1:{port}") as client, \
            grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as echo:
        for round_ in range(args.rounds):
            # Interleaved: every variant of every test in each round, in an order that rotates
            # from round to round so that none always runs first (warm caches, drift).
            def rotate(items: list[Any], shift: int = round_ % 3) -> list[Any]:
                return items[shift:] + items[:shift]

            tests: list[Any] = []
            for variant in rotate(["echo", 1, 3]):
                if variant == "echo":
                    tests.append(("echo c=1", lambda: single(
                        lambda: echo_throughput(echo, args.chunks)), args.chunks))
                    tests.append((f"echo c={args.streams}", lambda: concurrent(
                        args.streams, lambda g: echo_throughput(echo, per_stream, g)), total_n))
                    tests.append(("echo p50", lambda: echo_latency(echo, args.latency), 0))
                else:
                    n = variant
                    tests.append((f"{n}-node c=1", lambda n=n: single(
                        lambda: tl_throughput(client, n, args.chunks)), args.chunks))
                    tests.append((f"{n}-node c={args.streams}", lambda n=n: concurrent(
                        args.streams, lambda g: tl_throughput(client, n, per_stream, g)),
                        total_n))
                    tests.append((f"{n}-node p50", lambda n=n: tl_latency(client, n, args.latency),
                                  0))
                    tests.append((f"{n}-node session", lambda n=n: sessions(client, n), 0))
            for key, run, count in sorted(tests, key=lambda t: ("c=1" not in t[0],
                                                                 "p50" in t[0])):
                value = await run()
                add(key, statistics.median(value) if count == 0 else count / value)
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n1 KiB float32 chunks, {args.rounds} interleaved rounds, medians "
          f"(server in a separate process)\n")
    print(f"{'test':<22}{'echo':>14}{'1-node':>14}{'ratio':>8}{'3-node':>14}{'ratio':>8}")
    for label, key in (("chunks/s, 1 stream", "c=1"), (f"chunks/s, {args.streams} streams",
                                                        f"c={args.streams}")):
        e, one, three = med[f"echo {key}"], med[f"1-node {key}"], med[f"3-node {key}"]
        print(f"{label:<22}{e:>14,.0f}{one:>14,.0f}{one / e:>7.2f}x{three:>14,.0f}"
              f"{three / e:>7.2f}x")
    e, one, three = med["echo p50"], med["1-node p50"], med["3-node p50"]
    print(f"{'p50 latency (us)':<22}{e * 1e6:>14.0f}{one * 1e6:>14.0f}{one / e:>7.2f}x"
          f"{three * 1e6:>14.0f}{three / e:>7.2f}x")
    print(f"{'added p50 (us)':<22}{'':>14}{(one - e) * 1e6:>14.0f}{'':>8}{(three - e) * 1e6:>14.0f}")
    print(f"{'session p50 (us)':<22}{'':>14}{med['1-node session'] * 1e6:>14.0f}{'':>8}"
          f"{med['3-node session'] * 1e6:>14.0f}   (open + 1 chunk + close)")
    print("\ntargets: >= 0.6x echo at 1 stream, >= 0.5x at 32 streams, added p50 <= 150 us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--latency", type=int, default=1000, help="ping-pongs per round")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-server", metavar="FILE", help="cProfile the server into FILE")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    profile = ["-m", "cProfile", "-o", args.profile_server] if args.profile_server else []
    server = subprocess.Popen([sys.executable, *profile, os.path.abspath(__file__), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port, echo_port = map(int, server.stdout.readline().split())
        asyncio.run(bench(args, port, echo_port))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
