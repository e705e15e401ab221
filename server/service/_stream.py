"""The StreamPipeline handler: one bidirectional call = one streaming session.

Protocol: the first client message is ``init`` (manifest + options); the manifest is compiled
with the engine's ``plan_for`` (same validation and details as ExecutePipeline), or the named
pipeline it gives is leased from the repository for the whole session; every node is
initialized (StreamEvents report progress) and ``ready`` carries the session id. Then three
tasks run until the session ends:

* the reader decodes client messages (zero-copy) and routes data chunks into the session, waiting
  while the first node is full, so gRPC flow control slows the client;
* the session runs the nodes (``StreamSession.run``);
* the writer drains the session's outbox into responses, coalescing results that are ready
  together into one ``StreamResults`` message. When the reader had to wait for a chunk (the
  client is not ahead: ``DIRECT_WRITE_AFTER_S``) while no other session's chunk came in, the
  writer is idle (parked on an empty outbox) and the chunk's results are ready by the time the
  reader has handed it to the session (its nodes ran in the reader's task: see the executor),
  the reader writes them itself, as a
  plain echo would: the writer's wake-up per chunk is saved. Writes never overlap (one lock),
  and they stay in order: the reader only takes what the parked writer would have taken next.

Endings: close (``close`` message or half-close) drains, flushes and ends with ``closed``
(metrics) and OK; ``cancel`` stops at once and ends with CANCELLED; a disconnect cancels this
handler; the deadline ends it with DEADLINE_EXCEEDED; a node error with the node's status (node
and sequence in the details). After a failure the results already produced are written first;
after Ready the status is also sent as a ``StreamError`` message and chunks still arriving are
discarded until the client half-closes (at most ``ERROR_GRACE_S``), because a client write that
races the final status fails locally as INTERNAL and would hide it. Every node is released
(cleanup) before the status goes out. Errors become statuses only through ``_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import grpc

from tensorline.server._errors import (
    DeadlineExceeded,
    NodeFailed,
    RequestInvalid,
    SessionCancelled,
    TensorlineServerError,
    Violation,
)
from tensorline.server._settings import Settings
from tensorline.server.executor import (
    PipelineEngine,
    SessionClosed,
    SessionEvent,
    SessionReady,
    StreamSession,
)
from tensorline.server.manifest import ExecutionPlan
from tensorline.server.repository import PipelineRepository
from tensorline.server.service._admission import Admission
from tensorline.server.service._pipelines import named_version
from tensorline.server.service._service import scope_for
from tensorline.server.service._status import await_first_message, to_status, translate_errors
from tensorline.server.service._telemetry import Telemetry
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    DecodedStreamRequest,
    StreamItem,
    encode_stream_results,
    node_metrics,
)

Context = Any  # grpc.aio.ServicerContext

# Results larger than this go out alone: coalescing only pays for small messages, and a batch of
# large tensors could exceed the message size limit.
COALESCE_BYTES = 256 * 1024
COALESCE_COUNT = 64
# The reader writes results itself (see the module docstring) only after a read that waited
# this long for the client: then nothing was queued behind that chunk (a client waiting for each
# result, or sending slower than the server runs), and writing at once saves the writer's
# wake-up. A read that returns sooner had more chunks queued behind it: the reader keeps
# reading and the writer, running alongside, coalesces results into fewer messages (measured on
# 2 cores: always writing from the reader cut 1-stream throughput by a third). Not when another
# session's chunk came in less than this before (``_Reads``): then the read waited for the loop,
# busy with other streams, rather than for this client, and readers that write each result
# themselves (a message each, waiting for each write) lose the writer's coalescing, which
# counts most when many streams share the loop (bench/bench_stream.py --against,
# docs/performance.md).
DIRECT_WRITE_AFTER_S = 100e-6

# Largest per-node queue a client may ask for in its init message.
MAX_QUEUE_SIZE = 1024
# After a failure, how long the client gets to stop sending before the call ends anyway.
ERROR_GRACE_S = 5.0
# After the final message of a session the client closed, how long the call waits for the
# client's half-close before ending. Trailers that overtake the half-close make grpc reset the
# stream (RST_STREAM NO_ERROR, RFC 9113 8.1), which HAProxy passes on to the client as CANCEL
# (haproxy/haproxy#1219): a stream that completed would fail at the client. Our client
# half-closes right after its close message, so this is one round trip in practice.
HALF_CLOSE_GRACE_S = 2.0


class _Reads:
    """When the last chunk of any session was read, and by which session's reader: whether the
    loop is serving other streams right now."""

    __slots__ = ("at", "by")

    def __init__(self) -> None:
        self.at = 0.0
        self.by: object = None

    def after_other(self, now: float, reader: object) -> bool:
        """Record a chunk read by ``reader`` at ``now``: True when another reader's chunk came
        in less than ``DIRECT_WRITE_AFTER_S`` before."""
        other = self.by is not reader and now - self.at < DIRECT_WRITE_AFTER_S
        self.at, self.by = now, reader
        return other


def _control(item: Any, plan_cached: bool) -> bytes:
    if isinstance(item, SessionEvent):
        response = pb.StreamResponse(event=pb.StreamEvent(
            node_id=item.node_id, kind=item.kind, message=item.message, progress=item.progress))
    elif isinstance(item, SessionReady):
        response = pb.StreamResponse(ready=pb.StreamReady(
            session_id=item.session_id, nodes=[node_metrics(r) for r in item.reports]))
    else:
        assert isinstance(item, SessionClosed)
        response = pb.StreamResponse(closed=pb.StreamClosed(
            metrics=pb.ExecutionMetrics(total_ms=item.total_ms,
                                        nodes=[node_metrics(r) for r in item.reports],
                                        plan_cached=plan_cached),
            chunks_received=item.chunks_received, results_sent=item.results_sent,
            max_buffered_items=item.max_buffered_items,
            max_buffered_bytes=item.max_buffered_bytes))
    return response.SerializeToString()


# Outbox marker: everything queued before it has been written; the writer ends.
_DRAIN: Any = object()


def _framed(items: list[tuple[StreamItem, int]]) -> list[bytes]:
    """Results (each with the size the session queued it with) as messages, coalesced as the
    writer does (see COALESCE_BYTES/COUNT)."""
    out: list[bytes] = []
    results: list[StreamItem] = []
    for item, size in items:
        if size > COALESCE_BYTES:
            if results:
                out.append(encode_stream_results(results))
                results = []
            out.append(encode_stream_results([item]))
            continue
        results.append(item)
        if len(results) >= COALESCE_COUNT:
            out.append(encode_stream_results(results))
            results = []
    if results:
        out.append(encode_stream_results(results))
    return out


class _Writer:
    """Drains the outbox into responses until the closing message has gone out.

    It is never cancelled in the middle of a write: grpc would still have that message in
    flight and refuse the error status sent after it (TOO_MANY_OPERATIONS). ``stop`` lets a
    write in progress finish, then ends the loop."""

    def __init__(self, session: StreamSession, context: Context, plan_cached: bool,
                 reads: _Reads) -> None:
        self._session = session
        # Every session's reads (see DIRECT_WRITE_AFTER_S).
        self.reads = reads
        self._context = context
        self._plan_cached = plan_cached
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        # Set when the session ends: the reader no longer writes (see ``quiesce``).
        self.closing = False
        self._final: bytes | None = None
        # One write at a time (grpc refuses overlapping writes), the writer's or the reader's.
        self._lock = asyncio.Lock()

    async def _send(self, data: bytes) -> None:
        if self._stopping:
            raise asyncio.CancelledError
        async with self._lock:
            self._idle.clear()
            try:
                await self._context.write(data)
            finally:
                self._idle.set()

    async def write_from_reader(self, items: list[tuple[StreamItem, int]]) -> None:
        """Write results the reader took from the outbox while the writer was parked."""
        if self._stopping or self.closing:
            return  # the session is ending: as if the writer had been stopped first
        for data in _framed(items):
            await self._send(data)

    async def quiesce(self, grace: float) -> None:
        """No more writes by the reader; wait (bounded) for one in progress, so that the reader
        can be cancelled without cutting a write short."""
        self.closing = True
        if not self._idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    async def stop(self, task: asyncio.Task[None], *, drain: bool = False,
                   final: bytes | None = None, grace: float = 2.0) -> None:
        """End the writer; with ``drain``, after it wrote everything queued so far and then
        ``final``."""
        self._final = final
        if drain and not task.done():
            self._session.outbox.force_put(_DRAIN)
            # A client that stopped reading can hold a write forever: bounded wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), grace)
        self._stopping = True
        if not task.done() and not self._idle.is_set():
            # A client that stopped reading can hold a write forever: bounded wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        results: list[StreamItem] = []
        send = self._send
        outbox = self._session.outbox
        while True:
            # The session sized each result when it queued it.
            for item, size in await outbox.get_sized_batch():
                if type(item) is StreamItem:
                    if size > COALESCE_BYTES:
                        if results:
                            await send(encode_stream_results(results))
                            results = []
                        await send(encode_stream_results([item]))
                        continue
                    results.append(item)
                    if len(results) >= COALESCE_COUNT:
                        await send(encode_stream_results(results))
                        results = []
                    continue
                if results:
                    await send(encode_stream_results(results))
                    results = []
                if item is _DRAIN:
                    if self._final is not None:
                        await send(self._final)
                    return
                await send(_control(item, self._plan_cached))
                if isinstance(item, SessionClosed):
                    return
            if results:
                await send(encode_stream_results(results))
                results = []


def _invalid(request: DecodedStreamRequest) -> RequestInvalid:
    return RequestInvalid(request.violations, "invalid stream message")


async def _read(session: StreamSession, context: Context,
                client_closed: asyncio.Event | None = None,
                writing: _Writer | None = None) -> str:
    """Feed client chunks into the session; returns "close" or "cancel:<reason>".
    ``client_closed`` is set on the client's close message. With ``writing``, results ready
    when a chunk is handed over while the writer is parked are written here (module docs)."""
    outbox = session.outbox
    clock = time.perf_counter
    while True:
        started = clock()
        request: Any = await context.read()
        read_at = clock()
        waited = read_at - started > DIRECT_WRITE_AFTER_S
        if request is grpc.aio.EOF:
            session.end_input()
            return "close"
        if request.violations:
            raise _invalid(request)
        kind = request.kind
        if kind == "data":
            chunk = request.chunk
            item = chunk.item
            # Every chunk is recorded (``after_other``), whether or not it waited.
            if (writing is None or writing.reads.after_other(read_at, writing) or not waited
                    or writing.closing or not outbox.parked()):
                await session.send(chunk.sequence, item.node_id, item.port, item.value)
                continue
            outbox.hold()
            taken: list[tuple[Any, int]] = []
            try:
                await session.send(chunk.sequence, item.node_id, item.port, item.value)
            finally:
                taken = outbox.take_held()
                if taken and not all(type(t) is StreamItem for t, _ in taken):
                    # Events or the end of the session among them: the writer's to handle.
                    for value, _ in taken:
                        outbox.force_put(value)
                    taken = []
            if taken:
                await writing.write_from_reader(taken)
        elif kind == "close":
            session.end_input()
            if client_closed is not None:
                client_closed.set()
            # On to the half-close (see HALF_CLOSE_GRACE_S); nothing may follow a close.
            while await context.read() is not grpc.aio.EOF:
                pass
            return "close"
        elif kind == "cancel":
            return "cancel:" + str(request.cancel_reason)
        else:
            raise RequestInvalid([Violation("init", "a second init message in one session")],
                                 "invalid stream message")


_CLEANUPS: set[asyncio.Task[None]] = set()


async def _cleanup(session: StreamSession, tasks: list[asyncio.Task[Any]], writing: _Writer,
                   writer: asyncio.Task[None], reader: asyncio.Task[str] | None,
                   error: TensorlineServerError | None, context: Context) -> None:
    """Stop everything and release the nodes. After a failure (``error``), what was produced
    before it is written first; after Ready, the status goes out as a StreamError message too,
    and the client gets a grace period to stop sending (see the proto)."""
    # The reader may be writing results itself: let that write finish before cancelling it.
    await writing.quiesce(2.0)
    for task in tasks:
        if task is not reader or error is None:
            task.cancel()
    await asyncio.gather(*(t for t in tasks if t is not reader or error is None),
                         return_exceptions=True)
    if error is None:
        await writing.stop(writer)
        await session.aclose()
        return
    # Stop the nodes; closing their inboxes also releases a reader waiting for room.
    await session.stop_nodes()
    final = None
    if reader is not None:
        final = pb.StreamResponse(error=pb.StreamError(
            status=to_status(error).SerializeToString())).SerializeToString()
    await writing.stop(writer, drain=True, final=final)
    if reader is not None:
        # The reader now discards chunks; it ends when the client half-closes or cancels.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), ERROR_GRACE_S)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    await session.aclose()


class StreamHandler:
    def __init__(self, engine: PipelineEngine, settings: Settings, admission: Admission,
                 telemetry: Telemetry | None = None,
                 repository: PipelineRepository | None = None) -> None:
        self.engine = engine
        self.repository = repository
        self.settings = settings
        self.admission = admission
        # Read by translate_errors (request counts and latencies by status).
        self.telemetry = telemetry
        self.reads = _Reads()

    @translate_errors("StreamPipeline")
    async def stream_pipeline(self, requests: Any, context: Context) -> None:
        admitted = False
        try:
            with self.admission.stream():
                admitted = True
                await self._session(context)
        except TensorlineServerError:
            if not admitted:  # shed or draining: refused before its init was read
                await await_first_message(context)
            raise

    async def _session(self, context: Context) -> None:
        first: Any = await context.read()
        if first is grpc.aio.EOF:
            raise RequestInvalid([Violation("init", "the stream ended before its init message")],
                                 "invalid stream")
        if first.violations:
            raise _invalid(first)
        if first.kind != "init" or first.init is None:
            raise RequestInvalid([Violation("init", f"the first message must be init, got "
                                                    f"{first.kind}")], "invalid stream")
        init = first.init
        named = named_version(init.manifest_json, init.pipeline, init.pipeline_version,
                              self.repository, prefix="init.")
        if named is None:
            lookup = self.engine.plan_for(init.manifest_json)
            await self._run(context, init, lookup.plan, lookup.cached)
            return
        # Held for the whole session: a version replaced or unloaded meanwhile serves it to
        # the end.
        with named.repository.lease(named.name, named.version) as pipeline:
            await self._run(context, init, pipeline.plan, True)

    async def _run(self, context: Context, init: pb.StreamInit, plan: ExecutionPlan,
                   plan_cached: bool) -> None:
        scope = scope_for(context, uuid.uuid4().hex)
        session = self.engine.streaming.open(
            plan, scope,
            # A client may ask for smaller or larger buffers, within a server cap.
            queue_size=min(init.queue_size, MAX_QUEUE_SIZE)
            or self.settings.stream_queue_size,
            buffer_bytes=self.settings.stream_buffer_bytes)
        tasks: list[asyncio.Task[Any]] = []
        writing = _Writer(session, context, plan_cached, self.reads)
        writer = asyncio.ensure_future(writing.run())
        reader: asyncio.Task[str] | None = None
        failure: TensorlineServerError | None = None
        try:
            async with asyncio.timeout_at(scope.deadline):
                starting = asyncio.ensure_future(session.start())
                tasks.append(starting)
                # The writer can only fail (client gone); watch it while nodes initialize.
                await asyncio.wait({starting, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer.done():
                    writer.result()
                starting.result()
                runner = asyncio.ensure_future(session.run())
                client_closed = asyncio.Event()
                reader = asyncio.ensure_future(_read(session, context, client_closed, writing))
                tasks += [runner, reader]
                pending: set[asyncio.Task[Any]] = {runner, reader, writer}
                while not writer.done():
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # raises the task's error
                        if task is reader and reader.result().startswith("cancel:"):
                            reason = reader.result()[len("cancel:"):]
                            raise SessionCancelled("stream cancelled by the client"
                                                   + (f": {reason}" if reason else ""))
                if client_closed.is_set() and not reader.done():
                    await asyncio.wait({reader}, timeout=HALF_CLOSE_GRACE_S)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded during the stream session") from None
        except (SessionCancelled, DeadlineExceeded):
            raise
        except TensorlineServerError as error:
            failure = error
            raise
        finally:
            if reader is not None and reader.done():
                reader = None  # it ended (its own error, close or cancel): nothing to drain
            # Shielded: grpc may cancel this handler again (deadline, disconnect) while it
            # cleans up, and every node must still be released.
            cleanup = asyncio.ensure_future(_cleanup(session, tasks, writing, writer, reader,
                                                     failure, context))
            _CLEANUPS.add(cleanup)
            cleanup.add_done_callback(_CLEANUPS.discard)
            if self.telemetry is not None:
                for report in session.reports():
                    self.telemetry.observe_node(report, failed=isinstance(failure, NodeFailed)
                                                and failure.node_id == report.node_id)
            await asyncio.shield(cleanup)
