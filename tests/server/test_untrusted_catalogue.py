"""Untrusted code never executes in the server process, through a real server with a real
sandbox pool: an ``--untrusted-module`` whose top level and Params validator are hostile is
imported only by its sandboxed worker, its catalogue (ListNodes) comes from there, its params are
checked against the exported JSON schema (INVALID_ARGUMENT like the trusted path), its custom
validator runs only in a worker, and modules that fail to import, kill their worker or send
garbage are reported while the others load."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, InvalidRequestError, NodeError
from tensorline.server import TensorlineServer
from tensorline.server.runtime import SandboxRuntime
from tests.support.polling import eventually

PROBE = "tests.nodes.untrusted_probe"
BROKEN = "tests.nodes.untrusted_broken"
CRASH = "tests.nodes.untrusted_crash"
GARBAGE = "tests.nodes.untrusted_garbage"
HOSTILE = (PROBE, BROKEN, CRASH, GARBAGE)
# The probe's MAGIC params value (not imported from the module: that would import it here).
MAGIC = "reveal-pid"


@pytest.fixture
async def hostile(server_factory: Callable[..., Any], leak_check: None, tmp_path: Path,
                  caplog: pytest.LogCaptureFixture,
                  ) -> AsyncIterator[tuple[TensorlineServer, AsyncClient]]:
    caplog.set_level(logging.INFO)
    server = await server_factory(node_modules=["tests.nodes.basic"],
                                  untrusted_modules=list(HOSTILE), sandbox_workers=1,
                                  sandbox_scratch_dir=tmp_path)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        yield server, client


def sandbox_of(server: TensorlineServer) -> SandboxRuntime:
    sandbox = server.engine.runtimes["sandbox"]
    assert isinstance(sandbox, SandboxRuntime)
    return sandbox


def probe(**params: Any) -> dict[str, Any]:
    return {"nodes": [{"id": "probe", "node_type": "ImportProbe", "params": params}]}


def never_imported_here() -> None:
    for module in HOSTILE:
        assert module not in sys.modules, f"{module} was imported in the server process"


async def test_the_module_runs_only_in_its_worker(hostile: tuple[TensorlineServer, AsyncClient],
                                                  tmp_path: Path) -> None:
    server, client = hostile
    never_imported_here()
    result = await client.execute(probe(gain=2.0), {"probe": np.ones(3)})
    seen = result["probe"].value
    assert result.metrics.nodes[0].runtime == "sandbox"
    assert seen["gain"] == 2.0
    # The top level ran in a sandbox worker (with the worker's environment: TMPDIR is its own
    # scratch directory), never with the server's pid.
    assert seen["pid"] != os.getpid()
    assert seen["pid"] in sandbox_of(server).worker_pids()
    assert seen["tmpdir"].startswith(str(tmp_path))
    assert seen["env_keys"], "the probe recorded no environment"
    never_imported_here()


async def test_list_nodes_shows_the_sandboxed_catalogue(
        hostile: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = hostile
    nodes = {n.node_type: n for n in await client.list_nodes()}
    info = nodes["ImportProbe"]
    assert info.module == PROBE
    assert info.trusted is False
    assert list(info.allowed_runtimes) == ["sandbox"]
    assert info.description == "Reports the process and environment its module was imported in."
    assert [(p.name, p.kind, p.description, p.required) for p in info.inputs] == [
        ("in", "tensor", "anything", True)]
    assert [(p.name, p.kind, p.description) for p in info.outputs] == [
        ("out", "json", "where the import ran")]
    schema = json.loads(info.params_schema_json)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["mode"] == {"default": "plain", "title": "Mode",
                                            "type": "string"}
    assert schema["properties"]["gain"] == {"default": 1.0, "title": "Gain", "type": "number"}

    warm = nodes["ProbeWarm"]
    assert warm.reusable is True
    assert warm.streaming is False
    assert [(p.name, p.required) for p in warm.inputs] == [("left", True), ("right", False)]
    never_imported_here()


async def test_reusable_node_with_initialize_and_cleanup_runs_in_its_worker(
        hostile: tuple[TensorlineServer, AsyncClient]) -> None:
    """The flags the runtime needs (reusable, initialize, cleanup) come from the worker."""
    _, client = hostile
    manifest = {"nodes": [{"id": "w", "node_type": "ProbeWarm"}]}
    for _ in range(2):
        result = await client.execute(manifest, {"w:left": np.arange(3.0)})
        np.testing.assert_array_equal(result["w"], np.arange(3.0) + 1)
        assert result.metrics.nodes[0].runtime == "sandbox"


async def test_params_are_checked_against_the_exported_schema(
        hostile: tuple[TensorlineServer, AsyncClient]) -> None:
    """Wrong types and unknown fields: INVALID_ARGUMENT naming the node and the field, in the
    same shape as a trusted node's pydantic validation."""
    _, client = hostile
    with pytest.raises(InvalidRequestError) as untrusted:
        await client.execute(probe(gain="loud", gian=3), {"probe": np.ones(1)})
    with pytest.raises(InvalidRequestError) as trusted:
        await client.execute({"nodes": [{"id": "s", "node_type": "Scale",
                                         "params": {"factor": "loud", "factr": 3}}]},
                             {"s": np.ones(1)})
    assert untrusted.value.code == grpc.StatusCode.INVALID_ARGUMENT
    found = {v.field: v.description for v in untrusted.value.violations}
    expected = {v.field: v.description for v in trusted.value.violations}
    assert set(found) == {"nodes[0].params.gain", "nodes[0].params.gian"}
    assert set(expected) == {"nodes[0].params.factor", "nodes[0].params.factr"}
    assert found["nodes[0].params.gain"].startswith("node 'probe': ")
    assert "'loud' is not of type 'number'" in found["nodes[0].params.gain"]
    assert found["nodes[0].params.gian"] == (
        "node 'probe': unknown field 'gian' (did you mean 'gain'?)")
    assert expected["nodes[0].params.factr"] == (
        "node 's': unknown field 'factr' (did you mean 'factor'?)")
    never_imported_here()


async def test_custom_validator_runs_only_in_the_sandbox(
        hostile: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = hostile
    with pytest.raises(NodeError) as caught:
        await client.execute(probe(mode=MAGIC), {"probe": np.ones(1)})
    assert caught.value.node_id == "probe"
    match = re.search(r"validated in pid (\d+)", caught.value.message)
    assert match is not None, caught.value.message
    pid = int(match.group(1))
    assert pid != os.getpid()
    assert pid in sandbox_of(server).worker_pids()
    # The worker survives its node's failed validation; normal calls go on.
    result = await client.execute(probe(), {"probe": np.ones(1)})
    assert result["probe"].value["gain"] == 1.0
    never_imported_here()


async def test_failing_modules_are_reported_and_the_others_load(
        hostile: tuple[TensorlineServer, AsyncClient],
        caplog: pytest.LogCaptureFixture) -> None:
    server, client = hostile
    unavailable = server.engine.registry.unavailable
    assert set(unavailable) == {BROKEN, CRASH}
    assert "RuntimeError: untrusted_broken refuses to import" in unavailable[BROKEN]
    assert "worker exited with status 3" in unavailable[CRASH]
    startup = "\n".join(r.getMessage() for r in caplog.get_records("setup"))
    for module in (BROKEN, CRASH):
        assert f"untrusted node module {module} NOT loaded" in startup

    with pytest.raises(InvalidRequestError) as caught:
        await client.execute({"nodes": [{"id": "n", "node_type": "NeverListed"}]},
                             {"n": np.ones(1)})
    (violation,) = caught.value.violations
    assert f"module {BROKEN} is not loaded: RuntimeError" in violation.description

    # Garbage from a module's describer: each bad entry rejected with a log line, the good one
    # listed and running, the trusted built-in it tried to shadow untouched.
    nodes = {n.node_type: n for n in await client.list_nodes()}
    assert "GarbageSurvivor" in nodes
    assert not {"Forged", "LongPort", "Evil\nType", "NeverListed", "NeverListedEither"} & set(
        nodes)
    assert nodes["Scale"].trusted is True
    assert server.engine.registry.get("Scale").module == "tensorline.server.nodes.builtin"
    assert "node type 'LongPort') rejected" in startup
    assert "node type None) rejected" in startup  # Forged: no usable node type at all
    assert "node type 'Evil\\nType') rejected" in startup
    assert "node type 'Scale' rejected: node type 'Scale' from" in startup
    result = await client.execute({"nodes": [{"id": "g", "node_type": "GarbageSurvivor"}]},
                                  {"g": np.arange(3.0)})
    np.testing.assert_array_equal(result["g"], np.arange(3.0) * 2)

    # No worker is kept for a module that could not load (its import killed one).
    sandbox = sandbox_of(server)
    await eventually(lambda: not [w for w in sandbox._workers.values()
                                  if w.domain in (BROKEN, CRASH) and w.state != "dead"],
                     30.0, "the failed modules' workers to be retired")
    assert await client.health() == "SERVING"
    never_imported_here()
