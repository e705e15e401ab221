"""Soak (run by hand): many concurrent StreamPipeline sessions through a mixed pipeline.

    python bench/soak_streams.py [--streams 1000] [--seconds 60] [--chunk-bytes 1024]

A real ``tensorline serve`` process (loopback, a free port, the stream limit raised to
``--stream-limit``, default ``--streams``; the sandbox pool as configured by the flags) serves
two phases, one after the other:

* baseline: ``--streams`` sessions for ``--baseline-seconds`` through the same 3 nodes, all
  in-process (PassThrough -> Scale x3 -> Scale x0.5);
* soak: ``--streams`` sessions for ``--seconds`` through the mixed pipeline: the middle node
  (Scale, stateless) runs in the sandbox, so every chunk of every session is one sandboxed call
  dispatched on its own (the pool grows to ``sandbox_max_workers`` and the calls wait their
  turn, round robin by connection);
* ``--pipeline streaming`` instead: the middle node sandboxed and the third a sandboxed
  streaming node (Accumulator, count 1), whose session needs a worker of its own: past
  ``sandbox_max_workers`` such sessions per domain the others are refused (and retried).

Load comes from ``--clients`` processes (one event loop each, ``--connections`` HTTP/2
connections each) using the public ``AsyncClient``. Each session slot opens a session (a
RESOURCE_EXHAUSTED refusal with retry info is retried after the hinted delay while time is
left), then sends one chunk at a time and waits for its result (ping-pong, so a chunk's latency
is its own round trip) until the phase ends, then closes the session and reads its metrics.
Every result is compared bit for bit with numpy's ``(x * 3) * 0.5`` in float32; every failure
is classified by status code, and a refusal counts as clean only when it is RESOURCE_EXHAUSTED
and carries retry info. A result that takes longer than ``--stall-s`` counts as a stall (a hang).

The server's process tree is sampled with psutil (server, launcher, workers: RSS and worker
count) during each phase. After the soak, the server's own gauges (Prometheus endpoint) must
show no stream left open, and the pool must shrink back to its baseline after
``--sandbox-idle-s``; the server log is scanned for tracebacks and ERROR lines.
Exit status 1 when anything was not clean (wrong output, a stall, a status other than a clean
RESOURCE_EXHAUSTED, a leak), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

FACTOR_B = np.float32(3.0)
FACTOR_C = np.float32(0.5)


# The pipelines, all PassThrough -> Scale x3 -> a third node:
# * inprocess: every node in-process, third node Scale x0.5 (the baseline);
# * mixed: the Scale x3 in the sandbox (stateless: one sandboxed call per chunk);
# * streaming: the Scale x3 in the sandbox and the third node a sandboxed streaming node
#   (Accumulator, count 1: each chunk as it came), whose session takes a worker of its own:
#   past ``sandbox_max_workers`` such sessions per domain, sessions are refused.
PIPELINES = ("inprocess", "mixed", "streaming")


def manifest(kind: str) -> dict[str, Any]:
    third: dict[str, Any] = (
        {"id": "c", "node_type": "Accumulator", "params": {"count": 1},
         "runtime_hint": "sandbox"} if kind == "streaming" else
        {"id": "c", "node_type": "Scale", "params": {"factor": float(FACTOR_C)},
         "runtime_hint": "inprocess"})
    return {"version": "v1", "nodes": [
        {"id": "a", "node_type": "PassThrough", "runtime_hint": "inprocess"},
        {"id": "b", "node_type": "Scale", "params": {"factor": float(FACTOR_B)},
         "runtime_hint": "inprocess" if kind == "inprocess" else "sandbox"},
        third,
    ], "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}


def expected(kind: str, chunk: np.ndarray) -> np.ndarray:
    scaled = chunk * FACTOR_B
    return scaled if kind == "streaming" else scaled * FACTOR_C


# --- load generator (one client process) --------------------------------------------------------


@dataclass
class Tally:
    """What one client process saw; merged by the parent."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    chunks_ok: int = 0
    wrong_outputs: int = 0
    stalls: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    open_ms: list[float] = field(default_factory=list)
    # status code name (or a description of a non-status failure) -> count
    failures: dict[str, int] = field(default_factory=dict)
    refusals_clean: int = 0
    refusals_without_retry: int = 0
    samples: list[str] = field(default_factory=list)
    # CPU seconds the client process used (is the load generator the bottleneck?).
    cpu_s: float = 0.0

    def fail(self, what: str, detail: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1
        if len(self.samples) < 10:
            self.samples.append(f"{what}: {detail[:300]}")


def classify(tally: Tally, exc: BaseException) -> float | None:
    """Count ``exc``; the retry delay when it is a clean refusal (RESOURCE_EXHAUSTED with retry
    info), else None."""
    from tensorline.client import TensorlineError

    if isinstance(exc, TensorlineError):
        code = exc.code.name if exc.code is not None else "no status"
        tally.fail(code, exc.message)
        if code == "RESOURCE_EXHAUSTED":
            if exc.retry_after_s is not None:
                tally.refusals_clean += 1
                return exc.retry_after_s
            tally.refusals_without_retry += 1
        return None
    tally.fail(type(exc).__name__, repr(exc))
    return None


async def slot(client: Any, tally: Tally, index: int, kind: str, chunk_floats: int,
               start: float, end: float, stall_s: float) -> None:
    """One session slot: open (retrying clean refusals), ping-pong chunks until ``end``,
    close."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(index)
    base = rng.standard_normal(chunk_floats).astype(np.float32)
    await asyncio.sleep(max(0.0, start - time.time()))
    pipeline = manifest(kind)
    sent = 0
    while time.time() < end:
        began = loop.time()
        stream = client.stream(pipeline)
        try:
            await asyncio.wait_for(stream.open(), stall_s)
        except TimeoutError:
            tally.stalls += 1
            tally.fail("stall", "open took longer than the stall limit")
            await _drop(stream)
            return
        except Exception as exc:  # every failure is classified
            retry = classify(tally, exc)
            if retry is None:
                return
            await asyncio.sleep(retry)
            continue
        tally.sessions_opened += 1
        tally.open_ms.append((loop.time() - began) * 1000)
        try:
            while time.time() < end:
                chunk = base + np.float32(sent % 1024)
                want = expected(kind, chunk)
                t0 = loop.time()
                await stream.send("a", chunk)
                try:
                    out = await asyncio.wait_for(stream.__anext__(), stall_s)
                except TimeoutError:
                    tally.stalls += 1
                    tally.fail("stall", f"no result within {stall_s:g} s")
                    await _drop(stream)
                    return
                tally.latencies_ms.append((loop.time() - t0) * 1000)
                value = np.asarray(out.value)
                if (out.port != "out" or value.dtype != np.float32
                        or value.tobytes() != want.tobytes()):
                    tally.wrong_outputs += 1
                    tally.fail("wrong output", f"port {out.port}, dtype {value.dtype}")
                else:
                    tally.chunks_ok += 1
                sent += 1
            await asyncio.wait_for(stream.close(), stall_s)
            tally.sessions_closed += 1
            return
        except TimeoutError:
            tally.stalls += 1
            tally.fail("stall", "close took longer than the stall limit")
            await _drop(stream)
            return
        except Exception as exc:  # every failure is classified
            classify(tally, exc)
            await _drop(stream)
            return


async def _drop(stream: Any) -> None:
    # Already counted: nothing more to learn from how the cancel goes.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(stream.cancel("soak: giving up"), 10)


async def client_main(args: argparse.Namespace) -> Tally:
    from tensorline.client import AsyncClient

    tally = Tally()
    # Separate connections (a local subchannel pool each): one HTTP/2 connection for every
    # session would make the connection's flow control and one server thread the bottleneck.
    clients = [AsyncClient(args.target, extra_options=(("grpc.use_local_subchannel_pool", 1),))
               for _ in range(args.connections)]
    try:
        await asyncio.gather(*(
            slot(clients[i % len(clients)], tally, args.first + i, args.pipeline,
                 args.chunk_bytes // 4, args.start, args.end, args.stall_s)
            for i in range(args.slots)))
    finally:
        for client in clients:
            await client.close()
    tally.cpu_s = time.process_time()
    return tally


# --- the server and its process tree ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tensorline_command() -> list[str]:
    script = Path(sys.executable).parent / "tensorline"
    return [str(script)] if script.exists() else ["tensorline"]


def serving(target: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class Server:
    """``tensorline serve`` on loopback, its log in a file; ready when health says SERVING."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        self.metrics_port = free_port()
        env = dict(os.environ)
        env.update({
            "TENSORLINE_MAX_CONCURRENT_STREAMS": str(args.stream_limit),
            "TENSORLINE_SANDBOX_WORKERS": str(args.sandbox_workers),
            "TENSORLINE_SANDBOX_IDLE_S": str(args.sandbox_idle_s),
            "TENSORLINE_METRICS_HOST": "127.0.0.1",
            "TENSORLINE_METRICS_PORT": str(self.metrics_port),
            "TENSORLINE_REFLECTION": "false",
            "PYTHONUNBUFFERED": "1",
        })
        if args.sandbox_max_workers:
            env["TENSORLINE_SANDBOX_MAX_WORKERS"] = str(args.sandbox_max_workers)
        for attempt in range(3):
            self.port = free_port()
            self.log_path = log_dir / f"server-{self.port}.log"
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [*tensorline_command(), "serve", "--host", "127.0.0.1", "--port",
                     str(self.port)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 60
            while self.proc.poll() is None and time.monotonic() < deadline:
                if serving(self.target):
                    return
                time.sleep(0.1)
            self.kill()
            if attempt == 2:
                raise RuntimeError(f"the server did not start; log:\n{self.log()[-3000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def gauges(self) -> dict[str, float]:
        """The server's Prometheus gauges (name without labels -> sum of samples)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^(tensorline_\w+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
            if match:
                found[match[1]] = found.get(match[1], 0.0) + float(match[2])
        return found

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by the server, its launcher and its workers (ended workers'
    time is lost: the launcher reaps them, so their time shows in no live process)."""
    total = 0.0
    try:
        server = psutil.Process(pid)
        processes = [server, *server.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class TreeSample:
    server_mb: float
    launcher_mb: float
    workers: int
    workers_mb: float
    worker_max_mb: float


def sample_tree(pid: int) -> TreeSample | None:
    """RSS of the server, its launcher and the launcher's children (the workers)."""
    try:
        server = psutil.Process(pid)
        server_mb = server.memory_info().rss / 2**20
        children = server.children()
    except psutil.Error:
        return None
    launcher_mb = 0.0
    workers: list[float] = []
    for child in children:
        try:
            launcher_mb += child.memory_info().rss / 2**20
            for worker in child.children(recursive=True):
                # A worker may exit between the listing and the reading.
                with contextlib.suppress(psutil.Error):
                    workers.append(worker.memory_info().rss / 2**20)
        except psutil.Error:
            pass
    return TreeSample(server_mb, launcher_mb, len(workers), sum(workers), max(workers, default=0))


class Sampler(threading.Thread):
    """Samples the server's process tree every ``interval`` s until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[TreeSample] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            sample = sample_tree(self.pid)
            if sample is not None:
                self.samples.append(sample)
            self.halt.wait(self.interval)

    def peak(self) -> dict[str, float]:
        s = self.samples or [TreeSample(0, 0, 0, 0, 0)]
        return {"server_rss_peak_mb": max(x.server_mb for x in s),
                "server_rss_last_mb": s[-1].server_mb,
                "launcher_rss_peak_mb": max(x.launcher_mb for x in s),
                "workers_peak": max(x.workers for x in s),
                "workers_rss_sum_peak_mb": max(x.workers_mb for x in s),
                "worker_rss_peak_mb": max(x.worker_max_mb for x in s)}


# --- a phase: the client processes, merged ------------------------------------------------------


def run_phase(args: argparse.Namespace, server: Server, kind: str,
              seconds: float) -> dict[str, Any]:
    sampler = Sampler(server.proc.pid)
    sampler.start()
    cpu_before = tree_cpu(server.proc.pid)
    # Every client starts its sessions at the same moment, once all of them are running.
    start = time.time() + 3.0 + 0.5 * args.clients
    end = start + seconds
    per = [args.streams // args.clients + (i < args.streams % args.clients)
           for i in range(args.clients)]
    procs = []
    first = 0
    for n in per:
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client", "--target", server.target,
             "--slots", str(n), "--first", str(first), "--start", str(start), "--end", str(end),
             "--chunk-bytes", str(args.chunk_bytes), "--stall-s", str(args.stall_s),
             "--connections", str(args.connections), "--pipeline", kind],
            stdout=subprocess.PIPE, text=True))
        first += n
    tallies = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a client process failed ({proc.returncode})")
        tallies.append(json.loads(out.splitlines()[-1]))
    sampler.halt.set()
    sampler.join()
    server_cpu = tree_cpu(server.proc.pid) - cpu_before
    merged = Tally()
    for t in tallies:
        for key in ("sessions_opened", "sessions_closed", "chunks_ok", "wrong_outputs", "stalls",
                    "refusals_clean", "refusals_without_retry"):
            setattr(merged, key, getattr(merged, key) + t[key])
        merged.latencies_ms += t["latencies_ms"]
        merged.open_ms += t["open_ms"]
        for what, count in t["failures"].items():
            merged.failures[what] = merged.failures.get(what, 0) + count
        merged.samples += t["samples"]
        merged.cpu_s += t["cpu_s"]
    lat = sorted(merged.latencies_ms) or [float("nan")]
    opened = sorted(merged.open_ms) or [float("nan")]
    return {"pipeline": {"inprocess": "in-process only", "mixed": "mixed (b sandboxed)",
                         "streaming": "b, c (streaming) sandboxed"}[kind],
            "seconds": seconds, "streams": args.streams,
            "sessions_opened": merged.sessions_opened,
            "sessions_closed_ok": merged.sessions_closed,
            "chunks_ok": merged.chunks_ok, "chunks_per_s": merged.chunks_ok / seconds,
            "wrong_outputs": merged.wrong_outputs, "stalls": merged.stalls,
            "latency_p50_ms": _pct(lat, 50), "latency_p99_ms": _pct(lat, 99),
            "latency_max_ms": lat[-1],
            "open_p50_ms": _pct(opened, 50), "open_p99_ms": _pct(opened, 99),
            "failures": merged.failures, "refusals_clean": merged.refusals_clean,
            "refusals_without_retry": merged.refusals_without_retry,
            "failure_samples": merged.samples[:10], "client_cpu_s": merged.cpu_s,
            "server_cpu_s": server_cpu, **sampler.peak()}


def _pct(values: list[float], pct: float) -> float:
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


def clean(result: dict[str, Any]) -> bool:
    """No wrong output, no stall, no failure but a clean RESOURCE_EXHAUSTED, every slot's
    session closed with its metrics."""
    other = {k: v for k, v in result["failures"].items() if k != "RESOURCE_EXHAUSTED"}
    return (not other and result["wrong_outputs"] == 0 and result["stalls"] == 0
            and result["refusals_without_retry"] == 0)


def report(results: list[dict[str, Any]], after: dict[str, Any]) -> None:
    rows = [
        ("sessions opened / closed OK", lambda r: f"{r['sessions_opened']:,} / "
                                                  f"{r['sessions_closed_ok']:,}"),
        ("chunks verified (bit-exact)", lambda r: f"{r['chunks_ok']:,}"),
        ("chunks/s", lambda r: f"{r['chunks_per_s']:,.0f}"),
        ("chunk latency p50 / p99 ms", lambda r: f"{r['latency_p50_ms']:.1f} / "
                                                 f"{r['latency_p99_ms']:.1f}"),
        ("chunk latency max ms", lambda r: f"{r['latency_max_ms']:.0f}"),
        ("session open p50 / p99 ms", lambda r: f"{r['open_p50_ms']:.0f} / "
                                                f"{r['open_p99_ms']:.0f}"),
        ("wrong outputs / stalls", lambda r: f"{r['wrong_outputs']} / {r['stalls']}"),
        ("refusals (clean / no retry info)", lambda r: f"{r['refusals_clean']} / "
                                                       f"{r['refusals_without_retry']}"),
        ("other failures", lambda r: ", ".join(
            f"{k} {v}" for k, v in r["failures"].items() if k != "RESOURCE_EXHAUSTED") or "0"),
        ("CPU s: clients / server tree", lambda r: f"{r['client_cpu_s']:.0f} / "
                                                   f"{r['server_cpu_s']:.0f}"),
        ("server RSS peak MiB", lambda r: f"{r['server_rss_peak_mb']:.0f}"),
        ("launcher RSS peak MiB", lambda r: f"{r['launcher_rss_peak_mb']:.0f}"),
        ("workers peak (count)", lambda r: f"{r['workers_peak']}"),
        ("worker RSS peak MiB (one / sum)", lambda r: f"{r['worker_rss_peak_mb']:.0f} / "
                                                      f"{r['workers_rss_sum_peak_mb']:.0f}"),
    ]
    width = 34
    print(f"\n{'':<{width}}" + "".join(f"{r['pipeline']:>26}" for r in results))
    for label, show in rows:
        print(f"{label:<{width}}" + "".join(f"{show(r):>26}" for r in results))
    for r in results:
        for sample in r["failure_samples"]:
            print(f"  [{r['pipeline']}] {sample}")
    print("\nafter the soak:")
    for key, value in after.items():
        print(f"  {key}: {value}")


def orchestrate(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="tensorline-soak-"))
    server = Server(args, log_dir)
    print(f"server pid {server.proc.pid} on {server.target}, log {server.log_path}",
          file=sys.stderr)
    results: list[dict[str, Any]] = []
    after: dict[str, Any] = {}
    try:
        idle = sample_tree(server.proc.pid)
        after["server RSS before (MiB)"] = f"{idle.server_mb:.0f}" if idle else "?"
        if args.baseline_seconds > 0:
            print(f"baseline: {args.streams} streams, in-process only, "
                  f"{args.baseline_seconds:g} s", file=sys.stderr)
            results.append(run_phase(args, server, "inprocess", args.baseline_seconds))
        print(f"soak: {args.streams} streams, {args.pipeline} pipeline, {args.seconds:g} s",
              file=sys.stderr)
        results.append(run_phase(args, server, args.pipeline, args.seconds))
        gauges = server.gauges()
        after["streams open (server gauge)"] = gauges.get("tensorline_inflight_streams")
        after["executions in flight (server gauge)"] = gauges.get(
            "tensorline_inflight_executions")
        # The pool shrinks back to its baseline once the grown workers were idle long enough.
        baseline = args.sandbox_workers
        deadline = time.monotonic() + args.sandbox_idle_s * 2 + 30
        workers = -1
        while time.monotonic() < deadline:
            sample = sample_tree(server.proc.pid)
            workers = sample.workers if sample else -1
            if workers == baseline:
                break
            time.sleep(0.5)
        after["workers after idle (baseline)"] = f"{workers} ({baseline})"
        sample = sample_tree(server.proc.pid)
        after["server RSS after (MiB)"] = f"{sample.server_mb:.0f}" if sample else "?"
        leaks = (after["streams open (server gauge)"] not in (0, 0.0, None)
                 or workers != baseline)
    finally:
        code = server.stop()
        log = server.log()
        after["server exit status (SIGTERM)"] = code
        after["tracebacks in server log"] = log.count("Traceback")
        after["ERROR lines in server log"] = sum(" ERROR " in line for line in log.splitlines())
        after["server log"] = str(server.log_path)
    ok = all(clean(r) for r in results) and not leaks and after["tracebacks in server log"] == 0
    if ok:  # the log is kept only to look into a failure
        shutil.rmtree(log_dir, ignore_errors=True)
        after["server log"] = "removed (clean run)"
    report(results, after)
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": results, "after": after}, indent=2,
                                              default=str))
    print("\nCLEAN" if ok else "\nNOT CLEAN (see above)")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent sessions")
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration")
    parser.add_argument("--chunk-bytes", type=int, default=1024,
                        help="bytes per chunk (float32; a multiple of 4)")
    parser.add_argument("--baseline-seconds", type=float, default=20.0,
                        help="in-process-only baseline duration (0: none)")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument("--connections", type=int, default=4,
                        help="HTTP/2 connections per client process")
    parser.add_argument("--stream-limit", type=int, default=0,
                        help="the server's max_concurrent_streams (default: --streams)")
    parser.add_argument("--sandbox-workers", type=int, default=2)
    parser.add_argument("--sandbox-max-workers", type=int, default=0,
                        help="per trust domain (default: the server's, workers + 2)")
    parser.add_argument("--sandbox-idle-s", type=float, default=5.0)
    parser.add_argument("--stall-s", type=float, default=60.0,
                        help="a result (or an open, a close) slower than this is a hang")
    parser.add_argument("--json", help="also write the figures to this file")
    # A client process (started by the orchestrating one).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=PIPELINES, default="mixed",
                        help="mixed: the middle node sandboxed (default); streaming: also a "
                             "sandboxed streaming node, whose sessions take a worker each")
    args = parser.parse_args()
    if args.client:
        tally = asyncio.run(client_main(args))
        print(json.dumps(tally.__dict__))
        return
    if args.chunk_bytes % 4 or args.chunk_bytes <= 0:
        parser.error("--chunk-bytes must be a positive multiple of 4")
    args.stream_limit = args.stream_limit or args.streams
    sys.exit(orchestrate(args))


if __name__ == "__main__":
    main()
