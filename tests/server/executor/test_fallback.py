"""Sandbox failure and in-process fallback, with a stand-in sandbox runtime whose worker "dies".

The real sandbox runtime plugs in behind the same interface; here a fake one raises
``SandboxFailure`` so the executor's and the selector's side of the contract is tested."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, SandboxError
from tensorline.client.codec import PortItem
from tensorline.server import SandboxFailure, Settings, create_server
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import NodeRegistry
from tensorline.server.runtime import ExecutionScope, InProcessRuntime, NodeInstance, Runtime
from tensorline.server.selector import Selector


class DyingInstance(NodeInstance):
    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        raise SandboxFailure(self.spec.node_id, "worker killed by SIGKILL")


class DyingSandbox(Runtime):
    name: ClassVar[str] = "sandbox"

    def __init__(self) -> None:
        self.acquired: list[str] = []
        self.released: list[str] = []

    async def shutdown(self) -> None:
        pass

    async def acquire(self, spec: NodeSpec, scope: ExecutionScope) -> NodeInstance:
        self.acquired.append(spec.node_id)
        return DyingInstance(spec)

    async def release(self, instance: NodeInstance) -> None:
        self.released.append(instance.spec.node_id)


def engine_with(sandbox: DyingSandbox, *, fallback: bool = True,
                untrusted: tuple[str, ...] = ()) -> PipelineEngine:
    registry = NodeRegistry.default(
        modules=[m for m in ("tests.nodes.basic", "tests.nodes.spine") if m not in untrusted],
        entry_points=False)
    for module in untrusted:
        # In-process on purpose: the fake sandbox needs the classes (a real server describes
        # untrusted modules in a sandboxed worker instead).
        registry.load_module(module, trusted=False)
    selector = Selector(sandbox_available=True, fallback_enabled=fallback)
    return PipelineEngine(registry, selector, {"inprocess": InProcessRuntime(), "sandbox": sandbox})


@pytest.fixture
def sandbox() -> DyingSandbox:
    return DyingSandbox()


MANIFEST = {"version": "v1", "nodes": [
    {"id": "boxed", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "rust_python"},
    {"id": "plain", "node_type": "PassThrough"},
]}


async def test_trusted_node_falls_back_in_process_and_says_why(sandbox: DyingSandbox) -> None:
    server, port = await create_server(Settings(host="127.0.0.1", port=0, load_entry_points=False),
                                       engine=engine_with(sandbox))
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            result = await client.execute(MANIFEST, {"boxed": np.ones(2), "plain": "x"})
            info = await client.server_info()
    finally:
        await server.stop(grace=0.5)
    np.testing.assert_array_equal(result["boxed"], [2.0, 2.0])
    metrics = {m.node_id: m for m in result.metrics.nodes}
    assert metrics["boxed"].runtime == "inprocess"
    assert metrics["boxed"].selection_reason == "fallback from sandbox: worker killed by SIGKILL"
    assert metrics["boxed"].fallback == "worker killed by SIGKILL"
    assert metrics["plain"].runtime == "inprocess"
    assert metrics["plain"].fallback == ""
    assert sandbox.acquired == sandbox.released == ["boxed"]
    assert sorted(info.runtimes) == ["inprocess", "sandbox"]


async def test_no_fallback_when_disabled(sandbox: DyingSandbox) -> None:
    server, port = await create_server(Settings(host="127.0.0.1", port=0, load_entry_points=False),
                                       engine=engine_with(sandbox, fallback=False))
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(SandboxError) as caught:
                await client.execute(MANIFEST, {"boxed": np.ones(2), "plain": "x"})
    finally:
        await server.stop(grace=0.5)
    error = caught.value
    assert error.code == grpc.StatusCode.ABORTED
    assert error.reason == "SANDBOX_FAILURE"
    assert error.node_id == "boxed"
    assert error.metadata["cause"] == "worker killed by SIGKILL"
    assert sandbox.released == ["boxed"]


async def test_untrusted_node_never_falls_back(sandbox: DyingSandbox) -> None:
    engine = engine_with(sandbox, untrusted=("tests.nodes.spine",))
    await engine.start()
    try:
        manifest = '{"nodes": [{"id": "p", "node_type": "Probe"}]}'
        with pytest.raises(SandboxFailure, match="worker killed"):
            await engine.execute(manifest, [PortItem("p", "", np.zeros(1))])
        plan = engine.plan_for(manifest).plan
        assert plan.nodes["p"].decision.reason == (
            "trust policy: module tests.nodes.spine is untrusted")
    finally:
        await engine.shutdown()
    assert sandbox.acquired == ["p"]
