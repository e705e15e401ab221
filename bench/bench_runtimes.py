"""In-process versus sandboxed runtimes: per-node latency and throughput, the cost of one process
hop by payload size, server and worker memory, and GIL contention.

One tensorline server runs in its own process (with the ecosystem nodes loaded); this process is
the load generator. Every comparison runs both runtimes on that same server in the same run,
forced with ``runtime_hint``, in alternating rounds (in-process, sandbox, sandbox, in-process, ...)
so drift on a noisy 2-core machine hits both alike. Figures are medians; ratios are
sandbox / in-process (the in-process figure is the baseline).

    python bench/bench_runtimes.py                 # full run (~10 minutes on 2 cores)
    python bench/bench_runtimes.py --quick         # fewer calls
    python bench/bench_runtimes.py --json out.json --only nodes,hop,memory,gil

Server settings can be changed through the environment (``TENSORLINE_*``), e.g. the sandbox
pool size. Without a sandbox runtime on the server the sandboxed columns say so and stay empty.

Sections:
- nodes: p50 latency at concurrency 1 and throughput at concurrency 8 of a trivial node
  (PassThrough, 1 KiB) and of each ecosystem node on a realistic input.
- hop: PassThrough by payload size (1 KiB .. 64 MiB); the added p50 of the sandboxed call is the
  cost of one process hop there and back (shared memory / control channel).
- memory: RSS (and USS, the memory unique to a process) of the server and of every worker at
  idle, at the peak of a sandboxed load of the ecosystem nodes, and at the peak of the same load
  in-process (psutil, sampled every 50 ms).
- gil: 1, 2, 4 concurrent calls of the pure-Python PyHashChain node in-process versus sandboxed
  (calls/s and p50), the p50 of a trivial in-process call while two PyHashChain calls keep
  running in each runtime, and the same pure-Python work in 1 versus 2 plain processes (the
  parallel speedup the machine offers at that moment: the ceiling for the worker pool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import psutil
from _common import OPTIONS, MiB, latencies, run_and_save, throughput

from tensorline.wire import (
    Audio,
    DecodedExecuteResponse,
    Json,
    PortItem,
    decode_execute_response,
    encode_execute_request,
)

RUNTIMES = ("inprocess", "sandbox")

# On the event loop `tensorline serve` uses (Settings.event_loop, TENSORLINE_EVENT_LOOP).
SERVER = """
import asyncio, os
from tensorline.server import Settings, create_server
from tensorline.server._eventloop import run
async def main():
    server, port = await create_server(Settings(
        host="127.0.0.1", port=0, load_entry_points=False,
        node_modules=["tensorline.server.nodes.ecosystem"],
        max_message_bytes=512 * 1024 * 1024, max_tensor_bytes=256 * 1024 * 1024))
    await server.start()
    print(port, os.getpid(), flush=True)
    await server.wait_for_termination()
run(main(), os.environ.get("TENSORLINE_EVENT_LOOP", "auto"))
"""

GIL_ITERATIONS = 250_000  # ~45 ms of pure-Python work per call on this kind of machine


def start_server() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("server process exited before reporting its port")
    return proc, int(line.split()[0])


# ------------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Workload:
    label: str
    node_type: str
    params: dict[str, Any]
    inputs: dict[str, Any]  # port -> value

    def manifest(self, runtime: str) -> str:
        return json.dumps({"nodes": [{"id": "n", "node_type": self.node_type,
                                      "params": self.params, "runtime_hint": runtime}]})

    def items(self) -> list[PortItem]:
        return [PortItem("n", port, value) for port, value in self.inputs.items()]


def audio(rate: int, seconds: float, dtype: str = "float32") -> Audio:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    x = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * rng.standard_normal(t.size)
    if dtype == "int16":
        return Audio(np.round(x * 32767).astype(np.int16), rate)
    return Audio(x.astype(dtype), rate)


def workloads() -> list[Workload]:
    rng = np.random.default_rng(1)
    table = np.column_stack([rng.integers(0, 16, 10_000), rng.integers(1, 9, 10_000),
                             rng.uniform(0, 50, 10_000), rng.uniform(0, 1, 10_000)])
    return [
        Workload("PassThrough 1 KiB", "PassThrough", {}, {"in": np.ones(256, np.float32)}),
        Workload("AudioResample 1 s 44.1k->16k", "AudioResample", {"target_rate": 16000},
                 {"in": audio(44100, 1.0, "int16")}),
        Workload("ButterLowpass 1 s 16 kHz", "ButterLowpass", {"cutoff_hz": 2000, "order": 6},
                 {"in": audio(16000, 1.0)}),
        Workload("DataFrameAggregate 10k x 4", "DataFrameAggregate",
                 {"group_by": ["k"], "agg": {"q": ["sum", "mean"], "p": ["max", "std"]}},
                 {"in": table, "columns": Json(["k", "q", "p", "w"])}),
        Workload("TorchSpectrogram 1 s log-mel", "TorchSpectrogram",
                 {"n_fft": 512, "hop_length": 160, "n_mels": 40, "power": 2, "log": True},
                 {"in": audio(16000, 1.0)}),
        Workload("TorchMLP 100 x 40", "TorchMLP",
                 {"in_features": 40, "hidden": [64, 32], "out_features": 4, "seed": 1},
                 {"in": rng.standard_normal((100, 40)).astype(np.float32)}),
        Workload("PyHashChain 50k steps", "PyHashChain", {"iterations": 50_000},
                 {"in": np.arange(4, dtype=np.int64)}),
    ]


# ------------------------------------------------------------------------------------------------
# Measuring

Call = Callable[[], Awaitable[DecodedExecuteResponse]]


class Bench:
    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        self.rpc = self.channel.unary_unary(
            "/tensorline.v1.PipelineService/ExecutePipeline", request_serializer=None,
            response_deserializer=decode_execute_response)

    def call(self, workload: Workload, runtime: str) -> Call:
        request = encode_execute_request(workload.manifest(runtime), workload.items())

        async def run() -> DecodedExecuteResponse:
            reply: DecodedExecuteResponse = await self.rpc(request, timeout=600)
            return reply

        return run

    async def runtime_of(self, workload: Workload, runtime: str) -> str:
        reply = await self.call(workload, runtime)()
        return str(reply.metrics.nodes[0].runtime)


def ordered(round_index: int) -> tuple[str, ...]:
    """A B, B A, A B, ...: neither runtime always goes first."""
    return RUNTIMES if round_index % 2 == 0 else RUNTIMES[::-1]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------------------------------------
# Sections


async def section_nodes(bench: Bench, runtimes: tuple[str, ...], rounds: int,
                        scale: float) -> list[dict[str, Any]]:
    print("\n## Per node: p50 latency at concurrency 1, throughput at concurrency 8 "
          "(ratio = sandbox / in-process)")
    print(f"{'workload':<32} {'ip p50 ms':>10} {'sb p50 ms':>10} {'ratio':>7} "
          f"{'ip calls/s':>11} {'sb calls/s':>11} {'ratio':>7}")
    rows = []
    for workload in workloads():
        calls = {rt: bench.call(workload, rt) for rt in runtimes}
        for call in calls.values():  # warm: imports, warm instances, plan cache
            for _ in range(3):
                await call()
        lat: dict[str, list[float]] = {rt: [] for rt in runtimes}
        rate: dict[str, list[float]] = {rt: [] for rt in runtimes}
        count = max(3, int(40 * scale))
        for index in range(rounds):
            for rt in ordered(index):
                if rt in calls:
                    lat[rt] += await latencies(calls[rt], count)
                    rate[rt].append((await throughput(calls[rt], count * 2, 8))[0])
        p50 = {rt: statistics.median(lat[rt]) for rt in runtimes}
        rps = {rt: statistics.median(rate[rt]) for rt in runtimes}
        ip50, sb50 = p50.get("inprocess"), p50.get("sandbox")
        iprs, sbrs = rps.get("inprocess"), rps.get("sandbox")
        row = {"workload": workload.label, "inprocess_p50_ms": ip50 and ip50 * 1e3,
               "sandbox_p50_ms": sb50 and sb50 * 1e3, "p50_ratio": ratio(sb50, ip50),
               "inprocess_calls_s": iprs, "sandbox_calls_s": sbrs,
               "throughput_ratio": ratio(sbrs, iprs)}
        rows.append(row)
        print(f"{workload.label:<32} {ms(ip50):>10} {ms(sb50):>10} "
              f"{fmt_ratio(row['p50_ratio']):>7} {iprs or 0:11,.0f} "
              f"{'-' if sbrs is None else f'{sbrs:,.0f}':>11} "
              f"{fmt_ratio(row['throughput_ratio']):>7}")
    return rows


async def section_hop(bench: Bench, runtimes: tuple[str, ...], rounds: int,
                      scale: float) -> list[dict[str, Any]]:
    print("\n## One process hop by payload size: PassThrough float32, p50 at concurrency 1 "
          "(added = sandbox - in-process)")
    print(f"{'payload':>8} {'ip p50 ms':>10} {'sb p50 ms':>10} {'added ms':>9} {'ratio':>7}")
    rows = []
    for label, nbytes, count in [("1 KiB", 1024, 200), ("64 KiB", 64 * 1024, 150),
                                 ("1 MiB", MiB, 60), ("16 MiB", 16 * MiB, 10),
                                 ("64 MiB", 64 * MiB, 4)]:
        workload = Workload(label, "PassThrough", {}, {"in": np.ones(nbytes // 4, np.float32)})
        calls = {rt: bench.call(workload, rt) for rt in runtimes}
        for call in calls.values():
            await call()
        samples: dict[str, list[float]] = {rt: [] for rt in runtimes}
        for index in range(rounds):
            for rt in ordered(index):
                if rt in calls:
                    samples[rt] += await latencies(calls[rt], max(2, int(count * scale)))
        ip = statistics.median(samples["inprocess"])
        sb = statistics.median(samples["sandbox"]) if "sandbox" in samples else None
        added = None if sb is None else sb - ip
        rows.append({"payload": label, "bytes": nbytes, "inprocess_p50_ms": ip * 1e3,
                     "sandbox_p50_ms": sb and sb * 1e3, "added_ms": added and added * 1e3,
                     "ratio": ratio(sb, ip)})
        print(f"{label:>8} {ms(ip):>10} {ms(sb):>10} {ms(added):>9} "
              f"{fmt_ratio(ratio(sb, ip)):>7}")
    return rows


class MemorySampler:
    """Peak RSS/USS of the server and of each of its descendant processes, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.server = psutil.Process(pid)
        self.peak: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> dict[int, dict[str, Any]]:
        out = {}
        for proc in [self.server, *self.server.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                role = "server" if proc.pid == self.server.pid else _role(proc)
                out[proc.pid] = {"role": role, "rss_mib": info.rss / MiB, "uss_mib": info.uss / MiB}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            for pid, info in self.snapshot().items():
                old = self.peak.get(pid)
                if old is None:
                    self.peak[pid] = dict(info)
                else:
                    old["rss_mib"] = max(old["rss_mib"], info["rss_mib"])
                    old["uss_mib"] = max(old["uss_mib"], info["uss_mib"])

    def __enter__(self) -> MemorySampler:
        self.peak = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def _role(proc: psutil.Process) -> str:
    """forkserver, resource tracker or worker. Workers are forked from the forkserver, so they
    share its command line: tell them apart by their parent."""
    try:
        cmdline = " ".join(proc.cmdline())
        parent = proc.parent()
        parent_cmdline = " ".join(parent.cmdline()) if parent is not None else ""
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "forkserver" in cmdline and "forkserver" not in parent_cmdline:
        return "forkserver"
    return "worker"


def summarize(label: str, snapshot: dict[int, dict[str, Any]]) -> dict[str, Any]:
    server = next((v for v in snapshot.values() if v["role"] == "server"), None)
    workers = [v for v in snapshot.values() if v["role"] == "worker"]
    others = [v for v in snapshot.values() if v["role"] not in ("server", "worker")]
    row = {
        "phase": label,
        "server_rss_mib": server and server["rss_mib"], "server_uss_mib": server and server["uss_mib"],
        "workers": len(workers),
        "worker_rss_mib": sorted(round(w["rss_mib"], 1) for w in workers),
        "worker_uss_mib": sorted(round(w["uss_mib"], 1) for w in workers),
        "helpers_rss_mib": sum(o["rss_mib"] for o in others),
        "total_uss_mib": sum(v["uss_mib"] for v in snapshot.values()),
    }
    worker_rss = ", ".join(f"{x:.0f}" for x in row["worker_rss_mib"]) or "-"
    worker_uss = ", ".join(f"{x:.0f}" for x in row["worker_uss_mib"]) or "-"
    print(f"{label:<34} {row['server_rss_mib'] or 0:8.0f} {row['server_uss_mib'] or 0:8.0f}  "
          f"{worker_rss:<24} {worker_uss:<24} {row['total_uss_mib']:9.0f}")
    return row


async def section_memory(bench: Bench, pid: int, runtimes: tuple[str, ...],
                         scale: float) -> list[dict[str, Any]]:
    print("\n## Memory (MiB): server and per-worker RSS / USS (helpers: forkserver, resource "
          "tracker, counted in total USS)")
    print(f"{'phase':<34} {'srv RSS':>8} {'srv USS':>8}  {'worker RSS':<24} {'worker USS':<24} "
          f"{'total USS':>9}")
    sampler = MemorySampler(pid)
    rows = [summarize("idle (started, no call yet)", sampler.snapshot())]
    heavy = [w for w in workloads() if w.node_type != "PassThrough"]
    calls_each = max(4, int(24 * scale))

    async def load(runtime: str) -> None:
        calls = [bench.call(w, runtime) for w in heavy]
        for call in calls:
            await throughput(call, calls_each, 4)

    for runtime in ("sandbox", "inprocess"):
        if runtime not in runtimes:
            continue
        with sampler:
            await load(runtime)
        rows.append(summarize(f"peak under load, nodes {runtime}", sampler.peak))
        rows.append(summarize(f"idle after the {runtime} load", sampler.snapshot()))
    return rows


def _chain(_: int) -> int:
    from tensorline.server.nodes.ecosystem.python_nodes import hash_chain

    return hash_chain(1, GIL_ITERATIONS)


def parallel_capacity(rounds: int, tasks: int) -> dict[str, float]:
    """The same pure-Python work in 1 and in 2 plain processes, no server: how much parallel
    CPU this (shared) machine really gives right now, the ceiling for any worker pool.

    ``spawn``, not fork: this process holds gRPC state."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rates: dict[int, list[float]] = {1: [], 2: []}
    with ctx.Pool(1) as one, ctx.Pool(2) as two:
        one.map(_chain, range(1))
        two.map(_chain, range(2))
        for index in range(rounds):
            for n, pool in ((1, one), (2, two)) if index % 2 == 0 else ((2, two), (1, one)):
                started = time.perf_counter()
                pool.map(_chain, range(tasks), chunksize=1)
                rates[n].append(tasks / (time.perf_counter() - started))
    one_rate, two_rate = statistics.median(rates[1]), statistics.median(rates[2])
    return {"one_process_calls_s": one_rate, "two_processes_calls_s": two_rate,
            "speedup": two_rate / one_rate}


async def section_gil(bench: Bench, runtimes: tuple[str, ...], rounds: int,
                      scale: float) -> dict[str, Any]:
    print(f"\n## GIL contention: PyHashChain ({GIL_ITERATIONS:,} pure-Python steps per call)")
    print(f"{'concurrency':>11} {'ip calls/s':>11} {'sb calls/s':>11} {'ratio':>7} "
          f"{'ip p50 ms':>10} {'sb p50 ms':>10}")
    work = Workload("gil", "PyHashChain", {"iterations": GIL_ITERATIONS},
                    {"in": np.arange(4, dtype=np.int64)})
    calls = {rt: bench.call(work, rt) for rt in runtimes}
    for call in calls.values():
        await call()
    rows = []
    for concurrency in (1, 2, 4):
        rates: dict[str, list[float]] = {rt: [] for rt in runtimes}
        lats: dict[str, list[float]] = {rt: [] for rt in runtimes}
        total = max(concurrency * 2, int(concurrency * 6 * scale))
        for index in range(rounds):
            for rt in ordered(index):
                if rt in calls:
                    rate, each = await throughput(calls[rt], total, concurrency)
                    rates[rt].append(rate)
                    lats[rt] += each
        ip, sb = statistics.median(rates["inprocess"]), (
            statistics.median(rates["sandbox"]) if "sandbox" in rates else None)
        ip50 = statistics.median(lats["inprocess"])
        sb50 = statistics.median(lats["sandbox"]) if "sandbox" in lats else None
        rows.append({"concurrency": concurrency, "inprocess_calls_s": ip, "sandbox_calls_s": sb,
                     "throughput_ratio": ratio(sb, ip), "inprocess_p50_ms": ip50 * 1e3,
                     "sandbox_p50_ms": sb50 and sb50 * 1e3})
        print(f"{concurrency:>11} {ip:11.2f} {'-' if sb is None else f'{sb:.2f}':>11} "
              f"{fmt_ratio(ratio(sb, ip)):>7} {ms(ip50):>10} {ms(sb50):>10}")

    # A trivial in-process call while two CPU-bound calls keep running in one runtime or the
    # other: in-process they hold the server's GIL, sandboxed they do not.
    print("\n   trivial call (PassThrough 1 KiB, in-process) p50 while 2 PyHashChain calls run:")
    trivial = bench.call(workloads()[0], "inprocess")
    baseline = statistics.median(await latencies(trivial, max(20, int(100 * scale))))
    interference: dict[str, Any] = {"quiet_p50_ms": baseline * 1e3}
    print(f"   {'no background load':<28} p50 {ms(baseline)} ms")
    for rt in runtimes:
        stop = asyncio.Event()

        async def background(call: Call = calls[rt], stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                await call()

        tasks = [asyncio.create_task(background()) for _ in range(2)]
        await asyncio.sleep(0.1)  # let both background calls get going before measuring
        loaded = statistics.median(await latencies(trivial, max(20, int(60 * scale))))
        stop.set()
        await asyncio.gather(*tasks)
        interference[f"{rt}_background_p50_ms"] = loaded * 1e3
        print(f"   {'background ' + rt:<28} p50 {ms(loaded)} ms "
              f"({fmt_ratio(loaded / baseline)} of quiet)")
    capacity = parallel_capacity(rounds, max(4, int(8 * scale)))
    print(f"\n   the machine's parallel capacity now (same work, plain processes, no server): "
          f"1 process {capacity['one_process_calls_s']:.2f} calls/s, 2 processes "
          f"{capacity['two_processes_calls_s']:.2f} calls/s ({capacity['speedup']:.2f}x)")
    return {"concurrency": rows, "trivial_call_interference": interference,
            "parallel_capacity": capacity}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = 0.3 if args.quick else 1.0
    only = set(args.only.split(",")) if args.only else {"nodes", "hop", "memory", "gil"}
    proc, port = start_server()
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "rounds": args.rounds,
    }
    try:
        bench = Bench(port)
        probe = Workload("probe", "PassThrough", {}, {"in": np.ones(4, np.float32)})
        runtimes: tuple[str, ...] = RUNTIMES
        if await bench.runtime_of(probe, "sandbox") != "sandbox":
            runtimes = ("inprocess",)
            print("NOTE: this server has no sandbox runtime; sandboxed columns stay empty")
        results["sandbox_available"] = "sandbox" in runtimes
        print(f"server pid {proc.pid}, rounds {args.rounds}, {os.cpu_count()} CPUs")
        # Memory first: later sections import torch into the server (in-process runs).
        if "memory" in only:
            results["memory"] = await section_memory(bench, proc.pid, runtimes, scale)
        if "nodes" in only:
            results["nodes"] = await section_nodes(bench, runtimes, args.rounds, scale)
        if "hop" in only:
            results["hop"] = await section_hop(bench, runtimes, args.rounds, scale)
        if "gil" in only:
            results["gil"] = await section_gil(bench, runtimes, args.rounds, scale)
        await bench.channel.close()
    finally:
        proc.terminate()
        proc.wait(20)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a third of the calls")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per figure")
    parser.add_argument("--only", help="comma-separated sections: nodes,hop,memory,gil")
    run_and_save(main, parser)
