"""Health transitions, the Prometheus endpoint and request ids in logs, on a real server."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorline.client import AsyncClient, LimitExceededError, NodeError
from tests.support.polling import eventually

MANIFEST = {"nodes": [{"id": "p", "node_type": "PassThrough"}]}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_endpoint_counts_requests_and_nodes(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics_port=0, metrics_host="127.0.0.1")
    assert server.metrics_port
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        for _ in range(3):
            await client.execute(MANIFEST, {"p": np.ones(4)})
        with pytest.raises(NodeError):
            await client.execute({"nodes": [{"id": "f", "node_type": "Fail"}]}, {"f": np.ones(1)})
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    assert samples[("tensorline_requests_total",
                    (("code", "OK"), ("method", "ExecutePipeline")))] == 3
    assert samples[("tensorline_requests_total",
                    (("code", "UNKNOWN"), ("method", "ExecutePipeline")))] == 1
    assert samples[("tensorline_node_executions_total",
                    (("node_type", "PassThrough"), ("runtime", "inprocess")))] == 3
    assert samples[("tensorline_node_errors_total",
                    (("node_type", "Fail"), ("runtime", "inprocess")))] == 1
    assert samples[("tensorline_request_duration_seconds_count",
                    (("method", "ExecutePipeline"),))] == 4
    assert samples[("tensorline_inflight_executions", ())] == 0


async def test_latency_histograms_and_load_shed_on_the_metrics_endpoint(
        server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics_port=0, metrics_host="127.0.0.1",
                                  max_concurrent_executions=1)
    slow = {"nodes": [{"id": "slow", "node_type": "SlowAsync", "params": {"seconds": 0.3}}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        first = asyncio.ensure_future(client.execute(slow, {"slow": np.ones(1)}))
        await eventually(lambda: server.service.admission.executions == 1, what="slow call")
        with pytest.raises(LimitExceededError):
            await client.execute(MANIFEST, {"p": np.ones(4)})
        await first
        await client.execute(MANIFEST, {"p": np.ones(4)})
    samples = await asyncio.to_thread(scrape, server.metrics_port)
    assert samples[("tensorline_load_shed_total", (("kind", "execution"),))] == 1
    assert samples[("tensorline_load_shed_total", (("kind", "stream"),))] == 0
    method = ("method", "ExecutePipeline")
    buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in
                     samples.items()
                     if name == "tensorline_request_duration_seconds_bucket"
                     and method in labels)
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets[-1] == (float("inf"), 3)
    # The slow call (>= 0.3 s) sits above the 0.25 s bound; the shed one and the fast one below.
    assert dict(buckets)[0.25] == 2
    assert samples[("tensorline_request_duration_seconds_sum", (method,))] >= 0.3
    node = (("node_type", "SlowAsync"), ("runtime", "inprocess"))
    assert samples[("tensorline_node_duration_seconds_count", node)] == 1
    assert samples[("tensorline_node_duration_seconds_bucket", (("le", "0.25"), *node))] == 0
    assert samples[("tensorline_node_duration_seconds_bucket", (("le", "0.5"), *node))] == 1


async def test_health_goes_not_serving_when_draining(server_factory: Callable[..., Any]) -> None:
    server = await server_factory()
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        assert await client.health() == "SERVING"
        assert await client.health("tensorline.v1.PipelineService") == "SERVING"
        await server.health.enter_graceful_shutdown()
        assert await client.health() == "NOT_SERVING"


async def test_request_id_on_every_log_line_of_a_request(
        server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    server = await server_factory()
    caplog.set_level(logging.INFO, logger="tensorline")
    manifest = {"metadata": {"name": "logged"}, "nodes": [{"id": "x", "node_type": "Scale"}]}
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        await client.execute(manifest, {"x": np.ones(2)}, request_id="req-42")
    decisions = [r for r in caplog.records if "plan 'logged'" in r.getMessage()]
    assert decisions, "the selector's decision was not logged"
    assert all(getattr(r, "request_id", None) == "req-42" for r in decisions)
    assert "inprocess" in decisions[0].getMessage()


async def test_health_follows_the_runtimes(server_factory: Callable[..., Any]) -> None:
    """NOT_SERVING while a runtime cannot execute (e.g. no live sandbox worker), SERVING again
    once it can."""
    server = await server_factory(health_interval_s=0.05)
    sandbox = server.engine.runtimes["sandbox"]
    broken = False
    original = sandbox.healthy
    sandbox.healthy = lambda: not broken and original()  # type: ignore[method-assign]

    async def status_becomes(client: AsyncClient, wanted: str) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while await client.health() != wanted:
            assert loop.time() < end, f"health never became {wanted}"
            await asyncio.sleep(0.02)

    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        assert await client.health() == "SERVING"
        broken = True
        await status_becomes(client, "NOT_SERVING")
        broken = False
        await status_becomes(client, "SERVING")
