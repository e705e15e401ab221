"""Sandbox failures and the in-process fallback, with a stand-in sandbox runtime that fails calls
the way the real one classifies them (``SandboxFailure.kind``).

The real sandbox runtime plugs in behind the same interface (tests/server/test_sandbox_server.py
drives it); here the executor's, the selector's and the status translation's side of the contract
is tested through a real server: what falls back, what never does, how each is reported, and
what a missing runtime does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, TensorlineError
from tensorline.server import (
    DeadlineExceeded,
    SandboxFailure,
    Settings,
    TensorlineServer,
    create_server,
)
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import NodeRegistry
from tensorline.server.runtime import ExecutionScope, InProcessRuntime, NodeInstance, Runtime
from tensorline.server.selector import Selector
from tensorline.wire import PortItem


class FailingInstance(NodeInstance):
    def __init__(self, spec: NodeSpec, error: Exception) -> None:
        self.spec = spec
        self.error = error

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        raise self.error


class FailingSandbox(Runtime):
    """Every call fails with ``error`` (a ``SandboxFailure`` of some kind, or a deadline)."""

    name: ClassVar[str] = "sandbox"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.acquired: list[str] = []
        self.released: list[str] = []

    async def shutdown(self) -> None:
        pass

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
        self.acquired.append(spec.node_id)
        return FailingInstance(spec, self.error)

    async def release(self, instance: NodeInstance) -> None:
        self.released.append(instance.spec.node_id)

    def stats(self) -> dict[str, float]:
        return {"workers": 3.0}


class CountingInProcess(InProcessRuntime):
    """The in-process runtime, noting the nodes it was given (a call, or an instance for a
    stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: set[str] = set()

    async def call(self, spec: NodeSpec, scope: ExecutionScope,
                   inputs: Mapping[str, Any]) -> Any:
        self.runs.add(spec.node_id)
        return await super().call(spec, scope, inputs)

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
        self.runs.add(spec.node_id)
        return await super().acquire(spec, scope)


def engine_with(runtimes: dict[str, Runtime], *, fallback: bool = True,
                untrusted: tuple[str, ...] = ()) -> PipelineEngine:
    registry = NodeRegistry.default(
        modules=[m for m in ("tests.nodes.basic", "tests.nodes.spine") if m not in untrusted],
        entry_points=False)
    for module in untrusted:
        # In-process on purpose: the fake sandbox needs the classes (a real server describes
        # untrusted modules in a sandboxed worker instead).
        registry.load_module(module, trusted=False)
    # The selector believes in a sandbox even when ``runtimes`` has none: a plan compiled
    # before the runtime went away.
    selector = Selector(sandbox_available=True, fallback_enabled=fallback)
    return PipelineEngine(registry, selector, runtimes)


Served = tuple[TensorlineServer, AsyncClient]


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """``await serve(engine)``: a real server on a real port and a client of it."""
    started: list[tuple[TensorlineServer, AsyncClient]] = []

    async def start(engine: PipelineEngine) -> Served:
        server, port = await create_server(
            Settings(host="127.0.0.1", port=0, load_entry_points=False), engine=engine)
        await server.start()
        client = AsyncClient(f"127.0.0.1:{port}", retry_unavailable=False)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        await client.close()
        await server.stop(grace=0.5)


MANIFEST = {"version": "v1", "nodes": [
    {"id": "boxed", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "rust_python"},
    {"id": "plain", "node_type": "PassThrough"},
]}
INPUTS = {"boxed": np.ones(2), "plain": "x"}


def fallback_count(server: TensorlineServer, reason: str, node_type: str = "Scale") -> float:
    value = server.telemetry.registry.get_sample_value(
        "tensorline_fallbacks_total", {"node_type": node_type, "reason": reason})
    return value or 0.0


@pytest.mark.parametrize("kind", ["import", "transfer", "unavailable"])
async def test_a_node_the_sandbox_cannot_host_falls_back_and_is_reported(
        serve: Any, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    cause = f"cannot host it ({kind})"
    sandbox = FailingSandbox(SandboxFailure("boxed", cause, during="initialize", kind=kind))
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess, "sandbox": sandbox}))
    async with client:
        result = await client.execute(MANIFEST, INPUTS)
    np.testing.assert_array_equal(result["boxed"], [2.0, 2.0])
    metrics = {m.node_id: m for m in result.metrics.nodes}
    assert metrics["boxed"].runtime == "inprocess"
    assert metrics["boxed"].selection_reason == f"fallback from sandbox: {cause}"
    assert metrics["boxed"].fallback == cause
    assert (metrics["plain"].runtime, metrics["plain"].fallback) == ("inprocess", "")
    assert sandbox.acquired == sandbox.released == ["boxed"]
    assert inprocess.runs == {"boxed", "plain"}
    assert fallback_count(server, kind) == 1.0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"node boxed (Scale): the sandbox could not host it ({cause}); falling back to "
        "in-process"]


@pytest.mark.parametrize(("kind", "code"), [
    ("permission", grpc.StatusCode.PERMISSION_DENIED),
    ("memory", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("cpu", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("crash", grpc.StatusCode.ABORTED),
    ("protocol", grpc.StatusCode.ABORTED),
])
async def test_what_the_sandbox_denied_or_stopped_never_runs_in_process(
        serve: Any, kind: str, code: grpc.StatusCode) -> None:
    cause = f"stopped by the sandbox ({kind})"
    # During initialize too: a denial is a denial whenever it happens.
    sandbox = FailingSandbox(SandboxFailure("boxed", cause, during="initialize", kind=kind))
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess, "sandbox": sandbox}))
    async with client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(MANIFEST, INPUTS)
    error = caught.value
    assert error.code == code
    assert error.reason == "SANDBOX_FAILURE"
    assert "node 'boxed'" in error.message and cause in error.message
    assert error.metadata["node_id"] == "boxed"
    assert (error.metadata["cause"], error.metadata["kind"]) == (cause, kind)
    assert "boxed" not in inprocess.runs
    assert fallback_count(server, kind) == 0.0


@pytest.mark.parametrize(("kind", "falls_back"), [("import", True), ("permission", False)])
async def test_a_streaming_session_follows_the_same_rules(serve: Any, kind: str,
                                                          falls_back: bool) -> None:
    class FailingAcquire(FailingSandbox):
        async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
            self.acquired.append(spec.node_id)
            raise self.error

    sandbox = FailingAcquire(SandboxFailure("boxed", f"({kind})", during="initialize",
                                            kind=kind))
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess, "sandbox": sandbox}))
    async with client:
        if falls_back:
            async with client.stream(MANIFEST) as session:
                boxed = {n.node_id: n for n in session.nodes}["boxed"]
                await session.send("boxed", np.ones(2))
                assert (await session.close()).chunks_received == 1
            assert (boxed.runtime, boxed.fallback) == ("inprocess", f"({kind})")
        else:
            with pytest.raises(TensorlineError) as caught:
                async with client.stream(MANIFEST) as session:
                    await session.send("boxed", np.ones(2))
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "node 'boxed'" in caught.value.message
    assert ("boxed" in inprocess.runs) is falls_back
    assert fallback_count(server, kind) == (1.0 if falls_back else 0.0)


async def test_a_deadline_in_the_sandbox_never_runs_in_process(serve: Any) -> None:
    sandbox = FailingSandbox(DeadlineExceeded("node 'boxed' (Scale) exceeded its deadline"))
    inprocess = CountingInProcess()
    _, client = await serve(engine_with({"inprocess": inprocess, "sandbox": sandbox}))
    async with client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(MANIFEST, INPUTS)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "node 'boxed'" in caught.value.message
    assert "boxed" not in inprocess.runs


async def test_no_fallback_when_disabled(serve: Any) -> None:
    sandbox = FailingSandbox(SandboxFailure("boxed", "No module named 'acme'", kind="import"))
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess, "sandbox": sandbox},
                                             fallback=False))
    async with client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(MANIFEST, INPUTS)
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert caught.value.metadata["cause"] == "No module named 'acme'"
    assert "boxed" not in inprocess.runs
    assert sandbox.released == ["boxed"]
    assert fallback_count(server, "import") == 0.0


async def test_untrusted_node_never_falls_back() -> None:
    sandbox = FailingSandbox(SandboxFailure("p", "No module named 'acme'", kind="import"))
    inprocess = CountingInProcess()
    engine = engine_with({"inprocess": inprocess, "sandbox": sandbox},
                         untrusted=("tests.nodes.spine",))
    await engine.start()
    try:
        manifest = '{"nodes": [{"id": "p", "node_type": "Probe"}]}'
        with pytest.raises(SandboxFailure, match="No module named"):
            await engine.execute(manifest, [PortItem("p", "", np.zeros(1))])
        plan = engine.plan_for(manifest).plan
        assert plan.nodes["p"].decision.reason == (
            "trust policy: module tests.nodes.spine is untrusted")
    finally:
        await engine.shutdown()
    assert sandbox.acquired == ["p"]
    assert inprocess.runs == set()


# --- a missing runtime ------------------------------------------------------------------------


async def test_a_missing_runtime_is_an_error_without_fallback(serve: Any) -> None:
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess}, fallback=False))
    async with client:
        with pytest.raises(TensorlineError) as caught:
            await client.execute(MANIFEST, INPUTS)
        with pytest.raises(TensorlineError) as streamed:
            async with client.stream(MANIFEST) as session:
                await session.send("boxed", np.ones(2))
                async for _ in session:
                    pass
    for error in (caught.value, streamed.value):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert error.reason == "RUNTIME_UNAVAILABLE"
        assert "node 'boxed' (Scale) must run in the sandbox runtime" in error.message
        assert "TENSORLINE_ENABLE_FALLBACK=false" in error.message
        assert error.metadata == {"node_id": "boxed", "runtime": "sandbox"}
    assert "boxed" not in inprocess.runs
    assert fallback_count(server, "unavailable") == 0.0


async def test_a_missing_runtime_is_a_reported_fallback_when_allowed(serve: Any) -> None:
    inprocess = CountingInProcess()
    server, client = await serve(engine_with({"inprocess": inprocess}))
    async with client:
        result = await client.execute(MANIFEST, INPUTS)
        async with client.stream(MANIFEST) as session:
            streamed = {n.node_id: n for n in session.nodes}
            await session.send("boxed", np.ones(2))
            await session.send("plain", "y")
            summary = await session.close()
        info = await client.server_info()
    np.testing.assert_array_equal(result["boxed"], [2.0, 2.0])
    for metrics in ({m.node_id: m for m in result.metrics.nodes}, streamed):
        boxed = metrics["boxed"]
        assert (boxed.runtime, boxed.fallback) == ("inprocess", "sandbox runtime unavailable")
        assert boxed.selection_reason == ("manifest runtime_hint=sandbox; sandbox unavailable on "
                                          "this server, in-process")
        assert metrics["plain"].fallback == ""
    assert summary.chunks_received == 2
    assert inprocess.runs == {"boxed", "plain"}
    # The unary run (observer) and the stream (its final metrics) each count once.
    assert fallback_count(server, "unavailable") == 2.0
    assert info.worker_pool_size == 0


async def test_server_info_reports_live_workers(serve: Any) -> None:
    sandbox = FailingSandbox(SandboxFailure("x", "unused"))
    _, client = await serve(engine_with({"inprocess": InProcessRuntime(), "sandbox": sandbox}))
    async with client:
        info = await client.server_info()
    assert info.worker_pool_size == 3
