"""ExecutePipeline (one node: PassThrough, Scale, ...) versus a bare grpc.aio echo of the same
bytes.

The servers run in their own processes; this process is the load generator. Rounds alternate
between them (echo, tensorline[, tensorline "before"], then the same rotated by one, ...) so
drift on a noisy machine hits all alike and none always follows the same one; the report gives
medians over all calls and the ratios tensorline / echo. For calls/s at 32 in flight it also
gives each round's ratio to the echo of that same round (median and range): their spread is
the machine's noise.

    python bench/bench_unary.py                     # PassThrough in-process, full run
    python bench/bench_unary.py --node Scale        # a sync node (numpy), in-process
    python bench/bench_unary.py --runtime sandbox   # the node in a sandboxed worker
    python bench/bench_unary.py --quick             # fewer calls
    python bench/bench_unary.py --loop asyncio      # both servers on the standard asyncio loop
    python bench/bench_unary.py --node Scale --before TENSORLINE_INLINE_SYNC_MAX_MS=0
        # also a second tensorline server with that setting, in the same rounds (before/after)
    python bench/bench_unary.py --against DIR       # also another checkout's server, interleaved
    python bench/bench_unary.py --tuned-echo        # also an echo with the allocator tuning
    python bench/bench_unary.py --cpu-detail        # where each server's CPU goes at 32 in flight

With ``--against DIR`` (a source tree of this repository, e.g. ``git archive REV | tar -x -C
DIR``) one more server runs that tree's tensorline, in the same rounds, so a change is measured
against its base under the same machine noise; it is reported as "against".

The echo runs on the same event loop as tensorline (``--loop``, resolved as ``tensorline
serve`` resolves it) unless ``--echo-loop asyncio`` pins it to the standard loop. Both clients
encode the same ExecuteRequest per call with the tensorline codec and parse the reply
(zero-copy) so client-side work is identical; only the server differs. Every server runs the
product's defaults (apart from the message limits the large payloads need).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import (
    ECHO_METHOD,
    ECHO_SERVER,
    OPTIONS,
    Call,
    MiB,
    cpu_seconds,
    cpu_split,
    latencies,
    machine_ticks,
    percentile,
    rotated,
    run_and_save,
    start_server,
    throughput,
)

from tensorline.server import Settings
from tensorline.server._eventloop import resolve
from tensorline.wire import (
    PortItem,
    decode_execute_request,
    decode_execute_response,
    encode_execute_request,
)

# The same event loop `tensorline serve` runs on (Settings.event_loop, chosen by --loop).
TENSORLINE_SERVER = """
import asyncio, os, sys
from tensorline.server import Settings, create_server
from tensorline.server._eventloop import run
async def main():
    server, port = await create_server(Settings(host="127.0.0.1", port=0,
        max_message_bytes=512 * 1024 * 1024, max_tensor_bytes=256 * 1024 * 1024))
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
run(main(), os.environ.get("TENSORLINE_EVENT_LOOP", "auto"))
"""


def shim_for(tree: Path, root: Path) -> str:
    """A directory that makes ``tree``'s packages importable as tensorline.* (pyproject's
    package-dir, by symlinks), to put first on PYTHONPATH: it wins over the editable install.
    The wire and oip packages are optional: checkouts older than them had neither."""
    package = root / "tensorline"
    package.mkdir()
    for name, source, required in (("server", "server", True), ("client", "client", True),
                                   ("v1", "protos/tensorline/v1", True),
                                   ("wire", "protos/tensorline/wire", False),
                                   ("oip", "protos/tensorline/oip", False)):
        if not (tree / source).is_dir():
            if not required:
                continue
            raise SystemExit(f"--against {tree}: no {source}/ (not a checkout of this repository)")
        (package / name).symlink_to((tree / source).resolve())
    return str(root)


# Node types the benchmark can run: params, and what the output must be for an input x.
NODES: dict[str, tuple[dict[str, Any], Any]] = {
    "PassThrough": ({}, lambda x: x),
    "Scale": ({"factor": 2.0}, lambda x: x * np.float32(2.0)),
    "Add": ({}, lambda x: x),
    "Cast": ({"dtype": "float32"}, lambda x: x),
    "Reshape": ({"shape": [-1]}, lambda x: x),
    "Normalize": ({"mean": 0.0, "std": 1.0}, lambda x: x),
}


def environment(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("TENSORLINE_"):
            raise SystemExit(f"--before wants TENSORLINE_NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = 0.3 if args.quick else 1.0
    loop = resolve(args.loop)
    echo_loop = loop if args.echo_loop == "same" else resolve(args.echo_loop)
    before = environment(args.before)

    procs: dict[str, tuple[subprocess.Popen[str], int]] = {}
    shim = tempfile.TemporaryDirectory(prefix="bench-unary-")
    try:
        procs["echo"] = start_server(ECHO_SERVER, {"TENSORLINE_EVENT_LOOP": echo_loop})
        if args.tuned_echo:
            procs["tuned echo"] = start_server(ECHO_SERVER, {
                "TENSORLINE_EVENT_LOOP": echo_loop,
                "BENCH_ECHO_HEAP_BUFFERS": str(Settings().heap_buffer_bytes)})
        procs["tl"] = start_server(TENSORLINE_SERVER, {"TENSORLINE_EVENT_LOOP": loop})
        if before:
            procs["before"] = start_server(TENSORLINE_SERVER, {"TENSORLINE_EVENT_LOOP": loop, **before})
        if args.against:
            procs["against"] = start_server(TENSORLINE_SERVER, {
                "TENSORLINE_EVENT_LOOP": loop,
                "PYTHONPATH": shim_for(Path(args.against), Path(shim.name))})
        return await measure(args, scale, procs, loop, echo_loop, before)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)
        shim.cleanup()


async def measure(args: argparse.Namespace, scale: float,
                  procs: dict[str, tuple[subprocess.Popen[str], int]], loop: str,
                  echo_loop: str, before: dict[str, str]) -> dict[str, Any]:
    params, expected = NODES[args.node]
    manifest = json.dumps({"nodes": [{"id": "p", "node_type": args.node, "params": params,
                                      "runtime_hint": args.runtime}]})
    keys = list(procs)  # echo, tl[, before]: the order of the first round
    results: dict[str, Any] = {"node": args.node, "runtime": args.runtime, "loop": loop,
                               "echo_loop": echo_loop, "before": before,
                               "latency": {}, "throughput": {}}
    channels = {key: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
                for key, (_, port) in procs.items()}
    rpcs = {key: (ch.unary_unary(ECHO_METHOD, request_serializer=None,
                                 response_deserializer=decode_execute_request)
                  if key.endswith("echo") else
                  ch.unary_unary("/tensorline.v1.PipelineService/ExecutePipeline",
                                 request_serializer=None,
                                 response_deserializer=decode_execute_response))
            for key, ch in channels.items()}

    def calls(array: np.ndarray[Any, Any]) -> dict[str, Call]:
        items = [PortItem("p", "", array)]

        def one(rpc: Any) -> Call:
            async def call() -> Any:
                return await rpc(encode_execute_request(manifest, items))
            return call

        return {key: one(rpc) for key, rpc in rpcs.items()}

    # Check the pipeline works and is bit-exact before measuring.
    probe = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for key in keys[1:]:
        if key.endswith("echo"):
            continue
        reply = await calls(probe)[key]()
        assert np.array_equal(reply.outputs[0].value, expected(probe)), \
            f"{args.node} gave a wrong result"

    sizes = [("1 KiB", 1024, 400), ("1 MiB", MiB, 60), ("64 MiB", 64 * MiB, 4)]
    print(f"node={args.node}  runtime={args.runtime}  loop={loop}  echo loop={echo_loop}  "
          f"rounds={args.rounds}" + (f"  before: {before}" if before else "")
          + "  (p50/p99 in ms; ratio = tensorline / echo)")
    others = keys[1:]
    print(f"{'payload':>8} {'echo p50':>9} " + " ".join(
        f"{k + ' p50':>10} {'ratio':>6}" for k in others) + f" {'echo p99':>9} " + " ".join(
        f"{k + ' p99':>10} {'ratio':>6}" for k in others))
    for label, nbytes, count in sizes:
        if nbytes > args.max_bytes:
            continue
        each = calls(np.ones(nbytes // 4, dtype=np.float32))
        for key in keys:
            await each[key]()
        samples: dict[str, list[float]] = {key: [] for key in keys}
        n = max(2, int(count * scale))
        for round_ in range(args.rounds):
            for key in rotated(keys, round_):
                samples[key] += await latencies(each[key], n)
        p50 = {k: statistics.median(v) for k, v in samples.items()}
        p99 = {k: percentile(v, 0.99) for k, v in samples.items()}
        row: dict[str, float] = {"echo_p50_ms": p50["echo"] * 1e3,
                                 "echo_p99_ms": p99["echo"] * 1e3}
        for k in others:
            row[f"{k}_p50_ms"] = p50[k] * 1e3
            row[f"{k}_p50_ratio"] = p50[k] / p50["echo"]
            row[f"{k}_p99_ms"] = p99[k] * 1e3
            row[f"{k}_p99_ratio"] = p99[k] / p99["echo"]
        results["latency"][label] = row
        print(f"{label:>8} {p50['echo'] * 1e3:9.3f} " + " ".join(
            f"{p50[k] * 1e3:10.3f} {p50[k] / p50['echo']:6.2f}" for k in others)
            + f" {p99['echo'] * 1e3:9.3f} " + " ".join(
            f"{p99[k] * 1e3:10.3f} {p99[k] / p99['echo']:6.2f}" for k in others))

    each = calls(np.ones(256, dtype=np.float32))
    total = int(3000 * scale)
    rates: dict[str, list[float]] = {key: [] for key in keys}
    cpu: dict[str, list[float]] = {key: [] for key in keys}
    # --cpu-detail: per round, µs per call by part of the server, and the machine's shares.
    parts: dict[str, list[dict[str, float]]] = {key: [] for key in keys}
    for round_ in range(args.rounds):
        for key in rotated(keys, round_):
            pid = procs[key][0].pid
            cpu_before = cpu_seconds(pid)
            if args.cpu_detail:
                split_before, ticks_before = cpu_split(pid), machine_ticks()
            rates[key].append((await throughput(each[key], total, args.in_flight))[0])
            cpu[key].append((cpu_seconds(pid) - cpu_before) / total * 1e6)
            if args.cpu_detail:
                split, ticks = cpu_split(pid), machine_ticks()
                spent = {part: (split[part] - split_before[part]) / total * 1e6
                         for part in split}
                elapsed = ticks[2] - ticks_before[2]
                spent["machine idle %"] = 100 * (ticks[0] - ticks_before[0]) / elapsed
                spent["machine steal %"] = 100 * (ticks[1] - ticks_before[1]) / elapsed
                parts[key].append(spent)
    rate = {k: statistics.median(v) for k, v in rates.items()}
    used = {k: statistics.median(v) for k, v in cpu.items()}
    results["throughput"] = {"in_flight": args.in_flight, "echo_calls_s": rate["echo"],
                             "echo_server_cpu_us_per_call": used["echo"]}
    for k in others:
        # Each round's ratio to the echo of the same round: drift between rounds (the machine's
        # other load) cancels out of these, which the ratio of the medians does not.
        paired = sorted(mine / echo for mine, echo in zip(rates[k], rates["echo"], strict=True))
        results["throughput"].update({f"{k}_calls_s": rate[k], f"{k}_ratio": rate[k] / rate["echo"],
                                      f"{k}_round_ratios": paired,
                                      f"{k}_server_cpu_us_per_call": used[k]})
        print(f"1 KiB at concurrency {args.in_flight}: echo {rate['echo']:,.0f} calls/s, {k} "
              f"{rate[k]:,.0f} calls/s, ratio {rate[k] / rate['echo']:.2f} (per round: median "
              f"{statistics.median(paired):.2f}, {paired[0]:.2f}-{paired[-1]:.2f}); server CPU "
              f"per call: echo {used['echo']:.0f} us, {k} {used[k]:.0f} us "
              f"(+{used[k] - used['echo']:.0f} us)")
    if args.cpu_detail:
        detail = {key: {part: statistics.median(r[part] for r in rounds) for part in rounds[0]}
                  for key, rounds in parts.items()}
        results["throughput"]["cpu_detail"] = detail
        print(f"server CPU per call at concurrency {args.in_flight} by part, µs (medians over rounds); the "
              "machine's idle and steal shares in the same spans:")
        for key, row in detail.items():
            print(f"  {key:>8}: " + ", ".join(
                f"{part} {value:.0f}" + ("" if part.endswith("%") else " us")
                for part, value in row.items()))
    for ch in channels.values():
        await ch.close()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", default="inprocess", choices=["inprocess", "sandbox"])
    parser.add_argument("--node", default="PassThrough", choices=sorted(NODES),
                        help="the pipeline's one node (float32 tensor in, tensor out)")
    parser.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="the servers' event loop (auto: what `tensorline serve` picks)")
    parser.add_argument("--tuned-echo", action="store_true",
                        help="also an echo with tensorline's allocator tuning (heap_buffer_bytes),"
                             " reported like a tensorline server")
    parser.add_argument("--echo-loop", default="same", choices=["same", "asyncio", "uvloop"],
                        help="the echo's loop: the same as tensorline's (default), or pinned")
    parser.add_argument("--before", action="append", default=[], metavar="TENSORLINE_X=V",
                        help="also measure a tensorline server with this setting (repeatable)")
    parser.add_argument("--against", metavar="DIR",
                        help="also measure the server of this checkout (a source tree of this "
                             "repository), interleaved round by round")
    parser.add_argument("--max-bytes", type=int, default=64 * MiB,
                        help="skip payloads larger than this")
    parser.add_argument("--in-flight", type=int, default=32,
                        help="calls in flight in the throughput test (default 32)")
    parser.add_argument("--cpu-detail", action="store_true",
                        help="at 32 in flight, also split each server's CPU per call (event "
                             "loop thread, other threads, sandbox workers) and give the "
                             "machine's idle and steal shares")
    run_and_save(main, parser)
