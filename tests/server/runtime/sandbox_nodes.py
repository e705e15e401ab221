"""Test-only nodes for the sandbox runtime tests: well-behaved ones, crashers and escape attempts.

Workers import this module by name (``tests.server.runtime.sandbox_nodes``), so it must stay
importable from the repository root and import nothing but the node SDK, numpy and the stdlib.
Node type names must not clash with the built-in nodes or tests/nodes (a registry may load this
module next to them).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.server.nodes import (
    Chunk,
    Emit,
    Json,
    Node,
    NodeParams,
    NodeTraits,
    Port,
    StreamingNode,
)


class Echo(Node):
    """Returns its input unchanged."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class Identity(Node):
    """Returns all its inputs as outputs (fan-in ports included)."""

    inputs = (Port("in"), Port("many", many=True, required=False))
    outputs = (Port("in"), Port("many"))

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return dict(inputs)


class AsyncDouble(Node):
    """Async process: doubles a tensor."""

    async def initialize(self) -> None:
        await asyncio.sleep(0)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        await asyncio.sleep(0)
        return inputs["in"] * 2


class _Counts:
    inits = 0
    calls = 0
    steps = 0


class WarmCounter(Node):
    """Reusable: reports how often it was initialized in this worker."""

    reusable = True

    class Params(NodeParams):
        label: str = "a"

    def initialize(self) -> None:
        _Counts.inits += 1

    def process(self, inputs: Mapping[str, Any]) -> Any:
        _Counts.calls += 1
        return Json({"inits": _Counts.inits, "calls": _Counts.calls, "pid": os.getpid(),
                     "label": self.params.label})


class Marker(Node):
    """Writes ``<scratch>/<execution>.<event>`` files so tests can see what ran in the worker."""

    class Params(NodeParams):
        mode: str = "ok"  # ok | fail | sleep

    def _mark(self, event: str) -> None:
        assert self.context.scratch_dir is not None
        Path(self.context.scratch_dir, f"{self.context.execution_id}.{event}").write_text(
            str(os.getpid()))

    def initialize(self) -> None:
        self._mark("initialize")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        self._mark("process")
        if self.params.mode == "fail":
            raise ValueError("bad value")
        if self.params.mode == "sleep":
            while not self.context.cancelled.wait(0.01):
                pass
            self._mark("cancelled")
        return inputs["in"]

    def cleanup(self) -> None:
        self._mark("cleanup")


class OneShot(Node):
    """No initialize, no cleanup: ``SandboxRuntime.call`` creates, runs and drops it with one
    ``run`` request. ``probe`` reports its context and params; ``fail`` raises; ``sleep``
    marks ``<scratch>/<execution>.process`` and waits for ``context.cancelled``, then marks
    ``cancelled``."""

    class Params(NodeParams):
        mode: str = "probe"  # probe | fail | sleep
        tag: str = ""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        context = self.context
        if self.params.mode == "fail":
            raise ValueError("one-shot failure")
        if self.params.mode == "sleep":
            assert context.scratch_dir is not None
            Path(context.scratch_dir, f"{context.execution_id}.process").write_text("")
            while not context.cancelled.wait(0.01):
                pass
            Path(context.scratch_dir, f"{context.execution_id}.cancelled").write_text("")
            return None
        return Json({"node_id": context.node_id, "execution_id": context.execution_id,
                     "scratch_dir": context.scratch_dir, "runtime": context.runtime,
                     "tag": self.params.tag, "in": np.asarray(inputs["in"]).tolist(),
                     "pid": os.getpid()})


class CleanupOnly(Node):
    """No initialize, but a cleanup (marks ``<scratch>/<execution>.cleanup``)."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]

    def cleanup(self) -> None:
        assert self.context.scratch_dir is not None
        Path(self.context.scratch_dir, f"{self.context.execution_id}.cleanup").write_text("")


class AsyncMarker(Marker):
    """Marker with an async process. ``block``: suspends until its task is cancelled;
    ``timeout``: uses asyncio.timeout before its first suspension and reports its task's
    pending cancel count (0 unless an earlier cancellation leaked into this call)."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        task = asyncio.current_task()
        assert task is not None
        if self.params.mode == "block":
            self._mark("process")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self._mark("cancelled")
                raise
        if self.params.mode == "timeout":
            cancelling = task.cancelling()
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.Event().wait()
            except TimeoutError:
                return Json({"timed_out": True, "cancelling": cancelling, "pid": os.getpid()})
        return inputs["in"]


class FailingInit(Node):
    def initialize(self) -> None:
        raise ValueError("cannot initialize")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class BlockedInit(Node):
    """Initialize needs the network: blocked in the sandbox (fallback material)."""

    def initialize(self) -> None:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class CrashInit(Node):
    def initialize(self) -> None:
        ctypes.string_at(0)


# --- crashes ----------------------------------------------------------------------------------


class Segfault(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        ctypes.string_at(0)


class KillSelf(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)


class CpuLoop(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        x = 0
        while True:
            x += 1


class MemoryHog(Node):
    """Declares 256 MiB and allocates 1 GiB."""

    traits = NodeTraits(memory_mb=256)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return np.ones(1 << 27, dtype=np.float64)  # 1 GiB


class Sleeper(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        time.sleep(3600)


# --- escape attempts --------------------------------------------------------------------------


class Target(NodeParams):
    port: int = 0
    path: str = ""
    pid: int = 0


class TcpConnect(Node):
    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        with socket.create_connection(("127.0.0.1", self.params.port), timeout=2) as s:
            s.sendall(b"escaped")
        return "connected"


class WriteOutside(Node):
    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        Path(self.params.path).write_text("escaped")
        return "written"


class OpenDevice(Node):
    """Opens ``path`` read/write without truncating (as a driver library opens /dev/nvidia0)
    and overwrites its first bytes."""

    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        fd = os.open(self.params.path, os.O_RDWR)
        try:
            os.write(fd, b"GPU")
        finally:
            os.close(fd)
        return "opened"


class Shell(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        return subprocess.run(["/bin/sh", "-c", "echo escaped"], capture_output=True,
                              check=True).stdout.decode()


class ForkBomb(Node):
    def process(self, inputs: Mapping[str, Any]) -> Any:
        while True:
            if os.fork() == 0:
                os._exit(0)


class SignalPid(Node):
    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        os.kill(self.params.pid, signal.SIGTERM)
        return "signalled"


class OpenFile(Node):
    """Opens another execution's shared-memory segment (or any path) for reading."""

    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        with open(self.params.path, "rb") as f:
            return f.read(16)


class ReadOtherFds(Node):
    """Tries to reach the server's memfd segments through /proc/<pid>/fd."""

    Params = Target

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return sorted(os.listdir(f"/proc/{self.params.pid}/fd"))


class Threaded(Node):
    """Uses a thread pool and asyncio.to_thread: threads stay allowed in the sandbox."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=3) as pool:
            parts = list(pool.map(lambda a: a * 2, np.array_split(inputs["in"], 3)))
        doubled = np.concatenate(parts)
        return await asyncio.to_thread(lambda: doubled + 1)


class SlowInit(Node):
    """initialize() takes longer than the node's process timeout."""

    def initialize(self) -> None:
        time.sleep(0.5)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


# --- streaming nodes (sandboxed generators) ---------------------------------------------------


def _first(value: Any) -> float:
    return float(np.asarray(value).reshape(-1)[0])


class StreamCrash(StreamingNode):
    """Passes chunks through until one whose first element is negative: then segfaults."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        for chunk in chunks:
            if _first(chunk.value) < 0:
                ctypes.string_at(0)
            yield chunk.value


class StreamFail(StreamingNode):
    """Passes chunks through; raises ValueError on a chunk whose first element is negative."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for chunk in chunks:
            if _first(chunk.value) < 0:
                raise ValueError(f"negative input at {chunk.sequence}")
            yield chunk.value


class StreamSlowParams(NodeParams):
    seconds: float = 0.001


class StreamSlow(StreamingNode):
    """A slow sync generator: per chunk, ``seconds`` of work, then the value and value + 1."""

    Params = StreamSlowParams
    params: StreamSlowParams
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        for chunk in chunks:
            time.sleep(self.params.seconds)
            yield chunk.value
            yield chunk.value + 1


class StreamBlock(StreamingNode):
    """Base of SyncStreamBlock/AsyncStreamBlock: pass chunks through; on a negative one wait
    until cancelled (sync: on ``context.cancelled``; async: forever, until its task is
    cancelled). Marks, in the worker's scratch dir, when the generator is closed and when
    cleanup ran (tests look there)."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    def _mark(self, what: str) -> None:
        Path(self.context.scratch_dir, f"{what}-{self.context.execution_id}").write_text(what)

    def _sync(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        try:
            for chunk in chunks:
                if _first(chunk.value) < 0:
                    self._mark("blocked")
                    self.context.cancelled.wait()
                yield chunk.value
        finally:
            self._mark("closed")

    def cleanup(self) -> None:
        self._mark("cleanup")


class SyncStreamBlock(StreamBlock):
    """StreamBlock whose ``stream`` is a sync generator function (the worker checks)."""

    def stream(self, chunks: Iterator[Chunk]) -> Iterator[Any]:
        yield from self._sync(chunks)


class AsyncStreamBlock(StreamBlock):
    """StreamBlock as an async generator (blocks until its task is cancelled)."""

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        try:
            async for chunk in chunks:
                if _first(chunk.value) < 0:
                    self._mark("blocked")
                    await asyncio.Event().wait()
                yield chunk.value
        finally:
            self._mark("closed")


class StreamHold(StreamingNode):
    """Keeps each chunk's value until the next one arrives, then yields it with its own
    sequence (``Emit``); reports an event per chunk. Tests that arrays outlive their message."""

    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        held: tuple[int, Any] | None = None
        async for chunk in chunks:
            self.context.report(f"chunk {chunk.sequence}", progress=0.5, kind="progress")
            if held is not None:
                yield Emit(held[1], held[0])
            held = (chunk.sequence, chunk.value)
        if held is not None:
            yield Emit(held[1], held[0])


class Nap(Node):
    """One-shot; sleeps ``seconds`` (wall clock, no CPU) and echoes its input: a slow call that
    occupies a worker for a known time (scheduling tests)."""

    class Params(NodeParams):
        seconds: float = 1.0

    def process(self, inputs: Mapping[str, Any]) -> Any:
        time.sleep(self.params.seconds)
        return inputs["in"]


class Gate(Node):
    """One-shot; marks ``<scratch>/<execution>.process``, then holds its worker until the test
    creates ``<scratch>/<execution>.go`` (through ``SandboxRuntime.scratch_views``) and echoes
    its input: a slow call that ends when the test says so, without a cancellation."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        scratch = self.context.scratch_dir
        assert scratch is not None
        execution = self.context.execution_id
        Path(scratch, f"{execution}.process").write_text("")
        go = Path(scratch, f"{execution}.go")
        while not go.exists():
            if self.context.cancelled.wait(0.01):
                return None
        return inputs["in"]


class Step(Node):
    """One-shot; counts its runs in its worker and returns ``{"step", "pid", "in"}``. Its input
    says what to do first: ``"fail"`` raises, ``"crash"`` kills the worker, ``"nap:S"`` sleeps
    S seconds, ``"wait"`` marks ``<scratch>/<execution>.process`` and waits for
    ``context.cancelled``; ``"forge:N"`` sends the server a reply of its own on the control
    socket (fd 3), an "ok" with N values, before its real reply (batch tests)."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        _Counts.steps += 1
        action = str(inputs["in"])
        if action == "fail":
            raise ValueError(f"step {_Counts.steps} failed")
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if action.startswith("nap:"):
            time.sleep(float(action[4:]))
        if action == "wait":
            assert self.context.scratch_dir is not None
            Path(self.context.scratch_dir, f"{self.context.execution_id}.process").write_text("")
            while not self.context.cancelled.wait(0.01):
                pass
        if action.startswith("forge:"):
            from tensorline.server.runtime.sandbox import _shm

            forged, _ = _shm.pack(("ok", [0] * int(action[6:]), 0.0),
                                  _shm.Outbox(inline_max=1024, name="forged"))
            socket.socket(fileno=os.dup(3)).send(forged)
        return Json({"step": _Counts.steps, "pid": os.getpid(), "in": action})


class HostedStep(Step):
    """``Step`` with an ``initialize``: a stream session hosts an instance of it in a worker
    (``calls`` batches) instead of running it one-shot."""

    def initialize(self) -> None:
        self.ready = True


class WhoseStep(Step):
    """``Step`` that also says which node and execution its context names (gathered calls each
    carry their own)."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        out = super().process(inputs)
        return Json({**out.value, "node": self.context.node_id,
                     "execution": self.context.execution_id})
