"""StreamPipeline end to end: a real server, the real client, the streaming executor semantics."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from tensorline.client import (
    AsyncClient,
    DeadlineExceededError,
    InvalidRequestError,
    LimitExceededError,
    NodeError,
    StreamOutput,
)
from tensorline.client._stream import STREAM_METHOD
from tensorline.wire import (
    decode_stream_response,
    encode_stream_cancel,
    encode_stream_chunk,
    encode_stream_close,
    encode_stream_init,
)
from tests.nodes import streaming as nodes


def chain(*types: str | tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """A linear manifest n0 -> n1 -> ... of the given node types (with optional params)."""
    decls = []
    for index, entry in enumerate(types):
        node_type, params = (entry, {}) if isinstance(entry, str) else entry
        decls.append({"id": f"n{index}", "node_type": node_type, "params": params})
    connections = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(len(types) - 1)]
    return {"version": "v1", "nodes": decls, "connections": connections}


def scalar(value: float) -> np.ndarray:
    return np.array([value], dtype=np.float32)


async def collect(stream: Any) -> list[StreamOutput]:
    return [out async for out in stream]


def wait_for(session: str, event: str, timeout: float = 10.0) -> bool:
    with nodes.CLEANUPS:
        return nodes.CLEANUPS.wait_for(lambda: event in nodes.SESSIONS.get(session, []), timeout)


# --- lifecycle: close vs cancel vs disconnect ---------------------------------------------------


async def test_close_drains_flushes_and_returns_metrics(client: AsyncClient) -> None:
    manifest = chain("Tracker", "Counter")
    async with client.stream(manifest) as s:
        for i in range(5):
            await s.send("n0", scalar(i))
        metrics = await s.close()
        outputs = await collect(s)
    counts = [(o.port, o.sequence, int(o.value)) for o in outputs]
    assert counts == [("count", i, i + 1) for i in range(5)] + [("total", -1, 5)]
    assert metrics.chunks_received == 5
    assert metrics.results_sent == 6
    by_node = {m.node_id: m for m in metrics.nodes}
    assert by_node["n0"].inputs_consumed == 5 and by_node["n0"].outputs_produced == 5
    assert by_node["n1"].inputs_consumed == 5 and by_node["n1"].outputs_produced == 6
    # The node flushed (saw its input end) and was cleaned up before the call ended.
    assert nodes.SESSIONS[s.session_id] == ["initialize", "flushed", "cleanup"]


async def test_half_close_is_close(target: str) -> None:
    """A client that just stops writing gets the same drain + metrics + OK."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                     response_deserializer=decode_stream_response)()
        await call.write(encode_stream_init('{"nodes":[{"id":"c","node_type":"Counter"}]}'))
        for i in range(3):
            await call.write(encode_stream_chunk(i, "c", "", scalar(i)))
        await call.done_writing()
        kinds = []
        while (response := await call.read()) is not grpc.aio.EOF:
            kinds.append(response.kind)
        assert await call.code() == grpc.StatusCode.OK
    assert kinds[-1] == "closed"
    assert kinds.count("ready") == 1 and kinds.index("ready") < kinds.index("results")


async def test_cancel_stops_at_once_without_metrics(client: AsyncClient) -> None:
    async with client.stream(chain("Tracker", "Counter")) as s:
        await s.send("n0", scalar(1))
        await s.send("n0", scalar(-1))  # blocks the node until the session stops
        assert await asyncio.to_thread(wait_for, s.session_id, "blocked")
        await s.cancel("user pressed stop")
        assert s.metrics is None
        remaining = await collect(s)
    assert len(remaining) <= 1  # at most the result of the first chunk; no flush
    events = await asyncio.to_thread(nodes.wait_for_cleanup, s.session_id)
    assert events == ["initialize", "blocked", "cleanup"]  # never flushed


async def test_cancel_status_is_cancelled_and_close_status_is_ok(target: str) -> None:
    async def run(ending: bytes) -> tuple[grpc.StatusCode, list[str]]:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                         response_deserializer=decode_stream_response)()
            await call.write(encode_stream_init('{"nodes":[{"id":"c","node_type":"Counter"}]}'))
            assert (await call.read()).kind == "event"
            kinds = []
            while (response := await call.read()).kind != "ready":
                kinds.append(response.kind)
            await call.write(encode_stream_chunk(0, "c", "", scalar(0)))
            await call.write(ending)
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    kinds.append(response.kind)
            except grpc.aio.AioRpcError:
                pass
            return await call.code(), kinds

    code, kinds = await run(encode_stream_close())
    assert code == grpc.StatusCode.OK and kinds[-1] == "closed"
    code, kinds = await run(encode_stream_cancel("stop"))
    assert code == grpc.StatusCode.CANCELLED and "closed" not in kinds


@pytest.mark.parametrize("ending", ["close", "cancel"])
async def test_sync_generator_thread_ends_before_cleanup(client: AsyncClient, ending: str) -> None:
    async with client.stream(chain("SyncTracker")) as s:
        await s.send("n0", scalar(1))
        assert float((await s.__anext__()).value[0]) == 1.0
        # The generator's thread now waits for the next chunk.
        if ending == "close":
            await s.close()
        else:
            await s.cancel()
    events = await asyncio.to_thread(nodes.wait_for_cleanup, s.session_id)
    assert events == ["chunk", "generator-exit", "cleanup"]


async def test_disconnect_cancels_and_cleans_up(target: str) -> None:
    client = AsyncClient(target)
    stream = client.stream(chain("Tracker"))
    await stream.open()
    await stream.send("n0", scalar(-1))
    assert await asyncio.to_thread(wait_for, stream.session_id, "blocked")
    await client.close()  # the connection goes away without close or cancel
    events = await asyncio.to_thread(nodes.wait_for_cleanup, stream.session_id)
    assert events == ["initialize", "blocked", "cleanup"]


async def test_deadline_ends_the_session(client: AsyncClient) -> None:
    with pytest.raises(DeadlineExceededError):
        async with client.stream(chain("Tracker"), timeout=1.0) as s:
            await s.send("n0", scalar(-1))
            await collect(s)
    events = await asyncio.to_thread(nodes.wait_for_cleanup, s.session_id)
    assert events[-1] == "cleanup"


# --- results: ordering, cardinality, joins ------------------------------------------------------


async def test_results_arrive_in_order_tagged_with_sequence(client: AsyncClient) -> None:
    async with client.stream(chain("PassThrough", ("Scale", {"factor": 2}))) as s:
        for i in range(500):
            await s.send("n0", scalar(i), sequence=1000 + i)
        await s.close()
        outputs = await collect(s)
    assert [o.sequence for o in outputs] == [1000 + i for i in range(500)]
    assert [float(o.value[0]) for o in outputs] == [2.0 * i for i in range(500)]
    assert {(o.node_id, o.port) for o in outputs} == {("n1", "out")}


async def test_order_is_kept_when_nodes_run_in_their_producers_task(
        client: AsyncClient) -> None:
    """PassThrough and SometimesSlow (on two values of three) finish in the task that feeds
    them; SometimesSlow on every third value and Scale (a thread-pool call) always suspend and
    are finished by their own stage: results stay in order, every node counts every input."""
    manifest = chain("PassThrough", "SometimesSlow", "PassThrough", ("Scale", {"factor": 2}))
    async with client.stream(manifest) as s:
        for i in range(300):
            await s.send("n0", scalar(i))
        metrics = await s.close()
        outputs = await collect(s)
    assert [o.sequence for o in outputs] == list(range(300))
    assert [float(o.value[0]) for o in outputs] == [2.0 * i for i in range(300)]
    assert [(m.inputs_consumed, m.outputs_produced) for m in metrics.nodes] == [(300, 300)] * 4


async def test_cancel_reaches_a_call_its_producer_started(client: AsyncClient) -> None:
    """Blocker is called by the task feeding it (PassThrough's, itself called by the reader),
    suspends, and is handed to its stage: cancelling the session cancels that call."""
    async with client.stream(chain("PassThrough", "Blocker")) as s:
        await s.send("n0", scalar(1))
        await s.send("n0", scalar(-1))
        assert await asyncio.to_thread(wait_for, s.session_id, "blocked")
        await s.cancel("stop")
    assert await asyncio.to_thread(wait_for, s.session_id, "cancelled")


async def test_expander_one_to_many(client: AsyncClient) -> None:
    async with client.stream(chain(("Expander", {"copies": 3}))) as s:
        for i in range(4):
            await s.send("n0", scalar(10 * i))
        await s.close()
        outputs = await collect(s)
    assert [(o.sequence, float(o.value[0])) for o in outputs] == [
        (i, 10.0 * i + k) for i in range(4) for k in range(3)]


async def test_filter_one_to_zero_or_one(client: AsyncClient) -> None:
    async with client.stream(chain("Filter")) as s:
        for i in range(10):
            await s.send("n0", scalar(i))
        metrics = await s.close()
        outputs = await collect(s)
    assert [o.sequence for o in outputs] == [0, 2, 4, 6, 8]
    assert metrics.nodes[0].inputs_consumed == 10 and metrics.nodes[0].outputs_produced == 5


@pytest.mark.parametrize("counter", ["Counter", "SyncCounter"])
async def test_stateful_counter_and_flush(client: AsyncClient, counter: str) -> None:
    async with client.stream(chain(("Expander", {"copies": 2}), counter)) as s:
        for i in range(3):
            await s.send("n0", scalar(i))
        await s.close()
        outputs = await collect(s)
    assert [(o.port, o.sequence, int(o.value)) for o in outputs] == [
        ("count", 0, 1), ("count", 0, 2), ("count", 1, 3), ("count", 1, 4),
        ("count", 2, 5), ("count", 2, 6), ("total", -1, 6)]


async def test_join_by_sequence(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "p", "node_type": "Pair"}]}
    async with client.stream(manifest) as s:
        # b arrives before a for sequence 1; a arrives twice before its partner for 2 and 3.
        await s.send("p:a", scalar(0), sequence=0)
        await s.send("p:b", scalar(100), sequence=0)
        await s.send("p:b", scalar(101), sequence=1)
        await s.send("p:a", scalar(1), sequence=1)
        await s.send("p:a", scalar(2), sequence=2)
        await s.send("p:a", scalar(3), sequence=3)
        await s.send("p:b", scalar(103), sequence=3)
        await s.send("p:b", scalar(102), sequence=2)
        await s.close()
        outputs = await collect(s)
    got = {o.sequence: o.value[:, 0].tolist() for o in outputs}
    assert got == {0: [0, 100], 1: [1, 101], 2: [2, 102], 3: [3, 103]}
    assert [o.sequence for o in outputs] == [0, 1, 3, 2]  # in completion order


async def test_optional_client_inputs_are_sticky_from_their_place_in_the_stream(
        client: AsyncClient) -> None:
    async with client.stream({"nodes": [{"id": "g", "node_type": "Gain"}]}) as s:
        await s.send("g:in", scalar(1))
        await s.send("g:gain", scalar(10))
        await s.send("g:in", scalar(2))
        await s.send("g:in", scalar(3))
        await s.send("g:gain", scalar(100))
        await s.send("g:in", scalar(4))
        await s.close()
        outputs = await collect(s)
    assert [float(o.value[0]) for o in outputs] == [1, 20, 30, 400]


async def test_unjoined_values_are_reported_not_lost(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "src", "node_type": "PassThrough"},
                          {"id": "even", "node_type": "Filter"},
                          {"id": "pair", "node_type": "Pair"}],
                "connections": [{"from": "src", "to": "even"},
                                {"from": "even", "to": "pair", "to_port": "a"},
                                {"from": "src", "to": "pair", "to_port": "b"}]}
    async with client.stream(manifest) as s:
        for i in range(10):
            await s.send("src", scalar(i))
        await s.close()
        outputs = await collect(s)
    assert [o.sequence for o in outputs] == [0, 2, 4, 6, 8]
    unjoined = [e for e in s.events if e.kind == "unjoined"]
    assert len(unjoined) == 1 and unjoined[0].node_id == "pair"
    assert unjoined[0].message.startswith("5 input value(s)")


async def test_join_buffer_is_bounded(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "p", "node_type": "Pair"}]}
    with pytest.raises(LimitExceededError) as caught:
        async with client.stream(manifest, queue_size=1) as s:
            for i in range(1000):  # 'a' only: no sequence ever completes
                await s.send("p:a", scalar(i), sequence=i)
            await collect(s)
    assert "waiting for values on its other inputs" in caught.value.message


async def test_fan_out_and_fan_in_join(client: AsyncClient) -> None:
    manifest = {
        "nodes": [{"id": "src", "node_type": "PassThrough"},
                  {"id": "x2", "node_type": "Scale", "params": {"factor": 2}},
                  {"id": "x3", "node_type": "Scale", "params": {"factor": 3}},
                  {"id": "sum", "node_type": "Add"}],
        "connections": [{"from": "src", "to": "x2"}, {"from": "src", "to": "x3"},
                        {"from": "x2", "to": "sum"}, {"from": "x3", "to": "sum"}],
    }
    async with client.stream(manifest) as s:
        for i in range(50):
            await s.send("src", scalar(i))
        await s.close()
        outputs = await collect(s)
    assert [(o.sequence, float(o.value[0])) for o in outputs] == [(i, 5.0 * i) for i in range(50)]


async def test_sessions_are_isolated(client: AsyncClient) -> None:
    async def session(n: int) -> tuple[str, list[int]]:
        async with client.stream(chain("Counter")) as s:
            for i in range(n):
                await s.send("n0", scalar(i))
            await s.close()
            return s.session_id, [int(o.value) for o in await collect(s)]

    results = await asyncio.gather(*(session(n) for n in range(1, 9)))
    assert len({sid for sid, _ in results}) == 8
    for n, (_, counts) in enumerate(results, start=1):
        assert counts == [*range(1, n + 1), n]


# --- errors -------------------------------------------------------------------------------------


async def test_invalid_manifest_fails_before_ready_like_unary(client: AsyncClient) -> None:
    manifest = {"nodes": [{"id": "a", "node_type": "Scael"}, {"id": "b", "node_type": "Scale",
                                                             "params": {"factr": 2}}]}
    with pytest.raises(InvalidRequestError) as streamed:
        async with client.stream(manifest):
            pass
    with pytest.raises(InvalidRequestError) as unary:
        await client.execute(manifest, {"a": scalar(1)})
    assert streamed.value.violations == unary.value.violations
    assert {v.field for v in streamed.value.violations} == {"nodes[0].node_type",
                                                           "nodes[1].params.factr"}


async def test_init_failure_names_the_node_before_ready(client: AsyncClient) -> None:
    events = []
    with pytest.raises(NodeError) as caught:
        async with client.stream(chain("PassThrough", "BrokenModel"), on_event=events.append):
            pass
    assert caught.value.node_id == "n1"
    assert "model file not found" in caught.value.message
    assert any(e.kind == "initializing" and e.node_id == "n1" for e in events)


async def test_node_error_mid_stream_names_node_and_sequence(client: AsyncClient) -> None:
    received = []
    with pytest.raises(NodeError) as caught:
        async with client.stream(chain("PassThrough", ("FailAt", {"sequence": 3}))) as s:
            for i in range(6):
                await s.send("n0", scalar(i), sequence=100 + i)
            async for out in s:
                received.append(out.sequence)
    assert caught.value.node_id == "n1"
    assert caught.value.metadata["sequence"] == "103"
    assert caught.value.exception_type == "RuntimeError"
    assert received == [100, 101, 102]


async def test_a_client_still_sending_after_a_failure_learns_the_real_status(
        client: AsyncClient) -> None:
    """The sender races the error status; StreamError makes the outcome deterministic."""
    for _ in range(5):
        with pytest.raises(NodeError) as caught:
            async with client.stream(chain(("FailAt", {"sequence": 3}))) as s:
                for i in range(2000):
                    await s.send("n0", scalar(i))
        assert caught.value.node_id == "n0" and caught.value.metadata["sequence"] == "3"


async def test_bad_chunk_address_is_invalid_argument(client: AsyncClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        async with client.stream(chain("PassThrough")) as s:
            await s.send("nope", scalar(1))
            await collect(s)
    assert caught.value.violations[0].field == "data.node_id"


async def test_wrong_value_kind_is_invalid_argument(client: AsyncClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        async with client.stream(chain(("Scale", {"factor": 2}))) as s:
            await s.send("n0", "text, not a tensor")
            await collect(s)
    assert "takes tensor" in caught.value.violations[0].description


# --- events -------------------------------------------------------------------------------------


async def test_events_are_separate_from_data(client: AsyncClient) -> None:
    async with client.stream(chain("PassThrough", "Counter")) as s:
        assert [(e.node_id, e.kind) for e in s.events if e.kind == "ready"] == [
            ("n0", "ready"), ("n1", "ready")] or {e.node_id for e in s.events} == {"n0", "n1"}
        await s.send("n0", scalar(1))
        await s.close()
        outputs = await collect(s)
    assert all(isinstance(o.value, np.ndarray) for o in outputs)
    assert {e.kind for e in s.events} == {"initializing", "ready"}


async def test_nodes_report_progress_as_events(client: AsyncClient) -> None:
    async with client.stream(chain("LoadingModel")) as s:
        loading = [(e.kind, e.message, round(e.progress, 2)) for e in s.events
                   if e.kind == "loading"]
        kinds = [e.kind for e in s.events]
        await s.close()
    assert loading == [("loading", f"loading shard {i}/3", round(i / 3, 2)) for i in (1, 2, 3)]
    # Reported during initialization, so before the node's "ready" (and before Ready).
    assert kinds.index("ready") > max(i for i, k in enumerate(kinds) if k == "loading")


# --- backpressure, memory and big chunks --------------------------------------------------------


async def test_backpressure_slow_node_bounded_memory(server_factory: Any) -> None:
    queue_size = 8
    server = await server_factory()
    chunk = np.zeros(4096, dtype=np.float32)  # 16 KiB: 10,000 of them are 160 MiB
    count = 10_000
    process = psutil.Process()
    rss_before = process.memory_info().rss
    peak = [rss_before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        manifest = chain("PassThrough", ("SlowPass", {"seconds": 0.0002}), "PassThrough")
        async with client.stream(manifest, queue_size=queue_size, max_buffered=64) as s:
            async def produce() -> None:
                for i in range(count):
                    chunk[0] = i
                    await s.send("n0", chunk)

            sender = asyncio.ensure_future(produce())
            sequences = []
            async for out in s:
                sequences.append(out.sequence)
                assert out.value[0] == out.sequence
                if len(sequences) == count:
                    break
            await sender
            metrics = await s.close()
    sampling.set()
    sampler.join()
    assert sequences == list(range(count))
    assert metrics.chunks_received == count and metrics.results_sent == count
    # 3 node inboxes + the outbox, each bounded by queue_size: never everything at once.
    assert metrics.max_buffered_items <= 4 * queue_size
    assert metrics.max_buffered_bytes <= 4 * queue_size * chunk.nbytes
    assert peak[0] - rss_before < 100 * 1024 * 1024


async def test_64_mib_chunks(server_factory: Any) -> None:
    server = await server_factory()
    big = np.arange(16 * 1024 * 1024, dtype=np.float32)  # 64 MiB
    async with AsyncClient(f"127.0.0.1:{server.port}") as client, \
            client.stream(chain("PassThrough", "PassThrough")) as s:
        await s.send("n0", big)
        big[0] = -5.0
        await s.send("n0", big)
        first = await s.__anext__()
        second = await s.__anext__()
        await s.close()
    assert first.value.shape == big.shape and first.value[0] == 0.0 and second.value[0] == -5.0
    assert np.array_equal(second.value[1:], big[1:])


# --- streaming nodes in a unary call ------------------------------------------------------------


async def test_streaming_nodes_run_over_one_chunk_in_unary_calls(client: AsyncClient) -> None:
    for manifest in (chain(("Expander", {"copies": 2})), chain("SyncCounter")):
        with pytest.raises(NodeError) as caught:  # async and sync generators alike
            await client.execute(manifest, {"n0": scalar(4)})
        assert "produced 2 outputs" in caught.value.message
    single = await client.execute(chain(("Expander", {"copies": 1})), {"n0": scalar(4)})
    assert single["n0"].tolist() == [4.0]
