"""The event loop's responsiveness with sync nodes run inline (on the loop) or in the threads.

Two tensorline servers run the product's defaults, except that the second one never runs a
sync node on the event loop (``TENSORLINE_INLINE_SYNC_MAX_MS=0``, the behaviour before inline
calls existed); rounds alternate between them, each going first in turn. In each scenario a
foreground client makes one fast call at a time (Scale, 1 KiB, a sync numpy node that the first
server runs inline once it has proved short) while background clients keep other node calls
running on the same server:

- ``quiet``: no background load, the fast call alone;
- ``slow``: 4 background calls at a time of BenchSleep (sync, blocks 20 ms every call: it is
  never inlined, it always runs in a thread);
- ``turns``: 2 background calls at a time of BenchSometimes (sync, returns at once, except one
  call in 200 blocks 50 ms): it earns inline runs, then one of its slow calls stalls the loop
  until it returns and sends it back to the threads for a longer streak each time.

Before the scenarios, on the first server alone: the thread hop itself, BenchScale (a sync
multiply, inline once proved short) against BenchScalePooled (the same class declared
``blocking=True``: always in a thread), 1 KiB, in the same process and rounds: p50 one call at
a time, calls/s with 32 in flight, and the server's CPU per call. Same server, same code path
but for the decision, so the machine's noise hits both alike.

For each scenario: the foreground's p50, p99 and max, how many of its calls took 20 ms or more (a
stall: only a blocked event loop, or a machine that stopped this process, makes a 1 KiB Scale
that slow), and the background's calls per second (the load the foreground competed with).
Shared-machine figures: read the two servers against each other, in the same run.

    python bench/bench_inline.py                # ~2 minutes
    python bench/bench_inline.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import grpc
import numpy as np
from _common import OPTIONS, latencies, run_and_save, throughput
from bench_unary import TENSORLINE_SERVER, cpu_seconds, percentile, rotated, start

from tensorline.wire import PortItem, decode_execute_response, encode_execute_request

HERE = os.path.dirname(os.path.abspath(__file__))
STALL_S = 0.020
SCENARIOS: dict[str, tuple[str, dict[str, Any], int]] = {
    "quiet": ("", {}, 0),
    "slow": ("BenchSleep", {"ms": 20.0}, 4),
    "turns": ("BenchSometimes", {"every": 200, "ms": 50.0}, 2),
}


def manifest(node_type: str, params: dict[str, Any]) -> str:
    return json.dumps({"nodes": [{"id": "p", "node_type": node_type, "params": params}]})


async def scenario(rpc: Any, name: str, calls: int) -> tuple[list[float], float]:
    """The foreground's latencies while the scenario's background load runs, and the
    background's calls per second."""
    node_type, params, background = SCENARIOS[name]
    fast = encode_execute_request(manifest("Scale", {"factor": 2.0}),
                                  [PortItem("p", "", np.ones(256, dtype=np.float32))])
    slow = (encode_execute_request(manifest(node_type, params),
                                   [PortItem("p", "", np.ones(256, dtype=np.float32))])
            if node_type else b"")
    done = False
    served = 0

    async def load() -> None:
        nonlocal served
        while not done:
            await rpc(slow)
            served += 1

    loaders = [asyncio.ensure_future(load()) for _ in range(background)]
    out = []
    began = time.perf_counter()
    try:
        for _ in range(calls):
            started = time.perf_counter()
            await rpc(fast)
            out.append(time.perf_counter() - started)
    finally:
        done = True
        await asyncio.gather(*loaders)
    return out, served / (time.perf_counter() - began)


async def hop(rpc: Any, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """BenchScale (inline) against BenchScalePooled (threads) on one server."""
    x = [PortItem("p", "", np.ones(256, dtype=np.float32))]
    requests = {kind: encode_execute_request(manifest(kind, {"factor": 2.0}), x)
                for kind in ("BenchScale", "BenchScalePooled")}

    def call(kind: str) -> Any:
        async def one() -> Any:
            return await rpc(requests[kind])
        return one

    for kind in requests:  # BenchScale earns its inline runs
        await latencies(call(kind), 100)
    lat: dict[str, list[float]] = {k: [] for k in requests}
    rates: dict[str, list[float]] = {k: [] for k in requests}
    cpu: dict[str, list[float]] = {k: [] for k in requests}
    n, total = (100, 1000) if args.quick else (400, 3000)
    for round_ in range(args.rounds * 2):
        for kind in rotated(list(requests), round_):
            lat[kind] += await latencies(call(kind), n)
            before = cpu_seconds(pid)
            rates[kind].append((await throughput(call(kind), total, 32))[0])
            cpu[kind].append((cpu_seconds(pid) - before) / total * 1e6)
    out = {k: {"p50_ms": statistics.median(lat[k]) * 1e3, "calls_s": statistics.median(rates[k]),
               "server_cpu_us_per_call": statistics.median(cpu[k])} for k in requests}
    a, b = out["BenchScale"], out["BenchScalePooled"]
    print("the hop, one server, 1 KiB: inline (BenchScale) vs threads (BenchScalePooled)")
    print(f"  p50 {a['p50_ms']:.3f} vs {b['p50_ms']:.3f} ms ({a['p50_ms'] - b['p50_ms']:+.3f}); "
          f"calls/s at 32 in flight {a['calls_s']:,.0f} vs {b['calls_s']:,.0f} "
          f"({a['calls_s'] / b['calls_s']:.2f}x); server CPU per call "
          f"{a['server_cpu_us_per_call']:.0f} vs {b['server_cpu_us_per_call']:.0f} us")
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    env = {"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
           "TENSORLINE_NODE_MODULES": "_pace_nodes"}
    servers = {"inline": start(TENSORLINE_SERVER, env),
               "threads": start(TENSORLINE_SERVER, {**env, "TENSORLINE_INLINE_SYNC_MAX_MS": "0"})}
    calls = 150 if args.quick else 500
    results: dict[str, Any] = {}
    try:
        channels = {k: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
                    for k, (_, port) in servers.items()}
        rpcs = {k: ch.unary_unary("/tensorline.v1.PipelineService/ExecutePipeline",
                                  request_serializer=None,
                                  response_deserializer=decode_execute_response)
                for k, ch in channels.items()}
        for rpc in rpcs.values():  # warm: Scale earns its inline runs on the first server
            await scenario(rpc, "quiet", 100)
        results["hop"] = await hop(rpcs["inline"], servers["inline"][0].pid, args)
        print(f"foreground: Scale 1 KiB, one call at a time; {args.rounds} rounds x {calls} "
              "calls per server and scenario (ms; stalls = calls of 20 ms or more)")
        print(f"{'scenario':>8} {'server':>8} {'p50':>7} {'p99':>7} {'max':>7} {'stalls':>6} "
              f"{'bg calls/s':>10}")
        for name in SCENARIOS:
            samples: dict[str, list[float]] = {k: [] for k in rpcs}
            rates: dict[str, list[float]] = {k: [] for k in rpcs}
            for round_ in range(args.rounds):
                for key in rotated(list(rpcs), round_):
                    latencies, rate = await scenario(rpcs[key], name, calls)
                    samples[key] += latencies
                    rates[key].append(rate)
            results[name] = {}
            for key, values in samples.items():
                row = {"p50_ms": statistics.median(values) * 1e3,
                       "p99_ms": percentile(values, 0.99) * 1e3, "max_ms": max(values) * 1e3,
                       "stalls": sum(1 for v in values if v >= STALL_S), "calls": len(values),
                       "background_calls_s": statistics.median(rates[key])}
                results[name][key] = row
                print(f"{name:>8} {key:>8} {row['p50_ms']:7.3f} {row['p99_ms']:7.3f} "
                      f"{row['max_ms']:7.1f} {row['stalls']:6d} {row['background_calls_s']:10,.0f}")
        for ch in channels.values():
            await ch.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    run_and_save(main, parser)
