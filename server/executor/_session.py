"""The streaming executor: one StreamPipeline session runs a compiled plan over a stream of chunks.

Shape of a session. Every node is acquired (initialized) once when the session opens and runs as
one long-lived task (a *stage*) that pulls from its own bounded inbox, so a chunk costs no task
of its own anywhere and independent nodes work on different chunks at the same time. A stage
takes everything queued in its inbox at once (one wake-up for many chunks under load) and pushes
each output into the inbox of every consumer and, for sink ports, into the session's *outbox*,
which the service drains into gRPC messages. Channels are in ``_channels``, joins in
``_join``, what the outbox carries besides results in ``_events``.

Running a node in its producer's task. A stage is a task so that nodes can work on different
chunks at once, but waking a task for every chunk at every node is most of a small chunk's cost.
So when a producer (the service's reader for a client-fed node, or an upstream stage) hands a
value to a stage that is *parked* (its task waits on its empty inbox, so it has finished
everything before) and that runs one plain node on one input slot (no join, no node timeout, not
a streaming node), the producer calls the node's ``process`` itself, in its own task. A node
that returns without suspending (an async node that awaits nothing, PassThrough) is done
there, and its outputs go on the same way, so a chain of such nodes costs one task for the
whole chain. A node that suspends (a thread-pool call, a sandbox round trip, I/O) is handed,
at its first suspension point, to its own stage task (``Suspended``), which finishes it before
anything queued after it: order is kept, and a failure is raised by the node's own stage as
before. The producer meanwhile does the node's work instead of producing, so backpressure still
reaches the client, and nothing is buffered for an inline value.

Batches. A node whose instance runs several input sets per call (``NodeInstance.batches``: a
sandboxed node, whose call is a round trip to a worker) is started inline like any other when
its stage is parked; what queues up behind that call (or any call) goes in one
``process_batch`` (up to ``BATCH_BYTES``), whose outputs and failure are emitted and raised as
one call after another would (``BatchOutcome``).

Backpressure. Inboxes and the outbox are ``Channel``s bounded by a number of values
(``queue_size``) and by bytes (``buffer_bytes``; a value larger than that still passes alone so
nothing can wedge). A producer that finds a channel full waits; the wait propagates upstream to
the service's reader, which then stops reading, so gRPC flow control stops the client. Nothing
is dropped. Memory per session is bounded by about ``2 x queue_size`` values per node (the
inbox plus the batch being worked through) plus the outbox.

Ordering. A stage handles its input in arrival order and emits in order, so the outputs of one
node arrive in order. Chunks the client sends to one source arrive in the order sent.

Joins. A node with a single input slot (one connected source, or one port fed by the client)
runs once per arriving value. A node with several slots (several ports, or a ``many`` port with
several connections, or client-fed ports) joins by sequence number: it runs once per sequence
for which every slot holds a value, pairing values of the same sequence on one slot first in,
first out (so a 1->N expander feeding both sides of a join pairs up). Optional client-fed ports
are not slots: the latest value sent to one is passed with every input set formed after it
(it travels through the inbox, in order with the data). Sequences that never complete (a filter
on one branch) wait in a buffer bounded to ``4 x queue_size + 64`` sequences per node, past which
the session fails with ``LimitExceeded``; whatever is still incomplete at the end of the stream
is reported as an ``unjoined`` event, never silently lost.

Sequences. An ordinary node's outputs carry the sequence of its input set; a streaming node's
carry the sequence of the chunk it pulled last, or ``-1`` after its input ended (a flush), or
what it chose with ``Emit``.

Lifecycle. ``end_input`` (client close) sends end-of-stream through the graph: each stage
drains, flushes (a streaming node's generator sees its input end) and passes end-of-stream on;
when every stage is done ``run`` queues the final metrics. ``aclose`` stops everything at once
(cancel, disconnect, error, deadline) and releases every node, which runs its cleanup.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from tensorline.server._errors import (
    DeadlineExceeded,
    NodeFailed,
    RequestInvalid,
    SandboxFailure,
    Violation,
)
from tensorline.server.executor._channels import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_QUEUE_SIZE,
    BufferStats,
    Channel,
    size_of,
)
from tensorline.server.executor._events import SessionClosed, SessionEvent, SessionReady
from tensorline.server.executor._executor import NodeReport, normalize_outputs, runtime_for
from tensorline.server.executor._handoff import Suspended, awaiting, raising, returning
from tensorline.server.executor._join import EOS, HANDOFF, STICKY, Join, Slot
from tensorline.server.manifest import (
    ExecutionPlan,
    NodeSpec,
    check_value_kind,
    resolve_input_port,
    value_for_port,
)
from tensorline.server.nodes import END_OF_STREAM, Chunk, Emit
from tensorline.server.runtime import BatchOutcome, ExecutionScope, NodeInstance, Runtime
from tensorline.server.selector import RuntimeDecision, Selector
from tensorline.wire import StreamItem

# Port kinds a plain array is delivered to as it is.
_ARRAY_PORT_KINDS = frozenset({"tensor", "any"})
# Bytes of values one ``process_batch`` takes at most (a larger value goes alone): past this a
# round trip's cost is the copying, which batching does not save.
BATCH_BYTES = 1 << 20


@dataclass(slots=True)
class _Stage:
    spec: NodeSpec
    runtime: Runtime
    instance: NodeInstance
    inbox: Channel
    report: NodeReport
    # Producers that must signal end of stream before the node's input has ended.
    producers: int = 0
    slots: list[Slot] = field(default_factory=list)
    # Client-fed port -> slot index (STICKY for optional ports, passed as sticky values).
    external: dict[str, int] = field(default_factory=dict)
    join: Join | None = None
    # Output port -> [(consumer stage, slot)]; sink ports also go to the outbox.
    routes: dict[str, list[tuple[_Stage, int]]] = field(default_factory=dict)
    sinks: frozenset[str] = frozenset()
    consumers: list[Channel] = field(default_factory=list)
    current: int = END_OF_STREAM
    busy_s: float = 0.0
    # Its producer may run its node while its task is parked (see the module docstring).
    inline: bool = False

    def accept(self, slot: int, sequence: int, value: Any) -> dict[str, Any] | None:
        join = self.join
        if join is None:
            info = self.slots[0]
            return {info.port: [value] if info.many else value}
        if slot == STICKY:
            port, latest = value
            join.sticky[port] = latest
            return None
        return join.add(slot, sequence, value)


class StreamSession:
    """One StreamPipeline session: open -> ``start`` -> ``run`` (+ ``send``/``end_input``)."""

    def __init__(self, executor: StreamingExecutor, plan: ExecutionPlan, scope: ExecutionScope,
                 queue_size: int, buffer_bytes: int) -> None:
        self.session_id = scope.execution_id
        self.plan = plan
        self.scope = scope
        self.queue_size = max(1, queue_size)
        self.buffer_bytes = buffer_bytes
        self._executor = executor
        self.stats = BufferStats()
        self.outbox = Channel(self.queue_size, buffer_bytes, self.stats)
        self._stages: dict[str, _Stage] = {}
        self._acquired: list[tuple[Runtime, NodeInstance]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._routes: dict[tuple[str, str], tuple[_Stage, int, Any]] = {}
        self._input_ended = False
        self._closed = False
        self._started = time.perf_counter()
        self.chunks_received = 0
        self.results_sent = 0
        self.dropped_events = 0
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        scope.extra["on_event"] = self._node_event

    # --- opening ---

    def event(self, node_id: str, kind: str, message: str = "", progress: float = 0.0) -> None:
        self.outbox.force_put(SessionEvent(node_id, kind, message, progress))

    def _node_event(self, node_id: str, kind: str, message: str, progress: float) -> None:
        # Sync node code reports from a worker thread; channels belong to the loop.
        if threading.get_ident() == self._loop_thread:
            self._report(node_id, kind, message, progress)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._report, node_id, kind, message, progress)

    def _report(self, node_id: str, kind: str, message: str, progress: float) -> None:
        # Events bypass the outbox bound; a node reporting faster than the client reads would
        # grow it without limit, so its reports are dropped (they are status, not data) while
        # the outbox holds more than a few queues' worth.
        if len(self.outbox) >= 4 * self.queue_size + 256:
            self.dropped_events += 1
            return
        self.event(node_id, kind, message, progress)

    async def start(self) -> list[NodeReport]:
        """Initialize every node (concurrently), wire the stages and queue Ready.

        On failure the error propagates; ``aclose`` releases the nodes initialized so far."""
        specs = [self.plan.nodes[nid] for nid in self.plan.order]
        results = await asyncio.gather(*(self._acquire(spec) for spec in specs),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._wire()
        reports = [self._stages[nid].report for nid in self.plan.order]
        self.outbox.force_put(SessionReady(self.session_id, reports))
        return reports

    async def _acquire(self, spec: NodeSpec) -> None:
        decision = spec.decision
        report = NodeReport.planned(spec)
        self.event(spec.node_id, "initializing",
                   f"initializing {spec.node_type} ({decision.runtime}: {decision.reason})")
        started = time.perf_counter()
        runtime = self._executor.runtime_for(spec, decision, report)
        try:
            instance = await runtime.acquire(spec, self.scope)
        except SandboxFailure as failure:
            retry = self._executor.selector.fallback(spec.node_id, spec.entry, decision, failure)
            if retry is None:
                raise
            runtime = self._executor.runtime_for(spec, retry, report)
            instance = await runtime.acquire(spec, self.scope)
        self._acquired.append((runtime, instance))
        if spec.entry.streaming and not instance.can_stream:
            raise RequestInvalid([Violation(
                f"nodes[{spec.node_id}]",
                f"node '{spec.node_id}' ({spec.node_type}) is a streaming node and the "
                f"{runtime.name} runtime cannot run streaming nodes")], "invalid manifest")
        elapsed = (time.perf_counter() - started) * 1000.0
        self.event(spec.node_id, "ready", f"initialized in {elapsed:.1f} ms", 1.0)
        capacity = self.queue_size
        self._stages[spec.node_id] = _Stage(
            spec, runtime, instance, Channel(capacity, self.buffer_bytes, self.stats), report)

    def _wire(self) -> None:
        limit = 4 * self.queue_size + 64
        for node_id in self.plan.order:
            stage = self._stages[node_id]
            spec = stage.spec
            upstream: set[str] = set()
            optional: list[str] = []
            fed_by_client = not spec.entry.inputs
            for port in spec.entry.inputs:
                sources = spec.wiring.get(port.name)
                if sources:
                    for source in sources:
                        slot = len(stage.slots)
                        stage.slots.append(Slot(port.name, port.many))
                        producer = self._stages[source.node_id]
                        producer.routes.setdefault(source.port, []).append((stage, slot))
                        if stage.inbox not in producer.consumers:
                            producer.consumers.append(stage.inbox)
                        upstream.add(source.node_id)
                    continue
                fed_by_client = True
                if port.required:
                    stage.external[port.name] = len(stage.slots)
                    stage.slots.append(Slot(port.name, port.many))
                else:
                    stage.external[port.name] = STICKY
                    optional.append(port.name)
            stage.producers = len(upstream) + (1 if fed_by_client else 0)
            if len(stage.slots) != 1 or optional:
                stage.join = Join(node_id, stage.slots, optional, limit)
            stage.inline = (stage.join is None and not spec.entry.streaming
                            and spec.timeout_s is None)
        for node_id, sink_port in self.plan.sinks:
            stage = self._stages[node_id]
            stage.sinks = stage.sinks | {sink_port}

    # --- input from the client ---

    async def send(self, sequence: int, node_id: str, port: str, value: Any) -> None:
        """Route one client chunk to its node (waits while the node's inbox is full)."""
        route = self._routes.get((node_id, port))
        if route is None:
            route = self._route(node_id, port)
        stage, slot, port_info = route
        if type(value) is np.ndarray and port_info.kind in _ARRAY_PORT_KINDS:
            # The commonest chunk, a plain array for a tensor (or any) port: nothing to unwrap
            # or to refuse.
            size = value.nbytes
        else:
            # As for a unary request: an "any" port receives the value with its metadata.
            value = value_for_port(port_info, value)
            problem = check_value_kind(port_info, node_id, value, "data")
            if problem is not None:
                raise RequestInvalid([problem], f"invalid chunk (sequence {sequence})")
            size = size_of(value)
        self.chunks_received += 1
        if stage.inline and stage.inbox.parked():
            await self._run_inline(stage, sequence, stage.accept(slot, sequence, value))
            return
        item = (slot, sequence, (port_info.name, value) if slot == STICKY else value)
        if not stage.inbox.try_put(item, size):
            await stage.inbox.put(item, size)

    def _route(self, node_id: str, port: str) -> tuple[_Stage, int, Any]:
        if self._input_ended:
            raise RequestInvalid([Violation("data", "data chunk after close")], "invalid chunk")
        port_info, problem = resolve_input_port(self.plan, node_id, port, "data")
        if port_info is None:
            assert problem is not None
            raise RequestInvalid([problem], "invalid chunk")
        stage = self._stages[node_id]
        route = (stage, stage.external[port_info.name], port_info)
        self._routes[(node_id, port)] = route
        return route

    def end_input(self) -> None:
        """The client closed its side: end of stream for every client-fed node."""
        if self._input_ended:
            return
        self._input_ended = True
        self._routes.clear()
        for stage in self._stages.values():
            if stage.external or not stage.spec.entry.inputs:
                stage.inbox.force_put((EOS, 0, None))

    # --- running ---

    async def run(self) -> None:
        """Run every stage until the stream ends; then queue the final metrics.

        The first stage failure cancels the others and propagates."""
        for node_id in self.plan.order:
            stage = self._stages[node_id]
            if stage.spec.entry.streaming:
                body = self._run_streaming
            elif stage.instance.batches and stage.spec.timeout_s is None:
                body = self._run_batched
            else:
                body = self._run_plain
            self._tasks.append(asyncio.ensure_future(body(stage)))
        pending: set[asyncio.Task[None]] = set(self._tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        for stage in self._stages.values():
            stage.report.wall_ms = stage.busy_s * 1000.0
        self.outbox.force_put(SessionClosed(
            reports=[self._stages[nid].report for nid in self.plan.order],
            total_ms=(time.perf_counter() - self._started) * 1000.0,
            chunks_received=self.chunks_received,
            results_sent=self.results_sent,
            max_buffered_items=self.stats.max_items,
            max_buffered_bytes=self.stats.max_bytes,
        ))

    def _sequenced(self, error: NodeFailed, sequence: int) -> NodeFailed:
        if error.sequence is not None:
            return error
        failed = NodeFailed(error.node_id, error.exc_type, error.detail, sequence)
        failed.__cause__ = error.__cause__
        return failed

    async def _emit(self, stage: _Stage, sequence: int, outputs: Mapping[str, Any]) -> None:
        for port, value in outputs.items():
            stage.report.outputs_produced += 1
            size = size_of(value)
            for consumer, slot in stage.routes.get(port, ()):
                channel = consumer.inbox
                if consumer.inline and channel.parked():
                    await self._run_inline(consumer, sequence,
                                           consumer.accept(slot, sequence, value))
                    continue
                item = (slot, sequence, value)
                if not channel.try_put(item, size):
                    await channel.put(item, size)
            if port in stage.sinks:
                result = StreamItem(sequence, stage.spec.node_id, port, value)
                self.results_sent += 1
                if not self.outbox.try_put(result, size):
                    await self.outbox.put(result, size)

    async def _run_inline(self, stage: _Stage, sequence: int,
                          inputs: dict[str, Any] | None) -> None:
        """Run ``stage``'s node on one input set in the calling (producer's) task; its own task
        is parked on its empty inbox. What cannot finish here goes to that task as a
        ``HANDOFF`` item: the rest of a node that suspended, or a failure to raise."""
        assert inputs is not None  # a single slot: every value is an input set
        stage.current = sequence
        started = time.perf_counter()
        awaitable = stage.instance.process(inputs)
        if type(awaitable) is not types.CoroutineType:
            stage.inbox.force_put((HANDOFF, sequence, Suspended(awaiting(awaitable), None,
                                                                 started)))
            return
        try:
            pending = awaitable.send(None)
        except StopIteration as stop:
            raw = stop.value
        except BaseException as error:  # the node's failure: raised by its own stage
            stage.inbox.force_put((HANDOFF, sequence, Suspended(raising(error), None,
                                                                 started)))
            return
        else:
            stage.inbox.force_put((HANDOFF, sequence, Suspended(awaitable, pending, started)))
            return
        try:
            outputs = normalize_outputs(stage.spec, raw)
        except NodeFailed:
            # Its stage normalizes again and raises, with the sequence, as for any failure.
            stage.inbox.force_put((HANDOFF, sequence, Suspended(returning(raw), None,
                                                                 started)))
            return
        stage.busy_s += time.perf_counter() - started
        stage.report.inputs_consumed += 1
        await self._emit(stage, sequence, outputs)

    def _finish(self, stage: _Stage) -> None:
        if stage.join is not None:
            leftover = stage.join.leftover()
            if leftover:
                self.event(stage.spec.node_id, "unjoined",
                           f"{leftover} input value(s) never met values of the same sequence "
                           "on the node's other inputs")
        for channel in stage.consumers:
            channel.force_put((EOS, 0, None))

    async def _accepted(self, stage: _Stage) -> AsyncIterator[tuple[int, Any]]:
        """The stage's input sets (joined by sequence) as they complete, until every producer
        has ended."""
        inbox = stage.inbox
        waiting = stage.producers
        while waiting:
            for slot, sequence, value in await inbox.get_batch():
                if slot == EOS:
                    waiting -= 1
                    continue
                if slot == HANDOFF:  # a node call its producer started (see _run_inline)
                    stage.current = sequence
                    yield sequence, value
                    continue
                inputs = stage.accept(slot, sequence, value)
                if inputs is None:
                    continue
                stage.current = sequence
                yield sequence, inputs

    async def _run_plain(self, stage: _Stage) -> None:
        spec = stage.spec
        instance = stage.instance
        timeout = spec.timeout_s
        async for sequence, inputs in self._accepted(stage):
            started = time.perf_counter()
            try:
                if type(inputs) is Suspended:
                    started = inputs.started
                    raw = await inputs
                elif timeout is None:
                    raw = await instance.process(inputs)
                else:
                    try:
                        async with asyncio.timeout(timeout):
                            raw = await instance.process(inputs)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"node '{spec.node_id}' exceeded its timeout of {timeout:g} s "
                            f"at sequence {sequence}") from None
                outputs = normalize_outputs(spec, raw)
            except (NodeFailed, SandboxFailure) as error:
                self._raise_at(error, sequence)
            stage.busy_s += time.perf_counter() - started
            stage.report.inputs_consumed += 1
            await self._emit(stage, sequence, outputs)
        self._finish(stage)

    async def _run_batched(self, stage: _Stage) -> None:
        """``_run_plain`` for a node whose instance runs several input sets per call
        (``NodeInstance.batches``: a one-shot node in the sandbox). The input sets that queued
        up while the node was busy go in one ``process_batch`` (up to ``BATCH_BYTES`` of
        values), so one round trip to a worker serves many chunks; order, outputs and failures
        are those of one call after another."""
        inbox = stage.inbox
        waiting = stage.producers
        while waiting:
            pending: list[tuple[int, Any]] = []
            pending_bytes = 0
            for (slot, sequence, value), size in await inbox.get_sized_batch():
                if slot == EOS:
                    waiting -= 1
                    continue
                if slot == HANDOFF or pending_bytes + size > BATCH_BYTES:
                    await self._run_sets(stage, pending)
                    pending, pending_bytes = [], 0
                if slot == HANDOFF:  # a call its producer started (see _run_inline)
                    await self._run_sets(stage, [(sequence, value)])
                    continue
                inputs = stage.accept(slot, sequence, value)
                if inputs is not None:
                    pending.append((sequence, inputs))
                    pending_bytes += size
            await self._run_sets(stage, pending)
        self._finish(stage)

    async def _run_sets(self, stage: _Stage, pending: list[tuple[int, Any]]) -> None:
        """Run the node on ``pending`` (sequence, input set) in order and emit the outputs; a
        lone ``Suspended`` is a call its producer started."""
        if not pending:
            return
        started = time.perf_counter()
        if len(pending) == 1:  # the usual lone chunk: a plain call, without the batch's frames
            try:
                item = pending[0][1]
                if type(item) is Suspended:
                    started = item.started
                    outcome = BatchOutcome([await item], None)
                else:
                    outcome = BatchOutcome([await stage.instance.process(item)], None)
            except Exception as error:
                outcome = BatchOutcome([], error)
        else:
            outcome = await stage.instance.process_batch([i for _, i in pending])
        stage.busy_s += time.perf_counter() - started
        for (sequence, _), raw in zip(pending, outcome.values, strict=False):
            stage.current = sequence
            try:
                outputs = normalize_outputs(stage.spec, raw)
            except NodeFailed as error:
                self._raise_at(error, sequence)
            stage.report.inputs_consumed += 1
            await self._emit(stage, sequence, outputs)
        failure = outcome.failure
        if failure is not None:
            ran = len(outcome.values)
            sequence = stage.current = pending[ran][0]
            if isinstance(failure, NodeFailed | SandboxFailure):
                self._raise_at(failure, sequence,
                               pending[min(ran + outcome.span, len(pending)) - 1][0])
            raise failure

    def _raise_at(self, error: NodeFailed | SandboxFailure, sequence: int,
                  last: int | None = None) -> NoReturn:
        """Raise a node's failure on input ``sequence`` (or on one of those up to ``last``:
        see ``BatchOutcome.span``), saying so; a sandbox failure gets no fallback mid-stream
        (the node's state would be lost)."""
        if isinstance(error, NodeFailed):
            raise self._sequenced(error, sequence) from error.__cause__
        where = (f"sequence {sequence}" if last is None or last == sequence
                 else f"one of sequences {sequence}-{last} (run as a batch)")
        raise SandboxFailure(error.node_id, error.cause,
                             during=f"{error.during} of {where}") from error

    async def _chunks(self, stage: _Stage) -> AsyncIterator[Chunk]:
        async for sequence, inputs in self._accepted(stage):
            stage.report.inputs_consumed += 1
            yield Chunk(sequence, inputs)
        stage.current = END_OF_STREAM

    async def _run_streaming(self, stage: _Stage) -> None:
        spec = stage.spec
        outputs = stage.instance.stream(self._chunks(stage))
        try:
            while True:
                started = time.perf_counter()
                try:
                    raw = await outputs.__anext__()
                except StopAsyncIteration:
                    break
                except NodeFailed as error:
                    raise self._sequenced(error, stage.current) from error.__cause__
                except SandboxFailure as error:
                    # A sandboxed generator's worker died or hit a limit: say where.
                    raise SandboxFailure(
                        error.node_id, error.cause,
                        during=f"{error.during} of sequence {stage.current}") from error
                # Includes time spent waiting for input: a streaming node's wall time is the
                # time it was running or waiting inside its generator.
                stage.busy_s += time.perf_counter() - started
                if isinstance(raw, Emit):
                    sequence, raw = raw.sequence, raw.value
                else:
                    sequence = stage.current
                try:
                    produced = normalize_outputs(spec, raw, partial=True)
                except NodeFailed as error:
                    raise self._sequenced(error, sequence) from None
                await self._emit(stage, sequence, produced)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
        self._finish(stage)

    # --- ending ---

    def reports(self) -> list[NodeReport]:
        """What each initialized node did so far (runtime, counts, wall time)."""
        for stage in self._stages.values():
            stage.report.wall_ms = stage.busy_s * 1000.0
        return [self._stages[nid].report for nid in self.plan.order if nid in self._stages]

    async def stop_nodes(self) -> None:
        """Stop every stage at once (nothing more reaches the outbox) and drop what their
        inboxes hold, so a sender waiting for room returns; nodes stay acquired."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        abandoned = []
        for stage in self._stages.values():
            # Node calls started by a producer and not reached by their stopped stage are
            # cancelled as a running call would have been.
            abandoned += [value.abandon() for slot, _, value in stage.inbox.peek()
                          if slot == HANDOFF]
            stage.inbox.close()
        if abandoned:
            await asyncio.gather(*abandoned, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop at once and release every node (its cleanup runs); idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.stop_nodes()
        acquired, self._acquired = self._acquired, []
        for runtime, instance in acquired:
            try:
                await runtime.release(instance)
            except Exception as exc:  # cleanup problems never mask the session's outcome
                self.event(instance.spec.node_id, "cleanup_failed", str(exc))


class StreamingExecutor:
    """Opens streaming sessions over compiled plans."""

    def __init__(self, runtimes: Mapping[str, Runtime], selector: Selector) -> None:
        self._runtimes = runtimes
        self.selector = selector

    def runtime_for(self, spec: NodeSpec, decision: RuntimeDecision,
                    report: NodeReport) -> Runtime:
        """The runtime for ``decision`` (see ``runtime_for``); ``report`` says where it runs."""
        return runtime_for(self._runtimes, self.selector, spec, decision, report)

    def open(self, plan: ExecutionPlan, scope: ExecutionScope | None = None, *,
             queue_size: int = 0, buffer_bytes: int = 0) -> StreamSession:
        scope = scope or ExecutionScope(execution_id=uuid.uuid4().hex)
        return StreamSession(self, plan, scope, queue_size or DEFAULT_QUEUE_SIZE,
                             buffer_bytes if buffer_bytes > 0 else DEFAULT_BUFFER_BYTES)
