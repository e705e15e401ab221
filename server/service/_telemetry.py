"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Requests by method and status, latency histograms, in-flight executions and streams, per-node
executions/errors/latency by runtime, fallbacks, load shed, and the runtimes' own counters
(worker restarts, active sandbox layers).

The per-call figures are tallied in plain dicts on the event loop (``_Tally``) and turned into
metric families only when Prometheus scrapes: prometheus_client's own Counter/Histogram take a
lock per update, and a unary call made six of those, a measurable share of the server's CPU per
call at small payloads. Only the event loop thread writes a tally; the scrape thread copies
each one in a single C-level step (``list(dict.items())`` does not release the GIL), so a
scrape sees every observation either fully or not at all.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from tensorline.server.executor import NodeReport, PipelineEngine
from tensorline.server.service._admission import Admission

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)


class _RuntimeCollector(Collector):
    def __init__(self, engine: PipelineEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        restarts = CounterMetricFamily("tensorline_worker_restarts",
                                       "sandbox worker processes replaced", labels=["runtime"])
        recycles = CounterMetricFamily(
            "tensorline_worker_recycles", "sandbox workers replaced while healthy enough to ask "
            "(low on descriptors, peak RSS, max calls, a failed probe)", labels=["runtime"])
        workers = GaugeMetricFamily("tensorline_workers", "live sandbox worker processes",
                                    labels=["runtime"])
        layers = GaugeMetricFamily("tensorline_sandbox_layer_active",
                                   "1 when the isolation layer is in force", labels=["layer"])
        inline = GaugeMetricFamily("tensorline_inline_node_types",
                                   "sync in-process node types running on the event loop",
                                   labels=["runtime"])
        demotions = CounterMetricFamily(
            "tensorline_inline_demotions", "times a sync node type running on the event loop "
            "had a slow call and went back to the thread pool", labels=["runtime"])
        batches = CounterMetricFamily(
            "tensorline_sandbox_batches", "requests that carried several input sets to a sandbox "
            "worker at once (a stream's queued chunks, or gathered calls)", labels=["runtime"])
        batched = CounterMetricFamily(
            "tensorline_sandbox_batched_inputs", "input sets those requests carried",
            labels=["runtime"])
        gathered = CounterMetricFamily(
            "tensorline_sandbox_gathered_calls", "short one-shot calls that waited, under load, "
            "to share a worker round trip with calls of the same node", labels=["runtime"])
        for name, runtime in self._engine.runtimes.items():
            stats = runtime.stats()
            if "batches" in stats:
                batches.add_metric([name], stats["batches"])
                batched.add_metric([name], stats["batched_inputs"])
            if "gathered_calls" in stats:
                gathered.add_metric([name], stats["gathered_calls"])
            if "worker_restarts" in stats:
                restarts.add_metric([name], stats["worker_restarts"])
            if "worker_recycles" in stats:
                recycles.add_metric([name], stats["worker_recycles"])
            if "workers" in stats:
                workers.add_metric([name], stats["workers"])
            if "inline_node_types" in stats:
                inline.add_metric([name], stats["inline_node_types"])
                demotions.add_metric([name], stats["inline_demotions"])
            for layer in runtime.layers():
                layers.add_metric([layer.name], 1.0 if layer.active else 0.0)
        yield restarts
        yield recycles
        yield workers
        yield layers
        yield inline
        yield demotions
        yield batches
        yield batched
        yield gathered


class _Tally:
    """Counters and histograms keyed by label values, updated on the event loop only."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[tuple[str, ...], float] = {}
        # Per label set: one count per bucket (the last is +Inf), then the sum.
        self.histograms: dict[tuple[str, ...], list[float]] = {}

    def inc(self, key: tuple[str, ...]) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + 1.0

    def observe(self, key: tuple[str, ...], value: float) -> None:
        slots = self.histograms.get(key)
        if slots is None:
            slots = self.histograms[key] = [0.0] * (len(self.buckets) + 2)
        # Prometheus buckets are "less than or equal": the first bound >= value.
        slots[bisect_left(self.buckets, value)] += 1.0
        slots[-1] += value

    def counter(self, name: str, doc: str, labels: list[str],
                prefix: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels)
        for key, value in list(self.counts.items()):
            if key[0] == prefix:
                family.add_metric(list(key[1:]), value)
        return family

    def histogram(self, name: str, doc: str, labels: list[str],
                  prefix: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=labels)
        for key, slots in list(self.histograms.items()):
            if key[0] != prefix:
                continue
            snapshot = list(slots)
            cumulative, buckets = 0.0, []
            for bound, count in zip((*self.buckets, float("inf")), snapshot, strict=False):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric(list(key[1:]), buckets, snapshot[-1])
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class _CallCollector(Collector):
    """The per-call tallies as metric families, built at scrape time."""

    def __init__(self, tally: _Tally, admission: Admission) -> None:
        self._tally = tally
        self._admission = admission

    def collect(self) -> Iterator[Any]:
        t = self._tally
        yield t.counter("tensorline_requests", "RPCs by method and status code",
                        ["method", "code"], "req")
        yield t.histogram("tensorline_request_duration_seconds", "RPC latency", ["method"],
                          "lat")
        yield t.counter("tensorline_node_executions", "node runs", ["node_type", "runtime"],
                        "ne")
        yield t.counter("tensorline_node_errors", "node runs that failed",
                        ["node_type", "runtime"], "nx")
        yield t.histogram("tensorline_node_duration_seconds", "node wall time",
                          ["node_type", "runtime"], "nl")
        yield t.counter("tensorline_fallbacks",
                        "node runs moved from the sandbox to in-process, by why the sandbox "
                        "could not host them", ["node_type", "reason"], "fb")
        shed = CounterMetricFamily("tensorline_load_shed",
                                   "calls refused by the concurrency limits", labels=["kind"])
        for kind, count in list(self._admission.shed.items()):
            shed.add_metric([kind], count)
        yield shed


class Telemetry:
    def __init__(self, engine: PipelineEngine, admission: Admission) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._tally = _Tally(LATENCY_BUCKETS)
        inflight_executions = Gauge("tensorline_inflight_executions",
                                    "unary executions in progress", registry=r)
        inflight_executions.set_function(lambda: admission.executions)
        inflight_streams = Gauge("tensorline_inflight_streams",
                                 "streaming sessions in progress", registry=r)
        inflight_streams.set_function(lambda: admission.streams)
        r.register(_CallCollector(self._tally, admission))
        r.register(_RuntimeCollector(engine))
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self._tally.inc(("req", method, code))
        self._tally.observe(("lat", method), seconds)

    def observe_node(self, report: NodeReport, failed: bool = False) -> None:
        tally = self._tally
        key = ("ne", report.node_type, report.runtime)
        tally.inc(key)
        tally.observe(("nl", report.node_type, report.runtime), report.wall_ms / 1000.0)
        if failed:
            tally.inc(("nx", report.node_type, report.runtime))
        if report.fallback:
            tally.inc(("fb", report.node_type, report.fallback_reason or "unknown"))

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 = ephemeral)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
