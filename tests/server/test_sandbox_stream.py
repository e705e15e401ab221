"""StreamPipeline with sandboxed nodes through the real service: ordinary sandboxed nodes run
once per chunk in a worker next to in-process and streaming nodes; streaming nodes run their
generator in a worker with the same results as in-process, separate state per session, in
order under backpressure; a worker crash mid-stream ends the session with a sandbox error naming
the node (and the sequence) while the server keeps serving; a cancelled session leaves nothing
behind. Chunks that queue up for a busy sandboxed one-shot node run as batches (several per
round trip to a worker), with the outputs and failures of one call after another."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, NodeError, SandboxError
from tensorline.server import TensorlineServer
from tests.server.conftest import UNTRUSTED
from tests.support.polling import eventually

MIXED = {"nodes": [
    {"id": "a", "node_type": "PassThrough", "runtime_hint": "inprocess"},
    {"id": "b", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "sandbox"},
    {"id": "c", "node_type": "Counter"},
], "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}


async def test_sandboxed_node_in_a_stream(sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    async with client.stream(MIXED) as s:
        assert {n.node_id: n.runtime for n in s.nodes} == {"a": "inprocess", "b": "sandbox",
                                                         "c": "inprocess"}
        for i in range(20):
            await s.send("a", np.full(4, float(i)))
        metrics = await s.close()
        outputs = [(o.port, o.sequence, int(o.value)) async for o in s]
    assert outputs == [("count", i, i + 1) for i in range(20)] + [("total", -1, 20)]
    assert {n.node_id: n.inputs_consumed for n in metrics.nodes} == {"a": 20, "b": 20, "c": 20}


async def test_big_chunks_through_a_sandboxed_node(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "b", "node_type": "PassThrough", "runtime_hint": "sandbox"}]}
    big = np.random.default_rng(0).standard_normal(2 << 20)  # 16 MiB
    async with client.stream(manifest) as s:
        await s.send("b", big)
        await s.send("b", big[::-1].copy())
        first, second = await s.__anext__(), await s.__anext__()
        await s.close()
    assert np.array_equal(first.value, big) and np.array_equal(second.value, big[::-1])


async def run_stream(client: AsyncClient, manifest: dict[str, Any],
                     values: list[Any]) -> tuple[dict[str, str], list[tuple[str, int, Any]]]:
    first = manifest["nodes"][0]["id"]
    async with client.stream(manifest) as s:
        runtimes = {n.node_id: n.runtime for n in s.nodes}
        for value in values:
            await s.send(first, value)
        await s.close()
        outputs = [(o.port, o.sequence, np.asarray(o.value).tolist()) async for o in s]
    return runtimes, outputs


@pytest.mark.parametrize("node_type", ["Expander", "Filter", "Counter", "SyncCounter"])
async def test_streaming_node_in_the_sandbox_matches_inprocess(
        sandboxed: tuple[TensorlineServer, AsyncClient], node_type: str) -> None:
    _, client = sandboxed
    values = [np.full(4, float(i)) for i in range(12)]
    runtimes, boxed = await run_stream(
        client, {"nodes": [{"id": "c", "node_type": node_type, "runtime_hint": "sandbox"}]},
        values)
    assert runtimes == {"c": "sandbox"}
    runtimes, local = await run_stream(
        client, {"nodes": [{"id": "c", "node_type": node_type, "runtime_hint": "inprocess"}]},
        values)
    assert runtimes == {"c": "inprocess"}
    assert boxed == local and boxed


async def test_sandboxed_streaming_sessions_are_isolated(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "c", "node_type": "Counter", "runtime_hint": "sandbox"}]}
    async with client.stream(manifest) as one, client.stream(manifest) as two:
        assert [n.runtime for n in one.nodes] == [n.runtime for n in two.nodes] == ["sandbox"]
        # Interleaved: each session counts only its own chunks.
        for i in range(6):
            await one.send("c", np.zeros(1))
            if i % 2:
                await two.send("c", np.zeros(1))
        await one.close()
        await two.close()
        first = [(o.port, int(o.value)) async for o in one]
        second = [(o.port, int(o.value)) async for o in two]
    assert first == [("count", i) for i in range(1, 7)] + [("total", 6)]
    assert second == [("count", i) for i in range(1, 4)] + [("total", 3)]


async def test_slow_sandboxed_streaming_node_keeps_order(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "s", "node_type": "StreamSlow"}]}
    count = 300
    async with client.stream(manifest) as s:
        assert [n.runtime for n in s.nodes] == ["sandbox"]
        for i in range(count):
            await s.send("s", np.full(64, float(i)))
        await s.close()
        outputs = [(o.sequence, float(o.value[0])) async for o in s]
    assert outputs == [(i, float(i + d)) for i in range(count) for d in (0, 1)]


async def test_streaming_node_crash_mid_stream(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    server, client = sandboxed
    runtime = server.engine.runtimes["sandbox"]
    workers = len(runtime.worker_pids())
    manifest = {"nodes": [{"id": "p", "node_type": "PassThrough"},
                          {"id": "boom", "node_type": "StreamCrash"}],
                "connections": [{"from": "p", "to": "boom"}]}
    received = []
    with pytest.raises(SandboxError) as caught:
        async with client.stream(manifest) as s:
            assert {n.node_id: n.runtime for n in s.nodes}["boom"] == "sandbox"
            await s.send("p", np.ones(3))
            await s.send("p", -np.ones(3))
            async for out in s:
                received.append(out.sequence)
    assert caught.value.node_id == "boom"
    assert caught.value.metadata["during"] == "process of sequence 1"
    assert "SIGSEGV" in caught.value.message
    assert received in ([], [0])
    # The server still streams, sandboxed streaming nodes included.
    _, outputs = await run_stream(client, {"nodes": [{"id": "boom", "node_type": "StreamCrash"}]},
                                  [np.ones(2)])
    assert outputs == [("out", 0, [1.0, 1.0])]
    await eventually(lambda: len(runtime.worker_pids()) >= workers,
                     what="the crashed worker to be replaced")


@pytest.mark.parametrize("node_type", ["SyncStreamBlock", "AsyncStreamBlock"])
async def test_cancel_mid_stream_cleans_up(sandboxed: tuple[TensorlineServer, AsyncClient],
                                           node_type: str) -> None:
    server, client = sandboxed
    runtime = server.engine.runtimes["sandbox"]
    pids = set(runtime.worker_pids())
    manifest = {"nodes": [{"id": "b", "node_type": node_type}]}
    async with client.stream(manifest) as s:
        assert [n.runtime for n in s.nodes] == ["sandbox"]
        await s.send("b", np.ones(2))
        assert float((await s.__anext__()).value[0]) == 1.0
        await s.send("b", -np.ones(2))  # the node blocks until it is cancelled
        scratch = runtime.scratch_views()
        await eventually(lambda: any(name.startswith("blocked-") for d in scratch
                                     for name in os.listdir(d)), what="the node to block")
        await s.cancel("stop")
    def marks() -> set[str]:
        return {name.split("-", 1)[0] for d in scratch for name in os.listdir(d)
                if name.endswith(f"-{s.session_id}")}

    await eventually(lambda: marks() >= {"closed", "cleanup"},
                     what="generator closed and cleanup run")
    assert marks() == {"blocked", "closed", "cleanup"}
    # Cancelled in time: no worker was killed, and the same workers serve the next session.
    assert set(runtime.worker_pids()) == pids
    _, outputs = await run_stream(client, manifest, [np.ones(2)])
    assert outputs == [("out", 0, [1.0, 1.0])]


async def test_worker_crash_mid_stream(sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    _, client = sandboxed
    manifest = {"nodes": [{"id": "p", "node_type": "PassThrough"},
                          {"id": "boom", "node_type": "Segfault"}],
                "connections": [{"from": "p", "to": "boom"}]}
    with pytest.raises(SandboxError) as caught:
        async with client.stream(manifest) as s:
            await s.send("p", np.zeros(3))
            async for _ in s:
                pass
    assert caught.value.node_id == "boom"
    assert caught.value.metadata["during"] == "process of sequence 0"
    # The server still streams.
    async with client.stream(MIXED) as s:
        await s.send("a", np.ones(2))
        assert (await s.close()).chunks_received == 1


@pytest.mark.parametrize("order", ["plain-first", "streaming-first"])
async def test_sandboxed_streaming_and_plain_nodes_in_one_session(
        server_factory: Callable[..., Any], leak_check: None, tmp_path: Path,
        order: str) -> None:
    """A streaming node holds its worker for the whole session: a sandboxed plain node of the
    same group in the same pipeline must run on another worker (one is started: the pool has
    a single default worker here), or they would wait on each other forever."""
    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=1,
                                  sandbox_scratch_dir=tmp_path)
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client, \
            asyncio.timeout(60):  # a hang guard, not a timing assertion
        await check_plain_and_streaming(client, order)


async def check_plain_and_streaming(client: AsyncClient, order: str) -> None:
    plain = {"id": "b", "node_type": "Scale", "params": {"factor": 2}, "runtime_hint": "sandbox"}
    streaming = {"id": "e", "node_type": "Expander", "params": {"copies": 2},
                 "runtime_hint": "sandbox"}
    nodes = [plain, streaming] if order == "plain-first" else [streaming, plain]
    manifest = {"nodes": nodes, "connections": [{"from": nodes[0]["id"], "to": nodes[1]["id"]}]}
    runtimes, outputs = await run_stream(client, manifest, [np.full(2, float(i))
                                                            for i in range(40)])
    assert runtimes == {"b": "sandbox", "e": "sandbox"}
    if order == "plain-first":
        expected = [2.0 * i + d for i in range(40) for d in (0, 1)]
    else:
        expected = [2.0 * (i + d) for i in range(40) for d in (0, 1)]
    assert [value[0] for _, _, value in outputs] == expected


def step_chain(node_type: str = "Step") -> dict[str, Any]:
    return {"nodes": [{"id": "p", "node_type": "PassThrough", "runtime_hint": "inprocess"},
                      {"id": "s", "node_type": node_type, "runtime_hint": "sandbox"},
                      {"id": "q", "node_type": "PassThrough", "runtime_hint": "inprocess"}],
            "connections": [{"from": "p", "to": "s"}, {"from": "s", "to": "q"}]}


@pytest.mark.parametrize("node_type", ["Step", "HostedStep"])  # one-shot, hosted instance
async def test_queued_chunks_run_as_batches_in_order(
        sandboxed: tuple[TensorlineServer, AsyncClient], node_type: str) -> None:
    server, client = sandboxed
    stats = server.engine.runtimes["sandbox"].stats
    before = stats()
    # The first chunk holds the node while the rest queue up behind it.
    sent = ["nap:0.3"] + [f"c{i}" for i in range(120)]
    async with client.stream(step_chain(node_type)) as s:
        for value in sent:
            await s.send("p", value)
        metrics = await s.close()
        outputs = [(o.node_id, o.sequence, o.value.value["in"]) async for o in s]
    assert outputs == [("q", i, value) for i, value in enumerate(sent)]
    assert {n.node_id: n.inputs_consumed for n in metrics.nodes} == {"p": 121, "s": 121,
                                                                   "q": 121}
    after = stats()
    batches = after["batches"] - before["batches"]
    batched = after["batched_inputs"] - before["batched_inputs"]
    assert batches >= 1 and batched >= 2 * batches and batched <= 120


@pytest.mark.parametrize("node_type", ["Step", "HostedStep"])
async def test_a_failure_in_a_batch_names_its_own_sequence(
        sandboxed: tuple[TensorlineServer, AsyncClient], node_type: str) -> None:
    server, client = sandboxed
    before = server.engine.runtimes["sandbox"].stats()["batches"]
    received = []
    with pytest.raises(NodeError) as caught:
        async with client.stream(step_chain(node_type)) as s:
            for value in ["nap:0.3", "a", "b", "fail", "c", "d"]:
                await s.send("p", value)
            async for out in s:
                received.append((out.sequence, out.value.value["in"]))
    assert caught.value.node_id == "s"
    assert caught.value.metadata["sequence"] == "3"
    assert caught.value.exception_type == "ValueError"
    assert received == [(0, "nap:0.3"), (1, "a"), (2, "b")]
    assert server.engine.runtimes["sandbox"].stats()["batches"] > before


async def test_a_crash_in_a_batch_names_the_sequences_it_may_belong_to(
        sandboxed: tuple[TensorlineServer, AsyncClient]) -> None:
    """A dying worker takes the values it had not reported with it: the error names every
    sequence from the first without an output to the last it may have reached, never fewer."""
    _, client = sandboxed
    received = []
    with pytest.raises(SandboxError) as caught:
        async with client.stream(step_chain()) as s:
            for value in ["nap:0.3", "a", "b", "crash", "c"]:
                await s.send("p", value)
            async for out in s:
                received.append(out.sequence)
    assert caught.value.node_id == "s"
    assert received == list(range(len(received))) and len(received) <= 3
    during = caught.value.metadata["during"]
    if during != "process of sequence 3":
        match = re.fullmatch(r"process of one of sequences (\d+)-(\d+) \(run as a batch\)",
                             during)
        assert match, during
        assert int(match[1]) == len(received) and 3 <= int(match[2]) <= 4


async def test_batches_are_counted_on_the_metrics_endpoint(
        server_factory: Callable[..., Any], tmp_path: Path) -> None:
    from tests.server.service.test_observability import scrape

    server = await server_factory(untrusted_modules=[UNTRUSTED], sandbox_workers=1,
                                  sandbox_scratch_dir=tmp_path, metrics_port=0,
                                  metrics_host="127.0.0.1")
    async with AsyncClient(f"127.0.0.1:{server.port}", retry_unavailable=False) as client:
        _, outputs = await run_stream(client, step_chain(), ["nap:0.3", *"abcdefgh"])
    assert len(outputs) == 9
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    batches = samples[("tensorline_sandbox_batches_total", (("runtime", "sandbox"),))]
    inputs = samples[("tensorline_sandbox_batched_inputs_total", (("runtime", "sandbox"),))]
    assert batches >= 1 and 2 * batches <= inputs <= 8
