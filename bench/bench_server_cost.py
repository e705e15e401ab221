"""What one call costs the server process: CPU of its event-loop thread and of all its threads,
minor page faults, and its resident size afterwards, for a bare grpc.aio echo and for
tensorline's ExecutePipeline (one PassThrough node) and ModelInfer (the same node as a named
pipeline), at 1 KiB with 32 calls in flight and at 1 MiB one call at a time.

Wall-clock figures move with everything else on a shared machine; these barely do, which makes
them the measure of where a server's time goes (``/proc/PID/task/*/stat`` and
``/proc/PID/stat``; the event-loop thread is the one whose id is the process's).

    python bench/bench_server_cost.py
    python bench/bench_server_cost.py --before TENSORLINE_HEAP_BUFFER_BYTES=0   # and a server
        # with that setting (here: without the allocator tuning), in the same run
    python bench/bench_server_cost.py --floor     # where a 1 KiB call's event-loop CPU goes

``--floor`` measures instead, at 1 KiB with 32 calls in flight and in interleaved rounds, the
event-loop CPU per call of four handlers: the bare echo (its own process), the same echo method
served by a tensorline server process (what the process, its settings and its other services
cost), a handler that does only the unavoidable work of a PassThrough call (decode the request,
run the node, encode the response and its metrics), and ExecutePipeline itself, in that same
process. The differences tell the server's fixed cost, the codec and node's, and the cost of
everything else (admission, the plan cache, the executor, the runtime, telemetry).
"""

from __future__ import annotations

import argparse
import json
import os
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
    latencies,
    rotated,
    run_and_save,
    start_server,
    throughput,
)
from bench_unary import TENSORLINE_SERVER, environment

from tensorline.oip.v2 import inference_pb2 as oip
from tensorline.wire import PortItem, encode_execute_request

EXECUTE = "/tensorline.v1.PipelineService/ExecutePipeline"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MANIFEST = json.dumps({"nodes": [{"id": "p", "node_type": "PassThrough"}]})
# The pipelines directory of the tensorline servers: the same node as a model.
IDENTITY = {"metadata": {"name": "identity",
                         "inputs": [{"name": "INPUT0", "node": "p", "datatype": "FP32",
                                     "shape": [1, -1]}],
                         "outputs": [{"name": "OUTPUT0", "node": "p", "datatype": "FP32",
                                      "shape": [1, -1]}]},
            "nodes": [{"id": "p", "node_type": "PassThrough"}]}


# A tensorline server that also serves, on the same port and loop, the bare echo method and a
# handler doing only what a PassThrough call cannot do without (``--floor``).
FLOOR_SERVER = """
import asyncio, os, time, grpc
from tensorline.server import Settings, create_server
from tensorline.server._eventloop import run
from tensorline.server.nodes import NodeContext
from tensorline.server.nodes.builtin import PassThrough
from tensorline.wire import (PortItem, decode_execute_request, encode_execute_response,
                             encode_execution_metrics)
class Figures:
    node_id, node_type, runtime, reason = "p", "PassThrough", "inprocess", "floor"
    wall_ms, fallback, inputs_consumed, outputs_produced = 0.0, "", 0, 0
async def main():
    server, port = await create_server(Settings(host="127.0.0.1", port=0,
        max_message_bytes=512 * 1024 * 1024, max_tensor_bytes=256 * 1024 * 1024))
    async def echo(request, context):
        return request
    async def decode_node_encode(request, context):
        started = time.perf_counter()
        node = PassThrough(PassThrough.Params(),
                           NodeContext(node_id="p", execution_id="floor", runtime="inprocess"))
        value = await node.process({"in": request.inputs[0].value})
        figures = Figures()
        figures.wall_ms = (time.perf_counter() - started) * 1000.0
        metrics = encode_execution_metrics(figures.wall_ms, [figures], True)
        return encode_execute_response([PortItem("p", "out", value)], metrics)
    server.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Floor", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "DecodeNodeEncode": grpc.unary_unary_rpc_method_handler(
            decode_node_encode, request_deserializer=decode_execute_request)}),))
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()
run(main(), os.environ.get("TENSORLINE_EVENT_LOOP", "auto"))
"""
# --floor: label -> (server, method), in the order of the first round.
FLOOR_HANDLERS = {
    "bare echo": ("echo", ECHO_METHOD),
    "echo method, tensorline process": ("floor", "/bench.Floor/Echo"),
    "decode, node, encode": ("floor", "/bench.Floor/DecodeNodeEncode"),
    "ExecutePipeline": ("floor", EXECUTE),
}


def write_pipelines(directory: str) -> None:
    Path(directory, "identity.json").write_text(json.dumps(IDENTITY))


def threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[7])


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def requests(elements: int) -> dict[str, bytes]:
    array = np.ones(elements, dtype=np.float32)
    infer = oip.ModelInferRequest(model_name="identity", id="r", inputs=[
        oip.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32",
                                               shape=[1, elements])],
        raw_input_contents=[array.tobytes()])
    return {"ExecutePipeline": encode_execute_request(MANIFEST, [PortItem("p", "", array)]),
            "ModelInfer": infer.SerializeToString()}


async def measure(pid: int, call: Call, calls: int, in_flight: int) -> dict[str, float]:
    # Warm: plans compiled, buffers sized.
    await (throughput(call, 200, in_flight) if in_flight > 1 else latencies(call, 20))
    cpu_before, faults_before = threads_cpu(pid), minor_faults(pid)
    if in_flight > 1:
        await throughput(call, calls, in_flight)
    else:
        await latencies(call, calls)
    cpu_after, faults_after = threads_cpu(pid), minor_faults(pid)
    spent = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    return {"loop_us": spent.get(pid, 0.0) / calls * 1e6,
            "total_us": sum(spent.values()) / calls * 1e6,
            "faults": (faults_after - faults_before) / calls}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    before = environment(args.before)
    procs: dict[str, tuple[subprocess.Popen[str], int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as pipelines:
        write_pipelines(pipelines)
        served = {"TENSORLINE_PIPELINES_DIR": pipelines,
                  "TENSORLINE_EVENT_LOOP": os.environ.get("TENSORLINE_EVENT_LOOP", "auto")}
        try:
            procs["echo"] = start_server(ECHO_SERVER, served)
            if args.floor:
                procs["floor"] = start_server(FLOOR_SERVER, served)
                return await floor(args, procs)
            procs["tl"] = start_server(TENSORLINE_SERVER, served)
            if before:
                procs["before"] = start_server(TENSORLINE_SERVER, {**served, **before})
            return await run(args, procs, before)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)


async def run(args: argparse.Namespace, procs: dict[str, tuple[subprocess.Popen[str], int]],
              before: dict[str, str]) -> dict[str, Any]:
    results: dict[str, Any] = {"before": before, "rows": []}
    print(f"{'server':>7} {'rpc':>16} {'payload':>22} {'loop us':>9} {'all us':>8} "
          f"{'faults':>7} {'RSS MiB':>8}   (per call)")
    for label, elements, calls, in_flight in (("1 KiB, 32 in flight", 256, args.calls, 32),
                                               ("1 MiB, one at a time", MiB // 4,
                                                max(20, args.calls // 50), 1)):
        bodies = requests(elements)
        for key, (proc, port) in procs.items():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
                for rpc, body in bodies.items():
                    method = ECHO_METHOD if key == "echo" else (
                        EXECUTE if rpc == "ExecutePipeline" else INFER)
                    stub = ch.unary_unary(method, request_serializer=None,
                                          response_deserializer=None)

                    async def call(stub: Any = stub, body: bytes = body) -> Any:
                        return await stub(body)

                    row = {"server": key, "rpc": rpc, "payload": label,
                           **await measure(proc.pid, call, calls, in_flight),
                           "rss_mib": resident_mib(proc.pid)}
                    results["rows"].append(row)
                    print(f"{key:>7} {rpc:>16} {label:>22} {row['loop_us']:9.0f} "
                          f"{row['total_us']:8.0f} {row['faults']:7.1f} {row['rss_mib']:8.0f}")
    return results


async def floor(args: argparse.Namespace,
                procs: dict[str, tuple[subprocess.Popen[str], int]]) -> dict[str, Any]:
    """``--floor``: event-loop CPU per 1 KiB call of the four handlers, in interleaved rounds
    (each goes first in turn), medians over rounds."""
    body = requests(256)["ExecutePipeline"]
    channels = {key: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
                for key, (_, port) in procs.items()}
    calls: dict[str, Call] = {}
    for label, (key, method) in FLOOR_HANDLERS.items():
        stub = channels[key].unary_unary(method, request_serializer=None,
                                         response_deserializer=None)

        async def call(stub: Any = stub) -> Any:
            return await stub(body)

        calls[label] = call
    samples: dict[str, list[float]] = {label: [] for label in FLOOR_HANDLERS}
    labels = list(FLOOR_HANDLERS)
    for round_ in range(args.rounds):
        for label in rotated(labels, round_):
            pid = procs[FLOOR_HANDLERS[label][0]][0].pid
            samples[label].append((await measure(pid, calls[label], args.calls // 2, 32))["loop_us"])
    for channel in channels.values():
        await channel.close()
    medians = {label: statistics.median(values) for label, values in samples.items()}
    print(f"event-loop CPU per 1 KiB call, 32 in flight, median of {args.rounds} interleaved "
          f"rounds of {args.calls // 2} calls")
    for label, value in medians.items():
        print(f"{label:>32} {value:7.0f} us   (rounds: "
              + ", ".join(f"{v:.0f}" for v in sorted(samples[label])) + ")")
    return {"floor_loop_us": medians, "floor_rounds": samples}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000,
                        help="calls per measure at 1 KiB (a fiftieth of it at 1 MiB)")
    parser.add_argument("--floor", action="store_true",
                        help="where a 1 KiB call's event-loop CPU goes (see the module docs)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --floor")
    parser.add_argument("--before", action="append", default=[], metavar="TENSORLINE_X=V",
                        help="also measure a tensorline server with this setting (repeatable)")
    run_and_save(main, parser)
