"""Two real ``tensorline serve`` replicas on loopback behind a real HAProxy (Debian's package),
configured from docker/haproxy.cfg: HTTP/2 on both sides, round-robin per call, the gRPC health
check of the sample.

1. Calls through HAProxy reach both replicas (``instance_id`` in GetServerInfo, and the replica
   address HAProxy logged for each ExecutePipeline call).
2. SIGTERM to one replica while a bounded load of concurrent unary calls runs and a few streams
   opened before it are still sending: not a single call or stream chunk fails (the client
   retries UNAVAILABLE with its default policy, as in the nginx test), the calls in flight on the
   replica complete, its streams run on and close cleanly, HAProxy's health check takes it out
   of the rotation before it stops accepting (TENSORLINE_DRAIN_DELAY_S, see the sample), it
   exits 0, and calls from then on all go to the remaining replica.

Bounded: a fixed number of calls per worker and of chunks per stream, a wall-clock cap; every
process (replicas, HAProxy) is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import AsyncClient, TensorlineError
from tests.deploy.test_load_balancer import manifest
from tests.support.haproxy import HaproxyBalancer, haproxy_binary
from tests.support.processes import ServerProcess, running_servers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.skipif(haproxy_binary() is None and not IN_CI,
                       reason="haproxy is not installed (apt-get install -y haproxy); "
                              ".ci/run installs it, so this never skips in CI"),
    pytest.mark.timeout(120),
]

REPLICAS = 2
# docker/haproxy.cfg marks a NOT_SERVING replica DOWN within about 4 s (fall 2 x (inter 1 s +
# timeout check 1 s)); the drain delay it asks for keeps the replica accepting until then.
DRAIN_DELAY_S = 5
HOLD_MS = 100
WORKERS = 8
MAX_CALLS_PER_WORKER = 300
STREAMS = 4  # opened one after the other, so round robin puts two on each replica
MAX_CHUNKS_PER_STREAM = 1000
CHUNKS_AFTER_SIGTERM = 10  # each stream keeps sending this many chunks into the drain
LOAD_WALL_CAP_S = 45.0

STREAM_MANIFEST = {
    "version": "v1",
    "metadata": {"name": "lb-stream"},
    "nodes": [{"id": "double", "node_type": "Scale", "params": {"factor": 2}}],
    "connections": [],
}

LOG_LINE = re.compile(r"rid=(?P<rid>\S+) backend=\S+ server=(?P<server>\S+) "
                      r"addr=(?P<addr>\S+) status=(?P<status>\S+)")


@dataclass
class Call:
    request_id: str
    started: float
    ended: float = 0.0
    error: str | None = None


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    env = {
        "TENSORLINE_NODE_MODULES": "tests.support.nodes",
        "TENSORLINE_GRACE_S": "20",
        "TENSORLINE_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
        "TENSORLINE_LOG_LEVEL": "INFO",
    }
    with running_servers(REPLICAS, env=env, instance_prefix="replica", log_dir=tmp_path,
                         pythonpath_repo=True) as servers:
        yield servers
        # Drain all at once: one after the other, each would wait out its drain delay.
        for server in servers:
            server.send_signal()


@pytest.fixture
def balancer(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[HaproxyBalancer]:
    with HaproxyBalancer.start([server.target for server in replicas], workdir=tmp_path) as lb:
        yield lb


def served_by(log: str) -> dict[str, tuple[str, str]]:
    """request id -> (replica address, HTTP status) of every request HAProxy logged."""
    found: dict[str, tuple[str, str]] = {}
    for line in log.splitlines():
        match = LOG_LINE.search(line)
        if match:
            found[match["rid"]] = (match["addr"], match["status"])
    return found


async def test_calls_spread_over_both_replicas(replicas: list[ServerProcess],
                                               balancer: HaproxyBalancer) -> None:
    async with AsyncClient(balancer.target, timeout=30) as client:
        infos = await asyncio.gather(*(client.server_info() for _ in range(20)))
        seen = Counter(info.instance_id for info in infos)
        assert set(seen) == {f"replica-{i}" for i in range(REPLICAS)}, seen

        data = np.arange(64, dtype=np.float32)
        ids = [f"spread-{i}" for i in range(10)]
        results = await asyncio.gather(*(
            client.execute(manifest(), {"hold": data}, request_id=rid) for rid in ids))
    for result in results:
        np.testing.assert_array_equal(result["double"], data * 2)
    log = served_by(balancer.wait_logged(ids))
    addresses = Counter(log[rid][0] for rid in ids)
    assert set(addresses) == {server.target for server in replicas}, addresses
    assert {log[rid][1] for rid in ids} == {"200"}


async def test_sigterm_mid_load_through_haproxy_loses_no_call(
        replicas: list[ServerProcess], balancer: HaproxyBalancer) -> None:
    survivor, victim = replicas
    data = np.arange(256, dtype=np.float32)
    pipeline = manifest(HOLD_MS)
    calls: list[Call] = []
    streams: list[Call] = []
    chunks_sent: Counter[str] = Counter()
    stop = asyncio.Event()
    terminated = asyncio.Event()
    deadline = time.monotonic() + LOAD_WALL_CAP_S

    async def unary_worker(client: AsyncClient, index: int) -> None:
        for _ in range(MAX_CALLS_PER_WORKER):
            if stop.is_set() or time.monotonic() > deadline:
                return
            call = Call(f"w{index}-{uuid.uuid4().hex[:12]}", time.monotonic())
            calls.append(call)
            try:
                result = await client.execute(pipeline, {"hold": data}, timeout=30,
                                              request_id=call.request_id)
                np.testing.assert_array_equal(result["double"], data * 2)
            except (TensorlineError, AssertionError) as error:
                call.error = f"{type(error).__name__}: {error}"
            call.ended = time.monotonic()

    async def stream_worker(session_ready: asyncio.Event, record: Call,
                            client: AsyncClient) -> None:
        """Sends chunk after chunk (each answered before the next) until CHUNKS_AFTER_SIGTERM
        chunks went out after the SIGTERM, then closes the stream."""
        after_sigterm = 0
        try:
            async with client.stream(STREAM_MANIFEST, request_id=record.request_id) as session:
                session_ready.set()
                for sequence in range(MAX_CHUNKS_PER_STREAM):
                    if after_sigterm >= CHUNKS_AFTER_SIGTERM or time.monotonic() > deadline:
                        break
                    if terminated.is_set():
                        after_sigterm += 1
                    chunk = data + sequence
                    await session.send("double", chunk)
                    output = await anext(session)
                    assert output.sequence == sequence, (output.sequence, sequence)
                    np.testing.assert_array_equal(output.value, chunk * 2)
                    chunks_sent[record.request_id] += 1
                    await asyncio.sleep(0.02)
                metrics = await session.close()
                assert metrics.chunks_received == chunks_sent[record.request_id], metrics
        except (TensorlineError, AssertionError) as error:
            record.error = f"{type(error).__name__}: {error}"
        finally:
            session_ready.set()
            record.ended = time.monotonic()

    async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
        end = time.monotonic() + within
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError(f"{what}: not within {within:.0f} s")
            await asyncio.sleep(0.02)

    def completed() -> int:
        return sum(1 for call in calls if call.ended)

    # The client's default retry policy retries UNAVAILABLE (ClientConfig.retry_unavailable),
    # exactly as in the nginx drain test.
    async with AsyncClient(balancer.target) as client:
        tasks: list[asyncio.Task[None]] = []
        try:
            # Streams first, one at a time: consecutive requests alternate between replicas.
            for index in range(STREAMS):
                record = Call(f"stream{index}-{uuid.uuid4().hex[:12]}", time.monotonic())
                streams.append(record)
                ready = asyncio.Event()
                tasks.append(asyncio.create_task(stream_worker(ready, record, client)))
                await asyncio.wait_for(ready.wait(), 20)
            tasks += [asyncio.create_task(unary_worker(client, i)) for i in range(WORKERS)]
            await wait_for(lambda: completed() >= 3 * WORKERS
                           and all(chunks_sent[s.request_id] >= 3 for s in streams),
                           30, "load reached steady state")
            sigterm_at = time.monotonic()
            victim.send_signal()
            terminated.set()
            # HAProxy's gRPC health check sees NOT_SERVING and takes the replica out while it
            # still accepts calls (the drain delay).
            # (Bounded beyond the drain delay so that a late check fails on the assertion
            # below, with timings, rather than as a timeout.)
            await asyncio.to_thread(balancer.wait_states,
                                    {victim.target: "DOWN", survivor.target: "UP"},
                                    timeout=DRAIN_DELAY_S + 10)
            down_at = time.monotonic()
            assert victim.alive(), (f"HAProxy marked the replica DOWN only after it exited, "
                                    f"{down_at - sigterm_at:.2f} s after SIGTERM")
            await wait_for(lambda: not victim.alive(), 30, "victim exited after SIGTERM")
            exited_at = time.monotonic()
            after = completed()
            await wait_for(lambda: completed() >= after + 3 * WORKERS, 20,
                           "load continued on the remaining replica")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        later = Counter([(await client.server_info()).instance_id for _ in range(10)])

    failures = [call for call in [*calls, *streams] if call.error]
    assert not failures, f"{len(failures)} of {len(calls)} calls and {len(streams)} streams " \
                         f"failed: {failures[:5]}"
    assert victim.wait(timeout=0) == 0, victim.logs()
    assert re.search(r"drain", victim.logs(), re.IGNORECASE), victim.logs()
    assert set(later) == {"replica-0"}, later
    assert survivor.alive() and survivor.health() == "SERVING"

    log = served_by(balancer.wait_logged(c.request_id for c in [*calls, *streams]))
    on_victim = [s for s in streams if log[s.request_id][0] == victim.target]
    assert on_victim, f"no stream ran on the victim: {[log[s.request_id] for s in streams]}"
    assert all(s.ended > sigterm_at and chunks_sent[s.request_id] >= CHUNKS_AFTER_SIGTERM
               for s in on_victim), "the victim's streams ran on into the drain"
    in_flight = [c for c in calls if c.started < sigterm_at < c.ended
                 and log[c.request_id][0] == victim.target]
    assert in_flight, "no call was in flight on the victim when it got SIGTERM"
    # Once HAProxy had marked the replica DOWN it sent it nothing new (allowing for calls that
    # were started just before, on their way through HAProxy).
    late = [c for c in calls if c.started > down_at + 0.5
            and log[c.request_id][0] == victim.target]
    assert not late, late[:5]
    assert all(log[c.request_id][1] == "200" for c in calls)
    print(f"haproxy: {len(calls)} calls ({len(in_flight)} in flight on the victim at SIGTERM) "
          f"and {len(streams)} streams ({len(on_victim)} on the victim), none failed; marked "
          f"DOWN {down_at - sigterm_at:.2f} s after SIGTERM, exited after "
          f"{exited_at - sigterm_at:.2f} s")
