"""The DAG executor: runs a compiled plan over bound inputs on asyncio.

A node starts as soon as every node it depends on has finished; independent branches run
concurrently. When exactly one node is runnable and nothing else runs (a chain, the common case)
it is awaited inline: no task per node on the hot path. Fan-out hands the same object to every
consumer (inputs are read-only by contract, so nothing is copied). The first node failure
cancels the others; every started node is released (cleanup) before the error propagates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorline.server._errors import DeadlineExceeded, NodeFailed, SandboxFailure
from tensorline.server.manifest import BoundInputs, ExecutionPlan, NodeSpec, value_for_port
from tensorline.server.nodes import Port
from tensorline.server.runtime import ExecutionScope, Runtime
from tensorline.server.selector import RuntimeDecision, Selector
from tensorline.wire import SENDABLE_DTYPES, Audio, Json, PortItem, Tagged, kind_of, wire_dtype


@dataclass(slots=True)
class NodeReport:
    """What happened to one node: where it ran, why, how long it took."""

    node_id: str
    node_type: str
    runtime: str
    reason: str
    wall_ms: float = 0.0
    fallback: str = ""
    # Streaming sessions: input sets consumed and output values produced.
    inputs_consumed: int = 0
    outputs_produced: int = 0
    # Set with ``fallback``: the bounded reason (``FALLBACK_KINDS``), a metrics label.
    fallback_reason: str = ""

    @classmethod
    def planned(cls, spec: NodeSpec) -> NodeReport:
        """A report of the node as the plan placed it (a fallback decided at compile time,
        when the server has no sandbox, included)."""
        decision = spec.decision
        return cls(spec.node_id, spec.node_type, decision.runtime, decision.reason,
                   fallback=decision.fallback, fallback_reason=decision.fallback_reason)

    def ran_as(self, decision: RuntimeDecision) -> None:
        """The node runs as ``decision`` says (the plan's, or a fallback's)."""
        self.runtime, self.reason = decision.runtime, decision.reason
        if decision.fallback:
            self.fallback, self.fallback_reason = decision.fallback, decision.fallback_reason


@dataclass(slots=True)
class ExecutionResult:
    outputs: list[PortItem]
    reports: list[NodeReport]


def normalize_outputs(spec: NodeSpec, raw: Any, *, partial: bool = False) -> dict[str, Any]:
    """The node's return value as {output port: value}, checked against the declared ports.
    ``partial``: a streaming node's yield, which may leave ports out."""
    ports = spec.entry.outputs
    if type(raw) is np.ndarray and len(ports) == 1 and raw.dtype in SENDABLE_DTYPES and (
            ports[0].kind in ("tensor", "any")):
        # The commonest result, one plain array of a wire dtype: nothing below can object.
        return {ports[0].name: raw}
    if isinstance(raw, Mapping) and not _json_document(raw, ports):
        produced = dict(raw)
    elif len(ports) == 1:
        produced = {ports[0].name: raw}
    else:
        raise NodeFailed(spec.node_id, "TypeError",
                         f"a node with {len(ports)} outputs must return a mapping of port -> value")
    declared = {p.name: p for p in ports}
    unknown = set(produced) - set(declared)
    if unknown:
        raise NodeFailed(spec.node_id, "TypeError",
                         f"returned unknown output port(s) {sorted(unknown)}; "
                         f"declared: {sorted(declared)}")
    out: dict[str, Any] = {}
    for name, port in declared.items():
        if name not in produced or produced[name] is None:
            if partial:
                continue
            raise NodeFailed(spec.node_id, "TypeError", f"produced no value for output '{name}'")
        value = produced[name]
        if port.kind == "tensor" and isinstance(value, int | float | complex | bool | np.generic):
            value = np.asarray(value)
        elif _plain_json(port.kind, value):
            value = Json(value)
        try:
            kind = kind_of(value)
        except TypeError as exc:
            raise NodeFailed(spec.node_id, "TypeError", f"output '{name}': {exc}") from None
        if port.kind != "any" and kind != port.kind:
            bare = value.value if isinstance(value, Tagged) else value
            raise NodeFailed(spec.node_id, "TypeError",
                             f"output '{name}' is declared {port.kind} but the node returned "
                             f"{kind} ({type(bare).__name__})")
        problem = wire_problem(value)
        if problem is not None:
            raise NodeFailed(spec.node_id, "ValueError",
                             f"output '{name}' cannot be sent: {problem}")
        out[name] = value
    return out


def _json_document(raw: Mapping[str, Any], ports: tuple[Port, ...]) -> bool:
    """Whether a mapping returned by a node with one json output port is the JSON document
    itself rather than {port: value}: it is, unless it maps exactly that port to a value already
    made for the wire (``Json``, ``Tagged``), which no plain JSON document contains."""
    if len(ports) != 1 or ports[0].kind != "json":
        return False
    name = ports[0].name
    return not (set(raw) == {name} and isinstance(raw[name], Json | Tagged))


def _plain_json(kind: str, value: Any) -> bool:
    """A plain Python value sent as JSON: any JSON value on a json port; a dict or list (which
    has no other wire form) on an ``any`` port."""
    if kind == "json":
        return isinstance(value, dict | list | str | int | float | bool)
    return kind == "any" and isinstance(value, dict | list)


def wire_problem(value: Any) -> str | None:
    """Why a value of a known kind cannot be encoded on the wire, or None when it can.

    Checked here so that a node's bad output (an unsupported dtype, a non-finite float in JSON,
    a lone surrogate in text) is that node's error, not an INTERNAL failure of the encoder."""
    if isinstance(value, Tagged):
        metadata = value.metadata
        # Anything a node built: not necessarily a dict (None, a list of pairs, ...).
        if not isinstance(metadata, Mapping):
            return f"metadata must be a dict of strings, got {type(metadata).__name__}"
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            return "metadata keys and values must be strings"
        value = value.value
        if isinstance(value, Tagged):
            return "a Tagged value cannot hold another Tagged value"
    try:
        if isinstance(value, np.ndarray | np.generic):
            wire_dtype(value.dtype)
        elif isinstance(value, Audio):
            samples = np.asarray(value.samples)
            wire_dtype(samples.dtype)
            if samples.ndim not in (1, 2):
                return f"audio samples must be (frames,) or (frames, channels), got {samples.shape}"
            if int(value.sample_rate) <= 0:
                return f"audio sample_rate must be positive, got {value.sample_rate}"
        elif isinstance(value, Json):
            json.dumps(value.value, allow_nan=False)
        elif isinstance(value, str):
            value.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        return str(exc)
    return None


NodeObserver = Callable[[NodeReport, bool], None]


class Executor:
    def __init__(self, runtimes: Mapping[str, Runtime], selector: Selector) -> None:
        self._runtimes = runtimes
        self._selector = selector
        # Told about every finished node run (report, failed): metrics hook.
        self.observer: NodeObserver | None = None

    def run(self, plan: ExecutionPlan, inputs: BoundInputs,
            scope: ExecutionScope) -> Coroutine[Any, Any, ExecutionResult]:
        """Run ``plan`` once: await the result. The coroutine of the path that fits the plan
        is returned as it is (no frame of its own on every request)."""
        if len(plan.order) == 1:
            return self._run_single(plan, inputs, scope)
        return self._run_dag(plan, inputs, scope)

    async def _run_single(self, plan: ExecutionPlan, inputs: BoundInputs,
                          scope: ExecutionScope) -> ExecutionResult:
        """A one-node plan (the commonest request) without the scheduler's bookkeeping."""
        node_id = plan.order[0]
        spec = plan.nodes[node_id]
        report = NodeReport.planned(spec)
        node_inputs = self._gather(spec, inputs, {})
        try:
            if scope.deadline is None:
                outputs = await self._run_node(spec, node_inputs, scope, report)
            else:
                async with asyncio.timeout_at(scope.deadline):
                    outputs = await self._run_node(spec, node_inputs, scope, report)
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline exceeded while running node(s) {node_id}") from None
        return ExecutionResult([PortItem(node_id, port, outputs[port]) for _, port in plan.sinks],
                               [report])

    async def _run_dag(self, plan: ExecutionPlan, inputs: BoundInputs,
                       scope: ExecutionScope) -> ExecutionResult:
        produced: dict[tuple[str, str], Any] = {}
        reports: dict[str, NodeReport] = {}
        waiting = {nid: len({s.node_id for srcs in spec.wiring.values() for s in srcs})
                   for nid, spec in plan.nodes.items()}
        ready = [nid for nid in plan.order if waiting[nid] == 0]
        running: dict[asyncio.Task[dict[str, Any]], str] = {}
        # The node awaited inline (no task), for the deadline message.
        inline: str | None = None

        def finished(node_id: str, outputs: dict[str, Any]) -> None:
            for port, value in outputs.items():
                produced[(node_id, port)] = value
            for dependent in plan.dependents[node_id]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    ready.append(dependent)

        def start(node_id: str) -> Any:
            spec = plan.nodes[node_id]
            report = reports[node_id] = NodeReport.planned(spec)
            return self._run_node(spec, self._gather(spec, inputs, produced), scope, report)

        try:
            async with asyncio.timeout_at(scope.deadline):
                while ready or running:
                    if len(ready) == 1 and not running:
                        inline = ready.pop()
                        finished(inline, await start(inline))
                        inline = None
                        continue
                    for node_id in ready:
                        running[asyncio.ensure_future(start(node_id))] = node_id
                    ready.clear()
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        node_id = running.pop(task)
                        finished(node_id, task.result())
        except TimeoutError:
            active = sorted(running.values()) or ([inline] if inline else [])
            raise DeadlineExceeded(
                "deadline exceeded" + (f" while running node(s) {', '.join(active)}"
                                       if active else "")) from None
        finally:
            if running:
                for task in running:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
        outputs = [PortItem(node_id, port, produced[(node_id, port)])
                   for node_id, port in plan.sinks]
        return ExecutionResult(outputs, [reports[nid] for nid in plan.order if nid in reports])

    @staticmethod
    def _gather(spec: NodeSpec, inputs: BoundInputs,
                produced: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
        node_inputs: dict[str, Any] = {}
        for port in spec.entry.inputs:
            sources = spec.wiring.get(port.name)
            if sources:
                values = [value_for_port(port, produced[(s.node_id, s.port)]) for s in sources]
                node_inputs[port.name] = values if port.many else values[0]
            elif (spec.node_id, port.name) in inputs:
                node_inputs[port.name] = inputs[(spec.node_id, port.name)]
        return node_inputs

    async def _run_node(self, spec: NodeSpec, node_inputs: dict[str, Any],
                        scope: ExecutionScope, report: NodeReport) -> dict[str, Any]:
        started = time.perf_counter()
        failed = True
        try:
            try:
                raw = await self._call(spec, spec.decision, node_inputs, scope, report)
            except SandboxFailure as failure:
                retry = self._selector.fallback(spec.node_id, spec.entry, spec.decision, failure)
                if retry is None:
                    raise
                raw = await self._call(spec, retry, node_inputs, scope, report)
            outputs = normalize_outputs(spec, raw)
            failed = False
            return outputs
        finally:
            report.wall_ms = (time.perf_counter() - started) * 1000.0
            if self.observer is not None:
                self.observer(report, failed)

    async def prepare(self, plan: ExecutionPlan, scope: ExecutionScope) -> None:
        """Create the instances of ``plan``'s nodes in the runtimes the selector chose (as the
        first call would, with the same fallback rule), one node after the other; the first
        failure is raised as a call would raise it."""
        for node_id in plan.order:
            spec = plan.nodes[node_id]
            report = NodeReport.planned(spec)
            runtime = runtime_for(self._runtimes, self._selector, spec, spec.decision, report)
            try:
                await runtime.prepare(spec, scope)
            except SandboxFailure as failure:
                retry = self._selector.fallback(spec.node_id, spec.entry, spec.decision, failure)
                if retry is None:
                    raise
                await runtime_for(self._runtimes, self._selector, spec, retry,
                                  report).prepare(spec, scope)

    def _call(self, spec: NodeSpec, decision: RuntimeDecision, node_inputs: dict[str, Any],
              scope: ExecutionScope, report: NodeReport) -> Awaitable[Any]:
        """The runtime's call of the node, to await (a missing runtime raises here)."""
        runtime = runtime_for(self._runtimes, self._selector, spec, decision, report)
        return runtime.call(spec, scope, node_inputs)


def runtime_for(runtimes: Mapping[str, Runtime], selector: Selector, spec: NodeSpec,
                decision: RuntimeDecision, report: NodeReport) -> Runtime:
    """The runtime that carries out ``decision``; ``report`` is updated when that is not the
    plan's decision. When the runtime is not on this server the selector replaces the decision
    (an in-process fallback it allows and reports) or raises: never a silent move."""
    runtime = runtimes.get(decision.runtime)
    if runtime is None:
        decision = selector.runtime_missing(spec.node_id, spec.entry, decision)
        runtime = runtimes[decision.runtime]
    if decision is not spec.decision:
        report.ran_as(decision)
    return runtime
