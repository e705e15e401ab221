"""The StreamPipeline handler: one bidirectional call = one streaming session.

Protocol: the first client message is ``init`` (manifest + options); the manifest is compiled
with the engine's ``plan_for`` (same validation and details as ExecutePipeline), every node is
initialized (StreamEvents report progress) and ``ready`` carries the session id. Then three
tasks run until the session ends:

* the reader decodes client messages (zero-copy) and routes data chunks into the session, waiting
  while the first node is full, so gRPC flow control slows the client;
* the session runs the nodes (``StreamSession.run``);
* the writer drains the session's outbox into responses, coalescing results that are ready
  together into one ``StreamResults`` message.

Endings: close (``close`` message or half-close) drains, flushes and ends with ``closed``
(metrics) and OK; ``cancel`` stops at once and ends with CANCELLED; a disconnect cancels this
handler; the deadline ends it with DEADLINE_EXCEEDED; a node error with the node's status (node
and sequence in the details). Every node is released (cleanup) before the status goes out.
Errors become statuses only through ``_status.translate_errors``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc

from tensorline.client._codec import (
    DecodedStreamRequest,
    StreamItem,
    encode_stream_results,
)
from tensorline.server._errors import (
    DeadlineExceeded,
    RequestInvalid,
    SessionCancelled,
    Violation,
)
from tensorline.server._settings import Settings
from tensorline.server.executor import (
    NodeReport,
    PipelineEngine,
    SessionClosed,
    SessionEvent,
    SessionReady,
    StreamSession,
)
from tensorline.server.executor._streaming import size_of
from tensorline.server.service._service import scope_for
from tensorline.server.service._status import translate_errors
from tensorline.v1 import tensorline_pb2 as pb

Context = Any  # grpc.aio.ServicerContext

# Results larger than this go out alone: coalescing only pays for small messages, and a batch of
# large tensors could exceed the message size limit.
COALESCE_BYTES = 256 * 1024
COALESCE_COUNT = 64


def stream_node_metrics(report: NodeReport) -> pb.NodeMetrics:
    return pb.NodeMetrics(node_id=report.node_id, node_type=report.node_type,
                          runtime=report.runtime, selection_reason=report.reason,
                          wall_ms=report.wall_ms, fallback=report.fallback,
                          inputs_consumed=report.inputs_consumed,
                          outputs_produced=report.outputs_produced)


def _control(item: Any, plan_cached: bool) -> bytes:
    if isinstance(item, SessionEvent):
        response = pb.StreamResponse(event=pb.StreamEvent(
            node_id=item.node_id, kind=item.kind, message=item.message, progress=item.progress))
    elif isinstance(item, SessionReady):
        response = pb.StreamResponse(ready=pb.StreamReady(
            session_id=item.session_id, nodes=[stream_node_metrics(r) for r in item.reports]))
    else:
        assert isinstance(item, SessionClosed)
        response = pb.StreamResponse(closed=pb.StreamClosed(
            metrics=pb.ExecutionMetrics(total_ms=item.total_ms,
                                        nodes=[stream_node_metrics(r) for r in item.reports],
                                        plan_cached=plan_cached),
            chunks_received=item.chunks_received, results_sent=item.results_sent,
            max_buffered_items=item.max_buffered_items,
            max_buffered_bytes=item.max_buffered_bytes))
    return response.SerializeToString()


async def _write(session: StreamSession, context: Context, plan_cached: bool) -> None:
    """Drain the outbox into responses until the closing message has gone out."""
    results: list[StreamItem] = []
    while True:
        for item in await session.outbox.get_batch():
            if type(item) is StreamItem:
                if size_of(item.value) > COALESCE_BYTES:
                    if results:
                        await context.write(encode_stream_results(results))
                        results = []
                    await context.write(encode_stream_results([item]))
                    continue
                results.append(item)
                if len(results) >= COALESCE_COUNT:
                    await context.write(encode_stream_results(results))
                    results = []
                continue
            if results:
                await context.write(encode_stream_results(results))
                results = []
            await context.write(_control(item, plan_cached))
            if isinstance(item, SessionClosed):
                return
        if results:
            await context.write(encode_stream_results(results))
            results = []


def _invalid(request: DecodedStreamRequest) -> RequestInvalid:
    return RequestInvalid(request.violations, "invalid stream message")


async def _read(session: StreamSession, context: Context) -> str:
    """Feed client chunks into the session; returns "close" or "cancel:<reason>"."""
    while True:
        request: Any = await context.read()
        if request is grpc.aio.EOF:
            session.end_input()
            return "close"
        if request.violations:
            raise _invalid(request)
        kind = request.kind
        if kind == "data":
            chunk = request.chunk
            item = chunk.item
            await session.send(chunk.sequence, item.node_id, item.port, item.value)
        elif kind == "close":
            session.end_input()
            return "close"
        elif kind == "cancel":
            return "cancel:" + str(request.cancel_reason)
        else:
            raise RequestInvalid([Violation("init", "a second init message in one session")],
                                 "invalid stream message")


class StreamHandler:
    def __init__(self, engine: PipelineEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    @translate_errors
    async def stream_pipeline(self, requests: Any, context: Context) -> None:
        first: Any = await context.read()
        if first is grpc.aio.EOF:
            raise RequestInvalid([Violation("init", "the stream ended before its init message")],
                                 "invalid stream")
        if first.violations:
            raise _invalid(first)
        if first.kind != "init" or first.init is None:
            raise RequestInvalid([Violation("init", f"the first message must be init, got "
                                                    f"{first.kind}")], "invalid stream")
        lookup = self.engine.plan_for(first.init.manifest_json)
        scope = scope_for(context, uuid.uuid4().hex)
        session = self.engine.streaming.open(
            lookup.plan, scope,
            queue_size=first.init.queue_size or self.settings.stream_queue_size,
            buffer_bytes=self.settings.stream_buffer_bytes)
        tasks: list[asyncio.Task[Any]] = []
        try:
            async with asyncio.timeout_at(scope.deadline):
                writer = asyncio.ensure_future(_write(session, context, lookup.cached))
                tasks.append(writer)
                starting = asyncio.ensure_future(session.start())
                tasks.append(starting)
                # The writer can only fail (client gone); watch it while nodes initialize.
                await asyncio.wait({starting, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer.done():
                    writer.result()
                starting.result()
                runner = asyncio.ensure_future(session.run())
                reader = asyncio.ensure_future(_read(session, context))
                tasks += [runner, reader]
                pending = {runner, reader, writer}
                while not writer.done():
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()  # raises the task's error
                        if task is reader and reader.result().startswith("cancel:"):
                            reason = reader.result()[len("cancel:"):]
                            raise SessionCancelled("stream cancelled by the client"
                                                   + (f": {reason}" if reason else ""))
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded during the stream session") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.aclose()
