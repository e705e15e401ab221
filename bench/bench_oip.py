"""tensorline against Seldon MLServer over the Open Inference Protocol (KServe v2 gRPC).

The same two models on both servers, called with Triton's own client (``tritonclient.grpc.aio``)
in the same run, rounds interleaved, on the same machine:

- ``identity``: returns its FP32 input (tensorline: one PassThrough node; MLServer: a custom
  ``MLModel`` that decodes the input with ``NumpyCodec`` and encodes it back);
- ``scale``: input * 2.0 (tensorline: one Scale node, factor 2; MLServer: the same runtime
  multiplying by 2).

Both take input ``INPUT0`` and answer ``OUTPUT0`` (FP32, shape [1, N]). Reported: p50 (and p99)
per call at 1 KiB and 1 MiB, one call at a time; calls/s at 1 KiB with 32 calls in flight, with
the CPU time each server and this client spent per call; the ratios tensorline / MLServer (the
median of each round's ratio); and for context a bare grpc.aio echo of the same
ModelInferRequest bytes (bench/_common.py; on the loop ``tensorline serve`` uses), called from
the same client loop. Each round runs
every server and model in turn (starting with a different one each round).

    python bench/bench_oip.py                       # full run (1-2 minutes)
    python bench/bench_oip.py --quick --rounds 2    # a quick look
    python bench/bench_oip.py --only mlserver       # MLServer (and the echo) alone

MLServer is NOT a project dependency: it pins its own grpcio/protobuf, so on first use this
script creates a virtualenv for it at bench/.venv-mlserver (gitignored; ``python -m venv`` +
``pip install mlserver==1.7.1 'uvloop<0.22'``, about a minute) and runs ``mlserver start`` from there
(``--mlserver-venv`` points elsewhere). The project venv needs ``tritonclient``,
``python-rapidjson`` and ``packaging`` (the test extra).

MLServer's configuration: ``parallel_workers=0`` by default, so the models run inside the server
process as tensorline's in-process nodes do (MLServer's own default, 1, adds a hop to a worker
process per call; ``--mlserver-workers 1`` measures that); ``debug=false`` (its default, true,
logs every request) and ``metrics_endpoint=null`` (no metrics server): its fastest settings for
these models. tensorline runs ``tensorline serve`` as shipped. Neither server is pinned to CPUs
unless ``--cpus`` is given, which pins both (and the echo) to the same set: the two always get
the same cores. Ports are ephemeral; readiness is polled through ``ServerReady``/``ModelReady``.
Every server is stopped (its whole process group) and the temp dir removed at the end, on an
error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from _common import (
    ECHO_METHOD,
    ECHO_SERVER,
    OPTIONS,
    Call,
    MiB,
    cpu_seconds,
    latencies,
    percentile,
    rotated,
    run_and_save,
    start_server,
    throughput,
)
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.utils import InferenceServerException

HERE = Path(__file__).resolve().parent
MLSERVER_VERSION = "1.7.1"
# uvloop 0.22 made get_event_loop() raise where no loop is set, which kills MLServer 1.7.1's
# parallel workers at start (SeldonIO/MLServer#2286, unfixed in 1.7.1): keep the one before.
MLSERVER_REQUIREMENTS = (f"mlserver=={MLSERVER_VERSION}", "uvloop<0.22")
MODELS = {"identity": 1.0, "scale": 2.0}  # model name -> factor applied to the input
INPUT, OUTPUT = "INPUT0", "OUTPUT0"
# Above 1 MiB of tensor plus the request's framing, with room to spare.
MAX_MESSAGE = 64 * MiB
READY_TIMEOUT_S = 180.0
RETRY_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
# (label, tensor bytes, calls per server per round at full scale)
SIZES = (("1 KiB", 1024, 300), ("1 MiB", MiB, 12))
THROUGHPUT_BYTES, IN_FLIGHT, THROUGHPUT_CALLS = 1024, 32, 2000
# tensorline / MLServer: p50 at most this at each size, calls/s at least this.
TARGETS = {"1 KiB": 0.8, "1 MiB": 0.2, "throughput": 1.5}

# MLServer's documented custom-runtime API: an MLModel subclass with async load/predict; the
# NumpyCodec turns the request's (raw) input into an array and the array into the output.
MLSERVER_MODELS = f'''"""The benchmark's MLServer models (written by bench/bench_oip.py)."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Identity(MLModel):
    factor = None

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        if self.factor is not None:
            array = array * array.dtype.type(self.factor)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output({OUTPUT!r}, array)])


class Scale(Identity):
    factor = 2.0
'''


@dataclass
class Server:
    """A server process the benchmark started, in its own process group (so that stopping it
    also stops the workers it forked)."""

    name: str
    proc: subprocess.Popen[Any]
    address: str
    log: Path
    started: float = field(default_factory=time.perf_counter)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def free_port() -> int:
    """A port the OS just handed out; MLServer takes fixed ports only (it cannot report an
    ephemeral one back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ensure_mlserver(venv: Path) -> Path:
    """The ``mlserver`` executable of ``venv``, creating the venv and installing
    ``MLSERVER_REQUIREMENTS`` first unless it holds exactly those already."""
    executable, marker = venv / "bin" / "mlserver", venv / "bench-requirements.txt"
    wanted = "\n".join(MLSERVER_REQUIREMENTS)
    if executable.exists() and marker.exists() and marker.read_text() == wanted:
        return executable
    print(f"installing {' '.join(MLSERVER_REQUIREMENTS)} into {venv} (about a minute)",
          flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    *MLSERVER_REQUIREMENTS], check=True)
    marker.write_text(wanted)
    return executable


def write_mlserver_repository(root: Path) -> None:
    root.mkdir()
    (root / "bench_oip_models.py").write_text(MLSERVER_MODELS)
    for name in MODELS:
        (root / name).mkdir()
        (root / name / "model-settings.json").write_text(json.dumps(
            {"name": name, "implementation": f"bench_oip_models.{name.capitalize()}"}))


def mlserver_settings(grpc_port: int, http_port: int, workers: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port,
            "grpc_max_message_length": MAX_MESSAGE, "parallel_workers": workers,
            "debug": False, "metrics_endpoint": None, "load_models_at_startup": True}


def start_mlserver(executable: Path, workdir: Path, workers: int,
                   prefix: tuple[str, ...]) -> Server:
    root = workdir / "mlserver-models"
    write_mlserver_repository(root)
    grpc_port = free_port()
    (root / "settings.json").write_text(json.dumps(
        mlserver_settings(grpc_port, free_port(), workers)))
    log = workdir / "mlserver.log"
    # Not the project's PYTHONPATH: MLServer runs on its own venv's packages only.
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with log.open("wb") as sink:
        # cwd: MLServer keeps its .envs/.metrics folders in the current directory.
        proc = subprocess.Popen([*prefix, str(executable), "start", str(root)], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Server("MLServer", proc, f"127.0.0.1:{grpc_port}", log)


def write_pipelines(directory: Path) -> None:
    directory.mkdir()
    for name, factor in MODELS.items():
        node: dict[str, Any] = ({"id": "p", "node_type": "PassThrough"} if factor == 1.0 else
                                {"id": "p", "node_type": "Scale", "params": {"factor": factor}})
        signature = [{"name": INPUT, "node": "p", "datatype": "FP32", "shape": [1, -1]}]
        outputs = [{"name": OUTPUT, "node": "p", "datatype": "FP32", "shape": [1, -1]}]
        (directory / f"{name}.json").write_text(json.dumps({
            "metadata": {"name": name, "inputs": signature, "outputs": outputs},
            "nodes": [node]}))


def _drain(stream: IO[str], log: Path) -> None:
    with log.open("a") as sink:
        shutil.copyfileobj(stream, sink)


async def start_tensorline(workdir: Path, prefix: tuple[str, ...]) -> Server:
    pipelines = workdir / "pipelines"
    write_pipelines(pipelines)
    log = workdir / "tensorline.log"
    with log.open("wb") as sink:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [*prefix, sys.executable, "-c", "from tensorline.client.cli import main; main()",
             "serve", "--host", "127.0.0.1", "--port", "0", "--pipelines", str(pipelines)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink, text=True,
            start_new_session=True)
    server = Server("tensorline", proc, "", log)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), READY_TIMEOUT_S)
    except TimeoutError:
        server.stop()
        raise
    if "listening on" not in line:
        server.stop()
        raise RuntimeError(f"tensorline did not start: {line!r}\n{server.log_tail()}")
    server.address = line.split("listening on ", 1)[1].split()[0]
    # Whatever else it prints goes to the log, so a full pipe can never block it.
    threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True).start()
    return server


async def wait_ready(server: Server, client: triton.InferenceServerClient) -> None:
    """Poll ServerReady and every model's ModelReady until all answer true."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if await client.is_server_ready(client_timeout=5) and all(
                    [await client.is_model_ready(name, client_timeout=5) for name in MODELS]):
                return
        except InferenceServerException as exc:
            # Not listening yet (or busy starting) is worth waiting for; any other answer
            # (UNIMPLEMENTED: no OIP service) will not change.
            if exc.status() not in RETRY_STATUSES:
                raise RuntimeError(f"{server.name} at {server.address}: {exc}") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{server.name} not ready after {READY_TIMEOUT_S:.0f} s:\n"
                               f"{server.log_tail()}")
        await asyncio.sleep(0.1)


def infer_call(client: triton.InferenceServerClient, model: str,
               array: np.ndarray[Any, Any]) -> Call:
    """One ModelInfer through tritonclient: the input built from the array (a copy into the
    request, as any client pays) and the output read back as an array."""

    async def call() -> np.ndarray[Any, Any]:
        tensor = InferInput(INPUT, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        result = await client.infer(model, [tensor])
        return result.as_numpy(OUTPUT)

    return call


def echo_call(rpc: grpc.aio.UnaryUnaryMultiCallable, model: str,
              array: np.ndarray[Any, Any]) -> Call:
    """The same request (a ModelInferRequest with the tensor as raw contents) echoed back:
    the client builds, serializes and parses as much as through tritonclient."""

    async def call() -> np.ndarray[Any, Any]:
        request = service_pb2.ModelInferRequest(
            model_name=model, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                name=INPUT, datatype="FP32", shape=array.shape)],
            raw_input_contents=[array.tobytes()])
        reply = await rpc(request)
        return np.frombuffer(reply.raw_input_contents[0], np.float32).reshape(
            tuple(reply.inputs[0].shape))

    return call


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scale = 0.3 if args.quick else 1.0
    prefix = ("taskset", "-c", args.cpus) if args.cpus else ()
    servers: list[Server] = []
    clients: dict[str, triton.InferenceServerClient] = {}
    figures: dict[str, Any] = {"rounds": args.rounds, "mlserver_workers": args.mlserver_workers,
                               "cpus": args.cpus or "all", "latency": {}, "throughput": {}}
    # SIGTERM (and SIGINT, asyncio.run's doing) cancels the run, so the cleanup below runs.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    with contextlib.ExitStack() as cleanup:
        workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(
            prefix="tensorline-oipbench-")))
        echo_proc, echo_port = start_server(ECHO_SERVER, prefix=prefix)
        cleanup.callback(lambda: (echo_proc.terminate(), echo_proc.wait(10)))
        cleanup.callback(lambda: [server.stop() for server in servers])
        if args.only in (None, "mlserver"):
            executable = ensure_mlserver(Path(args.mlserver_venv))
            servers.append(start_mlserver(executable, workdir, args.mlserver_workers, prefix))
        if args.only in (None, "tensorline"):
            servers.append(await start_tensorline(workdir, prefix))
        try:
            for server in servers:
                client = triton.InferenceServerClient(server.address)
                clients[server.name] = client
                await wait_ready(server, client)
                print(f"{server.name} ready at {server.address}, "
                      f"{time.perf_counter() - server.started:.1f} s after its start", flush=True)
            echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}", options=OPTIONS)
            echo_rpc = echo_channel.unary_unary(
                ECHO_METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferRequest.FromString)
            await check_answers(clients)
            ratio = ("ratio = tensorline / MLServer, the median of the rounds' ratios"
                     if len(clients) == 2 else "one server: no ratio")
            print(f"\nrounds={args.rounds}  MLServer parallel_workers={args.mlserver_workers}  "
                  f"cpus={args.cpus or 'all'}  (times in ms; {ratio})")
            figures["latency"] = await latency_phase(args, scale, clients, echo_rpc)
            figures["throughput"] = await throughput_phase(args, scale, clients, servers,
                                                           echo_rpc, echo_proc.pid)
            await echo_channel.close()
        finally:
            for client in clients.values():
                await client.close()
    return figures


Key = tuple[str, str]  # (server, model); the echo is ("echo", "-")
ECHO: Key = ("echo", "-")


def round_ratio(per_round: dict[Key, list[float]], model: str) -> float:
    """tensorline / MLServer, the median of each round's ratio: a round's two figures were
    measured moments apart, under the same load from the rest of the machine."""
    pairs = zip(per_round[("tensorline", model)], per_round[("MLServer", model)], strict=True)
    return statistics.median(tl / mls for tl, mls in pairs)


async def check_answers(clients: dict[str, triton.InferenceServerClient]) -> None:
    """Every model on every server answers correctly (bit-exact) before anything is timed."""
    probe = np.random.default_rng(1).standard_normal((1, 1000)).astype(np.float32)
    for name, client in clients.items():
        for model, factor in MODELS.items():
            out = await infer_call(client, model, probe)()
            if out.dtype != np.float32 or not np.array_equal(out, probe * np.float32(factor)):
                raise RuntimeError(f"{name} {model}: wrong answer ({out.dtype}, {out.shape})")


async def latency_phase(args: argparse.Namespace, scale: float,
                        clients: dict[str, triton.InferenceServerClient],
                        echo_rpc: grpc.aio.UnaryUnaryMultiCallable) -> dict[str, Any]:
    """p50/p99 of one call at a time, per size; every round times ``n`` calls of each server
    and model in turn."""
    names, figures = list(clients), {}
    rng = np.random.default_rng(0)
    for label, nbytes, count in SIZES:
        array = rng.standard_normal((1, nbytes // 4)).astype(np.float32)
        calls: dict[Key, Call] = {ECHO: echo_call(echo_rpc, "echo", array)}
        for name, client in clients.items():
            for model in MODELS:
                calls[(name, model)] = infer_call(client, model, array)
        for call in calls.values():
            await call()
        samples: dict[Key, list[list[float]]] = {key: [] for key in calls}
        n = max(2, int(count * scale))
        for turn in range(args.rounds):
            for key in rotated(list(calls), turn):
                samples[key].append(await latencies(calls[key], n))
        pooled = {key: [s for batch in rounds for s in batch] for key, rounds in samples.items()}
        p50 = {key: statistics.median(values) for key, values in pooled.items()}
        per_round = {key: [statistics.median(batch) for batch in rounds]
                     for key, rounds in samples.items()}
        figures[label] = {"echo_p50_ms": p50[ECHO] * 1e3}
        print(f"{label}: echo p50 {ms(p50[ECHO])}, p99 {ms(percentile(pooled[ECHO], .99))}")
        for model in MODELS:
            entry: dict[str, float] = {}
            parts = []
            for name in names:
                key = (name, model)
                p99 = percentile(pooled[key], 0.99)
                entry[f"{name}_p50_ms"], entry[f"{name}_p99_ms"] = p50[key] * 1e3, p99 * 1e3
                parts.append(f"{name} p50 {ms(p50[key])} p99 {ms(p99)} "
                             f"({p50[key] / p50[ECHO]:.2f}x echo)")
            text = "  ".join(parts)
            if len(names) == 2:
                ratio = entry["p50_ratio"] = round_ratio(per_round, model)
                met = "met" if ratio <= TARGETS[label] else "MISSED"
                text += f"  ratio {ratio:.3f} (target <= {TARGETS[label]}: {met})"
            figures[label][model] = entry
            print(f"  {model:>8}: {text}", flush=True)
    return figures


async def throughput_phase(args: argparse.Namespace, scale: float,
                           clients: dict[str, triton.InferenceServerClient],
                           servers: list[Server], echo_rpc: grpc.aio.UnaryUnaryMultiCallable,
                           echo_pid: int) -> dict[str, Any]:
    """Calls/s with ``IN_FLIGHT`` calls in flight at 1 KiB, and the CPU time each server and
    this client spent per call (CPU barely moves with the machine's other load)."""
    names = list(clients)
    array = np.random.default_rng(2).standard_normal((1, THROUGHPUT_BYTES // 4)).astype(
        np.float32)
    jobs: dict[Key, tuple[Call, int]] = {ECHO: (echo_call(echo_rpc, "echo", array), echo_pid)}
    for server in servers:
        for model in MODELS:
            jobs[(server.name, model)] = (infer_call(clients[server.name], model, array),
                                          server.proc.pid)
    total = max(IN_FLIGHT, int(THROUGHPUT_CALLS * scale))
    rates: dict[Key, list[float]] = {key: [] for key in jobs}
    server_cpu: dict[Key, list[float]] = {key: [] for key in jobs}
    # This process's own CPU (its gRPC threads included): where client and servers share the
    # cores, the client's cost per call bounds every server's calls/s alike.
    client_cpu: dict[Key, list[float]] = {key: [] for key in jobs}
    for turn in range(args.rounds):
        for key in rotated(list(jobs), turn):
            call, pid = jobs[key]
            before, client_before = cpu_seconds(pid), time.process_time()
            rates[key].append((await throughput(call, total, IN_FLIGHT))[0])
            server_cpu[key].append((cpu_seconds(pid) - before) / total * 1e6)
            client_cpu[key].append((time.process_time() - client_before) / total * 1e6)

    def row(key: Key) -> tuple[float, float, float]:
        return (statistics.median(rates[key]), statistics.median(server_cpu[key]),
                statistics.median(client_cpu[key]))

    echo_rate, echo_server, echo_client = row(ECHO)
    print(f"\n1 KiB, {IN_FLIGHT} in flight: calls/s (CPU per call: server; client): "
          f"echo {echo_rate:,.0f} ({echo_server:.0f} us; {echo_client:.0f} us)")
    figures: dict[str, Any] = {"echo_calls_s": echo_rate,
                               "echo_server_cpu_us_per_call": echo_server,
                               "echo_client_cpu_us_per_call": echo_client}
    for model in MODELS:
        entry: dict[str, float] = {}
        parts = []
        for name in names:
            rate, server_us, client_us = row((name, model))
            entry[f"{name}_calls_s"] = rate
            entry[f"{name}_server_cpu_us_per_call"] = server_us
            entry[f"{name}_client_cpu_us_per_call"] = client_us
            parts.append(f"{name} {rate:,.0f} ({server_us:.0f} us; {client_us:.0f} us; "
                         f"{rate / echo_rate:.2f}x echo)")
        text = "  ".join(parts)
        if len(names) == 2:
            ratio = entry["ratio"] = round_ratio(rates, model)
            met = "met" if ratio >= TARGETS["throughput"] else "MISSED"
            text += f"  ratio {ratio:.2f} (target >= {TARGETS['throughput']}: {met})"
        figures[model] = entry
        print(f"  {model:>8}: {text}", flush=True)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="MLServer runs from its own virtualenv (default bench/.venv-mlserver), created "
               f"with {' '.join(MLSERVER_REQUIREMENTS)} on first use; see the module docstring.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="about a third of the calls")
    parser.add_argument("--only", choices=["mlserver", "tensorline"],
                        help="measure one server (and the echo) alone")
    parser.add_argument("--mlserver-workers", type=int, default=0,
                        help="MLServer's parallel_workers (0, the default here: models in the "
                             "server process; MLServer's own default is 1)")
    parser.add_argument("--mlserver-venv", default=str(HERE / ".venv-mlserver"),
                        help="virtualenv MLServer runs from (created on first use)")
    parser.add_argument("--cpus", help="pin every server to these CPUs (taskset -c list)")
    try:
        run_and_save(main, parser)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("interrupted: the servers were stopped and the temp dir removed")
