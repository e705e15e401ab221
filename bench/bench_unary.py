"""ExecutePipeline (one-node PassThrough) versus a bare grpc.aio echo of the same bytes.

Both servers run in their own processes; this process is the load generator. Rounds alternate
(echo, tensorline, echo, tensorline, ...) so drift on a noisy machine hits both alike; the
report gives medians over all calls and the ratios tensorline / echo.

    python bench/bench_unary.py                # full run
    python bench/bench_unary.py --quick        # fewer calls
    python bench/bench_unary.py --runtime sandbox   # PassThrough in a sandboxed worker
    python bench/bench_unary.py --loop asyncio      # tensorline on the standard asyncio loop
    python bench/bench_unary.py --against DIR       # also another checkout's server, interleaved

With ``--against DIR`` (a source tree of this repository, e.g. ``git archive REV | tar -x -C
DIR``) a third server runs that tree's tensorline, in the same rounds (echo, tensorline, DIR's
tensorline, ...), so a change is measured against its base under the same machine noise; the
report adds that server's figures and the ratio this tree / DIR.

Both clients encode the same ExecuteRequest per call with the tensorline codec and parse the
reply (zero-copy) so client-side work is identical; only the server differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    latencies,
    percentile,
    run_and_save,
    start_server,
    throughput,
)

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
    package-dir, by symlinks), to put first on PYTHONPATH: it wins over the editable install."""
    package = root / "tensorline"
    package.mkdir()
    for name, source in (("server", "server"), ("client", "client"),
                         ("wire", "protos/tensorline/wire"), ("v1", "protos/tensorline/v1")):
        if not (tree / source).is_dir():
            raise SystemExit(f"--against {tree}: no {source}/ (not a checkout of this repository)")
        (package / name).symlink_to((tree / source).resolve())
    return str(root)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = 0.3 if args.quick else 1.0

    echo_proc, echo_port = start_server(ECHO_SERVER)
    tl_proc, tl_port = start_server(TENSORLINE_SERVER, {"TENSORLINE_EVENT_LOOP": args.loop})
    shim = tempfile.TemporaryDirectory(prefix="bench-unary-")
    procs = [echo_proc, tl_proc]
    base_port = 0
    if args.against:
        base_proc, base_port = start_server(TENSORLINE_SERVER, {
            "TENSORLINE_EVENT_LOOP": args.loop,
            "PYTHONPATH": shim_for(Path(args.against), Path(shim.name))})
        procs.append(base_proc)
    manifest = json.dumps({"nodes": [{"id": "p", "node_type": "PassThrough",
                                      "runtime_hint": args.runtime}]})
    results: dict[str, Any] = {"runtime": args.runtime, "loop": resolve(args.loop),
                               "latency": {}, "throughput": {}}
    try:
        echo_ch = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=OPTIONS)
        tl_ch = grpc.aio.insecure_channel(f"127.0.0.1:{tl_port}", options=OPTIONS)
        echo_rpc = echo_ch.unary_unary(ECHO_METHOD, request_serializer=None,
                                       response_deserializer=decode_execute_request)
        tl_rpc = tl_ch.unary_unary("/tensorline.v1.PipelineService/ExecutePipeline",
                                   request_serializer=None,
                                   response_deserializer=decode_execute_response)
        base_ch = grpc.aio.insecure_channel(f"127.0.0.1:{base_port}", options=OPTIONS)
        base_rpc = base_ch.unary_unary("/tensorline.v1.PipelineService/ExecutePipeline",
                                       request_serializer=None,
                                       response_deserializer=decode_execute_response)

        def calls(array: np.ndarray[Any, Any]) -> tuple[Call, Call, Call]:
            items = [PortItem("p", "", array)]

            async def echo() -> Any:
                return await echo_rpc(encode_execute_request(manifest, items))

            async def tensorline() -> Any:
                return await tl_rpc(encode_execute_request(manifest, items))

            async def base() -> Any:
                return await base_rpc(encode_execute_request(manifest, items))

            return echo, tensorline, base

        # Check the pipeline works and is bit-exact before measuring.
        probe = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
        reply = await calls(probe)[1]()
        assert np.array_equal(reply.outputs[0].value, probe), "PassThrough is not bit-exact"

        sizes = [("1 KiB", 1024, 400), ("1 MiB", MiB, 60), ("64 MiB", 64 * MiB, 4)]
        print(f"runtime={args.runtime}  loop={resolve(args.loop)}  rounds={args.rounds}  "
              "(p50/p99 in ms; ratio = tensorline / echo)")
        print(f"{'payload':>8} {'echo p50':>9} {'tl p50':>9} {'ratio':>6} "
              f"{'echo p99':>9} {'tl p99':>9} {'ratio':>6}")
        if args.against:
            assert np.array_equal((await calls(probe)[2]()).outputs[0].value, probe)
        for label, nbytes, count in sizes:
            array = np.ones(nbytes // 4, dtype=np.float32)
            echo, tensorline, base = calls(array)
            await echo()
            await tensorline()
            samples: dict[str, list[float]] = {"echo": [], "tl": [], "base": []}
            n = max(2, int(count * scale))
            for _ in range(args.rounds):
                samples["echo"] += await latencies(echo, n)
                samples["tl"] += await latencies(tensorline, n)
                if args.against:
                    samples["base"] += await latencies(base, n)
            e50, t50 = statistics.median(samples["echo"]), statistics.median(samples["tl"])
            e99, t99 = percentile(samples["echo"], 0.99), percentile(samples["tl"], 0.99)
            results["latency"][label] = {"echo_p50_ms": e50 * 1e3, "tl_p50_ms": t50 * 1e3,
                                         "p50_ratio": t50 / e50, "echo_p99_ms": e99 * 1e3,
                                         "tl_p99_ms": t99 * 1e3, "p99_ratio": t99 / e99}
            print(f"{label:>8} {e50 * 1e3:9.3f} {t50 * 1e3:9.3f} {t50 / e50:6.2f} "
                  f"{e99 * 1e3:9.3f} {t99 * 1e3:9.3f} {t99 / e99:6.2f}")
            if args.against:
                b50, b99 = statistics.median(samples["base"]), percentile(samples["base"], 0.99)
                results["latency"][label].update(base_p50_ms=b50 * 1e3, base_p99_ms=b99 * 1e3,
                                                 p50_vs_base=t50 / b50)
                print(f"{'':>8} {args.against}: p50 {b50 * 1e3:.3f} p99 {b99 * 1e3:.3f} "
                      f"(this tree / it: p50 {t50 / b50:.3f}, p99 {t99 / b99:.3f})")

        echo, tensorline, base = calls(np.ones(256, dtype=np.float32))
        total = int(3000 * scale)
        rates: dict[str, list[float]] = {"echo": [], "tl": [], "base": []}
        cpu: dict[str, list[float]] = {"echo": [], "tl": [], "base": []}
        contenders = [("echo", echo, echo_proc), ("tl", tensorline, tl_proc)]
        if args.against:
            contenders.append(("base", base, procs[2]))
        for _ in range(args.rounds):
            for key, call, proc in contenders:
                before = cpu_seconds(proc.pid)
                rates[key].append((await throughput(call, total, 32))[0])
                cpu[key].append((cpu_seconds(proc.pid) - before) / total * 1e6)
        er, tr = statistics.median(rates["echo"]), statistics.median(rates["tl"])
        ec, tc = statistics.median(cpu["echo"]), statistics.median(cpu["tl"])
        results["throughput"] = {"echo_calls_s": er, "tl_calls_s": tr, "ratio": tr / er,
                                 "echo_server_cpu_us_per_call": ec,
                                 "tl_server_cpu_us_per_call": tc}
        print(f"1 KiB at concurrency 32: echo {er:,.0f} calls/s, tensorline {tr:,.0f} calls/s, "
              f"ratio {tr / er:.2f}")
        print(f"server CPU per call: echo {ec:.0f} us, tensorline {tc:.0f} us "
              f"(+{tc - ec:.0f} us)")
        if args.against:
            br, bc = statistics.median(rates["base"]), statistics.median(cpu["base"])
            results["throughput"].update(base_calls_s=br, base_server_cpu_us_per_call=bc)
            print(f"{args.against}: {br:,.0f} calls/s, server CPU {bc:.0f} us per call "
                  f"(this tree / it: calls/s {tr / br:.3f}, CPU {tc / bc:.3f})")
        await echo_ch.close()
        await tl_ch.close()
        await base_ch.close()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shim.cleanup()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", default="inprocess", choices=["inprocess", "sandbox"])
    parser.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="tensorline's event loop (the echo always runs grpc.aio on asyncio)")
    parser.add_argument("--against", metavar="DIR",
                        help="also measure the server of this checkout (a source tree of this "
                             "repository), interleaved round by round")
    run_and_save(main, parser)
