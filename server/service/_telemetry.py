"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Requests by method and status, latency histograms, in-flight executions and streams, per-node
executions/errors/latency by runtime, fallbacks, and the runtimes' own counters (worker
restarts, active sandbox layers) read at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tensorline.server.executor import NodeReport, PipelineEngine

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)


class _RuntimeCollector(Collector):
    def __init__(self, engine: PipelineEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        restarts = CounterMetricFamily("tensorline_worker_restarts",
                                       "sandbox worker processes replaced", labels=["runtime"])
        workers = GaugeMetricFamily("tensorline_workers", "live sandbox worker processes",
                                    labels=["runtime"])
        layers = GaugeMetricFamily("tensorline_sandbox_layer_active",
                                   "1 when the isolation layer is in force", labels=["layer"])
        for name, runtime in self._engine.runtimes.items():
            stats = runtime.stats()
            if "worker_restarts" in stats:
                restarts.add_metric([name], stats["worker_restarts"])
            if "workers" in stats:
                workers.add_metric([name], stats["workers"])
            for layer in runtime.layers():
                layers.add_metric([layer.name], 1.0 if layer.active else 0.0)
        yield restarts
        yield workers
        yield layers


class Telemetry:
    def __init__(self, engine: PipelineEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tensorline_requests", "RPCs by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("tensorline_request_duration_seconds", "RPC latency",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight_executions = Gauge("tensorline_inflight_executions",
                                         "unary executions in progress", registry=r)
        self.inflight_streams = Gauge("tensorline_inflight_streams",
                                      "streaming sessions in progress", registry=r)
        self.node_executions = Counter("tensorline_node_executions", "node runs",
                                       ["node_type", "runtime"], registry=r)
        self.node_errors = Counter("tensorline_node_errors", "node runs that failed",
                                   ["node_type", "runtime"], registry=r)
        self.node_latency = Histogram("tensorline_node_duration_seconds", "node wall time",
                                      ["node_type", "runtime"], buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.fallbacks = Counter("tensorline_fallbacks",
                                 "sandbox failures retried in-process", ["node_type"], registry=r)
        self.shed = Counter("tensorline_load_shed",
                            "calls refused by the concurrency limits", ["kind"], registry=r)
        r.register(_RuntimeCollector(engine))
        self._http: Any = None
        self._thread: threading.Thread | None = None
        # Label lookups are not free: cache the children on the hot path.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, key: tuple[str, ...], metric: Any, *labels: str) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self._child(("req", method, code), self.requests, method, code).inc()
        self._child(("lat", method), self.latency, method).observe(seconds)

    def observe_node(self, report: NodeReport, failed: bool = False) -> None:
        key = (report.node_type, report.runtime)
        self._child(("ne", *key), self.node_executions, *key).inc()
        self._child(("nl", *key), self.node_latency, *key).observe(report.wall_ms / 1000.0)
        if failed:
            self._child(("nx", *key), self.node_errors, *key).inc()
        if report.fallback:
            self._child(("fb", report.node_type), self.fallbacks, report.node_type).inc()

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 = ephemeral)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
