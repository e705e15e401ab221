"""Three real ``tensorline serve`` replicas on loopback behind a real nginx (L7, ``grpc_pass``).

1. Load through the balancer reaches every replica: each reports its own ``instance_id`` in
   ``GetServerInfo``, and nginx's access log shows ``ExecutePipeline`` calls on all three.
2. One replica gets SIGTERM while calls are in flight on it: those calls complete (nginx logged
   them as answered by that replica with grpc-status 0 after the signal), the replica exits 0,
   and with the client's retry policy for UNAVAILABLE not a single call fails overall.
3. The same without a proxy: client-side round robin over the three with gRPC health checks,
   under heavy load, replicas with a drain delay: not a single call fails.
4. Heavy load through nginx: many short calls while one replica drains; none is lost.

Bounded: a fixed number of calls per worker and a wall-clock cap; every process is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient, TensorlineError
from tests.support.nginx import NginxBalancer, nginx_binary
from tests.support.processes import ServerProcess, running_servers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.skipif(nginx_binary() is None and not IN_CI,
                       reason="nginx is not installed (apt-get install -y nginx); "
                              ".ci/run installs it, so this never skips in CI"),
    pytest.mark.timeout(300),
]

REPLICAS = 3
HOLD_MS = 150  # each call stays in flight this long on its replica
WORKERS = 12  # concurrent calls through the balancer
MAX_CALLS_PER_WORKER = 400  # hard bound on the load
LOAD_WALL_CAP_S = 90.0
HEAVY_WORKERS = 48  # the heavy variant: many short calls, so some arrive during the shutdown
HEAVY_HOLD_MS = 10



def manifest(hold_ms: float = HOLD_MS) -> dict[str, Any]:
    """Sleep ``hold_ms`` (the call stays in flight), then double the tensor."""
    return {
        "version": "v1",
        "metadata": {"name": "lb-test"},
        "nodes": [
            {"id": "hold", "node_type": "Sleep", "params": {"ms": hold_ms}},
            {"id": "double", "node_type": "Scale", "params": {"factor": 2}},
        ],
        "connections": [{"from": "hold", "to": "double"}],
    }


MANIFEST = manifest()

LOG_LINE = re.compile(
    r'rid=(?P<rid>\S+) .*upstream=(?P<upstream>.+?) upstream_status=\S+ '
    r'grpc_status=(?P<grpc_status>\S*) ')


@dataclass
class Call:
    request_id: str
    started: float
    ended: float = 0.0
    error: str | None = None


@pytest.fixture
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Three replicas; parametrize indirectly with a dict to add environment variables."""
    env = {
        "TENSORLINE_NODE_MODULES": "tests.support.nodes",
        "TENSORLINE_GRACE_S": "20",
        "TENSORLINE_LOG_LEVEL": "INFO",
        **getattr(request, "param", {}),
    }
    with running_servers(REPLICAS, env=env, instance_prefix="replica", log_dir=tmp_path,
                         pythonpath_repo=True) as servers:
        yield servers


@pytest.fixture
def balancer(replicas: list[ServerProcess], tmp_path: Path) -> Iterator[NginxBalancer]:
    with NginxBalancer.start([server.target for server in replicas], workdir=tmp_path) as lb:
        yield lb


def upstreams_by_request(access_log: str) -> dict[str, list[tuple[str, str]]]:
    """request id -> [(final upstream address, grpc status)] for every logged request."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in access_log.splitlines():
        match = LOG_LINE.search(line)
        if match:
            final = match["upstream"].split(",")[-1].strip()
            found.setdefault(match["rid"], []).append((final, match["grpc_status"]))
    return found


async def test_load_spreads_over_all_replicas(replicas: list[ServerProcess],
                                              balancer: NginxBalancer) -> None:
    async with AsyncClient(balancer.target, timeout=30) as client:
        infos = await asyncio.gather(*(client.server_info() for _ in range(30)))
        seen = Counter(info.instance_id for info in infos)
        assert set(seen) == {f"replica-{i}" for i in range(REPLICAS)}, seen

        data = np.arange(64, dtype=np.float32)
        results = await asyncio.gather(*(
            client.execute(MANIFEST, {"hold": data}, request_id=f"spread-{i}")
            for i in range(15)))
    for result in results:
        np.testing.assert_array_equal(result["double"], data * 2)
    log = upstreams_by_request(balancer.wait_logged(f"spread-{i}" for i in range(15)))
    served_by = Counter(log[f"spread-{i}"][-1][0] for i in range(15))
    assert set(served_by) == {server.target for server in replicas}, served_by


@dataclass
class LoadRun:
    """What happened during ``load_with_sigterm``."""

    calls: list[Call]
    sigterm_at: float
    exited_at: float

    def failures(self) -> list[Call]:
        return [call for call in self.calls if call.error]


async def load_with_sigterm(client: AsyncClient, victim: ServerProcess, *,
                            workers: int = WORKERS, hold_ms: float = HOLD_MS) -> LoadRun:
    """``workers`` concurrent callers; once steady, SIGTERM ``victim``; go on until it has
    exited and the others served 5 more rounds. Bounded by MAX_CALLS_PER_WORKER per worker and
    LOAD_WALL_CAP_S."""
    data = np.arange(256, dtype=np.float32)
    pipeline = manifest(hold_ms)
    calls: list[Call] = []
    stop = asyncio.Event()
    deadline = time.monotonic() + LOAD_WALL_CAP_S

    async def worker(index: int) -> None:
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

    def completed() -> int:
        return sum(1 for call in calls if call.ended)

    async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
        end = time.monotonic() + within
        while not condition():
            if time.monotonic() > end:
                raise TimeoutError(f"{what}: not within {within:.0f} s")
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
    try:
        # Steady state first: every worker has finished a few calls.
        await wait_for(lambda: completed() >= 3 * workers, 60, "load reached steady state")
        sigterm_at = time.monotonic()
        victim.send_signal()
        await wait_for(lambda: not victim.alive(), 60, "victim exited after SIGTERM")
        exited_at = time.monotonic()
        # Keep the load on after the replica is gone: traffic must route around it.
        after = completed()
        await wait_for(lambda: completed() >= after + 5 * workers, 60,
                       "load continued on the remaining replicas")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return LoadRun(calls, sigterm_at, exited_at)


async def test_sigterm_mid_load_loses_no_call(replicas: list[ServerProcess],
                                              balancer: NginxBalancer) -> None:
    victim = replicas[1]
    # The client's default retry policy retries UNAVAILABLE (ClientConfig.retry_unavailable).
    async with AsyncClient(balancer.target) as client:
        run = await load_with_sigterm(client, victim)
    calls, sigterm_at, exited_at = run.calls, run.sigterm_at, run.exited_at

    failures = run.failures()
    assert not failures, f"{len(failures)} of {len(calls)} calls failed: {failures[:5]}"
    assert victim.wait(timeout=0) == 0, victim.logs()
    assert re.search(r"drain", victim.logs(), re.IGNORECASE), victim.logs()

    # Calls in flight on the victim at SIGTERM: started before it, answered by the victim
    # (last upstream nginx used) with grpc-status 0 after it.
    log = upstreams_by_request(balancer.wait_logged(call.request_id for call in calls))
    in_flight = [
        call for call in calls
        if call.started < sigterm_at < call.ended
        and log.get(call.request_id, [("", "")])[-1] == (victim.target, "0")
    ]
    retried = sum(1 for call in calls if len(log.get(call.request_id, [])) > 1)
    print(f"{len(calls)} calls, {len(in_flight)} in flight on the victim at SIGTERM, "
          f"{retried} retried by the client, drain took {exited_at - sigterm_at:.2f} s")
    assert in_flight, "no call was in flight on the victim when it got SIGTERM"
    # And nothing reached the victim once it had exited.
    late = [call for call in calls if call.started > exited_at
            and any(upstream == victim.target and status == "0"
                    for upstream, status in log.get(call.request_id, []))]
    assert not late, late[:5]
    # The survivors carried the rest.
    for survivor in (replicas[0], replicas[2]):
        assert survivor.alive()
        assert survivor.health() == "SERVING"


@pytest.mark.parametrize("replicas", [{"TENSORLINE_DRAIN_DELAY_S": "1"}], indirect=True)
async def test_client_side_round_robin_with_health_checks_survives_sigterm(
        replicas: list[ServerProcess]) -> None:
    """The other balancing choice (docker/README.md): no proxy, the client's channel knows every
    replica (like a headless Service) and round-robins calls over them, watching each one's gRPC
    health (``healthCheckConfig``). On SIGTERM a replica reports NOT_SERVING first and keeps
    serving for TENSORLINE_DRAIN_DELAY_S, so clients stop sending to it before it stops
    accepting; the retry policy covers the rest. Heavy load (many short calls) on purpose: that
    is what exposes calls arriving while a server shuts down."""
    victim = replicas[2]
    target = "ipv4:" + ",".join(server.target for server in replicas)
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [{
            "name": [{"service": "tensorline.v1.PipelineService"}],
            "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    }
    options = (("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(service_config)))
    everyone = {f"replica-{i}" for i in range(REPLICAS)}
    async with AsyncClient(target, retry_unavailable=False, extra_options=options,
                           timeout=30) as client:
        # round_robin uses a replica once its connection is up (and SERVING): until then calls
        # go to the others. Poll (bounded) until every replica has answered.
        seen: Counter[str] = Counter()
        end = time.monotonic() + 20
        while set(seen) != everyone and time.monotonic() < end:
            seen[(await client.server_info()).instance_id] += 1
        assert set(seen) == everyone, seen
        run = await load_with_sigterm(client, victim, workers=HEAVY_WORKERS,
                                      hold_ms=HEAVY_HOLD_MS)
        after = Counter([(await client.server_info()).instance_id for _ in range(20)])
    failures = run.failures()
    assert not failures, f"{len(failures)} of {len(run.calls)} calls failed: {failures[:5]}"
    assert victim.wait(timeout=0) == 0, victim.logs()
    assert set(after) == {"replica-0", "replica-1"}, after
    print(f"client-side round robin: {len(run.calls)} calls, none failed, drain took "
          f"{run.exited_at - run.sigterm_at:.2f} s")


async def test_sigterm_under_heavy_load_through_nginx(replicas: list[ServerProcess],
                                                      balancer: NginxBalancer) -> None:
    """Like test_sigterm_mid_load_loses_no_call with many short calls: the server refuses new
    work with UNAVAILABLE while in-flight calls finish, and the client retries UNAVAILABLE (and,
    for ExecutePipeline, CANCELLED from a stopping server), so no call is lost."""
    async with AsyncClient(balancer.target) as client:
        run = await load_with_sigterm(client, replicas[1], workers=HEAVY_WORKERS,
                                      hold_ms=HEAVY_HOLD_MS)
    failures = run.failures()
    assert not failures, f"{len(failures)} of {len(run.calls)} calls failed: {failures[:5]}"
