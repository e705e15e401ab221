"""ModelStreamInfer: the Open Inference Protocol's bidirectional stream (Triton's
``start_stream`` / ``async_stream_infer``).

A stream's requests are handled in the order they arrive. What a request gets back depends on
its model:

* a pipeline without streaming nodes answers each request with exactly one response (its outputs,
  or its error in ``error_message``, as Triton reports errors on a stream), in request order;
* a pipeline with a streaming node is a *decoupled* model (Triton's word for a model that sends
  any number of responses per request): the stream's requests to it feed one streaming session,
  opened on its first request and held for the stream's life, each request's tensors one chunk.
  Every result the session produces goes back as soon as it is ready, as a response carrying
  that one output and the id of the request it came from: none for a request a node is still
  accumulating, several for one that completes several windows. When the client ends the stream
  (``stop_stream``), the sessions' end-of-stream results (a flush) follow, with the id of the
  last request, and then the call ends. A session that fails reports the error in
  ``error_message`` and ends; the model's next request opens a new one.

Every response is written by one writer task (grpc allows one write at a time), in the order
they were produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from tensorline.oip.v2 import inference_pb2 as pb
from tensorline.server._errors import (
    NodeFailed,
    RequestInvalid,
    TensorlineServerError,
    Violation,
    clip,
)
from tensorline.server._logging import request_id_var
from tensorline.server.executor import SessionClosed, StreamSession
from tensorline.server.repository import LoadedPipeline
from tensorline.server.service._service import scope_for
from tensorline.server.service._status import abort, request_id_of, status_code_of
from tensorline.server.service._v2tensors import OutputNotEncodable, encode_output
from tensorline.wire import StreamItem

if TYPE_CHECKING:
    from tensorline.server.service._inference import InferenceService

log = logging.getLogger(__name__)

Context = Any  # grpc.aio.ServicerContext


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Request bytes that do not parse as the method's message (INVALID_ARGUMENT)."""

    why: str


def parser(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer for ``message`` (a generated class) that never raises: bytes
    that do not parse become a ``MalformedRequest`` the handler refuses."""
    name = f"inference.{message.DESCRIPTOR.name}"

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return MalformedRequest(f"the request is not a valid {name} message")

    return parse


def is_decoupled(pipeline: LoadedPipeline) -> bool:
    """Whether a pipeline runs as a streaming session (it has a streaming node)."""
    return any(spec.entry.streaming for spec in pipeline.plan.nodes.values())


def error_response(request: pb.ModelInferRequest | None, error: BaseException,
                   model: str = "", request_id: str = "") -> pb.ModelStreamInferResponse:
    """A failure on the stream, as Triton reports it: ``error_message`` (with the status code a
    unary call would have had) and the request's model and id echoed."""
    if isinstance(error, TensorlineServerError):
        log.info("ModelStreamInfer: %s", clip(error.message, 500))
        message = f"[{status_code_of(error).name}] {error.message}"
    else:
        log.error("ModelStreamInfer: internal error", exc_info=error)
        message = "[INTERNAL] internal server error (see server log)"
    echo = pb.ModelInferResponse(model_name=model, id=request_id)
    if request is not None:
        echo = pb.ModelInferResponse(model_name=request.model_name,
                                     model_version=request.model_version, id=request.id)
    return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


@dataclass
class _Decoupled:
    """One streaming session of a decoupled model, for the stream's life."""

    pipeline: LoadedPipeline
    session: StreamSession
    # Holds the repository's lease on the pipeline's version while the session lives.
    lease: contextlib.ExitStack
    # Request id per chunk sequence, for the responses its results go out in.
    ids: dict[int, str] = field(default_factory=dict)
    sequence: int = 0
    last_id: str = ""
    runner: asyncio.Task[None] | None = None
    pump: asyncio.Task[None] | None = None


class InferStream:
    """One ModelStreamInfer call."""

    def __init__(self, service: InferenceService, context: Context) -> None:
        self.service = service
        self.context = context
        # Bounded: a client that stops reading stops the sessions' results, then the reading of
        # its requests (gRPC flow control), instead of growing this queue.
        self._out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue(
            max(1, service.settings.stream_queue_size))
        self._sessions: dict[tuple[str, int], _Decoupled] = {}

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write())
        try:
            while True:
                request: Any = await self.context.read()
                if request is grpc.aio.EOF:
                    break
                if not isinstance(request, MalformedRequest):
                    request_id_var.set(request.id or request_id_of(self.context))
                await self._handle(request)
            for key in list(self._sessions):
                await self._finish(key)
        finally:
            for key in list(self._sessions):
                await self._close(key)
            try:
                if not writer.done():
                    await self._out.put(None)
                await writer
            finally:
                writer.cancel()

    async def _write(self) -> None:
        while (response := await self._out.get()) is not None:
            await self.context.write(response)

    async def _handle(self, request: pb.ModelInferRequest | MalformedRequest) -> None:
        if isinstance(request, MalformedRequest):
            await self._out.put(error_response(
                None, RequestInvalid([Violation("request", request.why)], "malformed request")))
            return
        try:
            with self.service.pipeline(request.model_name,
                                       self.service.version_of(request.model_version)) as pipeline:
                decoupled = is_decoupled(pipeline)
            if not decoupled:
                response, raws = await self.service.infer(request, self.context)
                response.raw_output_contents.extend(bytes(raw) for raw in raws)
                await self._out.put(pb.ModelStreamInferResponse(infer_response=response))
                return
            await self._feed(request)
        except Exception as error:
            await self._out.put(error_response(request, error))

    async def _feed(self, request: pb.ModelInferRequest) -> None:
        """One request of a decoupled model: one chunk into its session."""
        lease = contextlib.ExitStack()
        try:
            pipeline = lease.enter_context(self.service.pipeline(
                request.model_name, self.service.version_of(request.model_version)))
        except BaseException:
            lease.close()
            raise
        key = (pipeline.name, pipeline.version)
        current = self._sessions.get(key)
        if current is None:
            current = await self._open(pipeline, lease)
        else:
            lease.close()  # the session's own lease covers this version
        items = self.service.inputs_of(request, current.pipeline)
        sequence = current.sequence
        current.sequence += 1
        current.ids[sequence] = current.last_id = request.id
        for item in items:
            await current.session.send(sequence, item.node_id, item.port, item.value)

    async def _open(self, pipeline: LoadedPipeline, lease: contextlib.ExitStack) -> _Decoupled:
        settings = self.service.settings
        session = self.service.engine.streaming.open(
            pipeline.plan, scope_for(self.context, f"oip-stream-{uuid.uuid4().hex}"),
            queue_size=settings.stream_queue_size, buffer_bytes=settings.stream_buffer_bytes)
        try:
            await session.start()
        except BaseException:
            await session.aclose()
            lease.close()
            raise
        current = _Decoupled(pipeline, session, lease)
        key = (pipeline.name, pipeline.version)
        self._sessions[key] = current
        current.runner = asyncio.ensure_future(session.run())
        current.pump = asyncio.ensure_future(self._pump(key, current))
        return current

    def _response(self, current: _Decoupled, item: StreamItem) -> pb.ModelStreamInferResponse:
        pipeline = current.pipeline
        port = next(p for p in pipeline.outputs
                    if (p.node_id, p.port) == (item.node_id, item.port))
        request_id = current.ids.pop(item.sequence, current.last_id)
        try:
            tensor, raw = encode_output(port.name, item.value, port.datatype, port.shape)
        except OutputNotEncodable as exc:
            return error_response(None, self.service.not_encodable(pipeline, port, exc),
                                  pipeline.name, request_id)
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name=pipeline.name, model_version=str(pipeline.version), id=request_id,
            outputs=[tensor], raw_output_contents=[bytes(raw)]))

    async def _pump(self, key: tuple[str, int], current: _Decoupled) -> None:
        """Results of one session -> responses, until it closes or fails."""
        runner = current.runner
        assert runner is not None
        outbox = current.session.outbox
        while True:
            if runner.done():
                error = None if runner.cancelled() else runner.exception()
                if error is not None:
                    # What was produced before the failure goes first.
                    while len(outbox):
                        await self._send_results(current, await outbox.get_batch())
                    await self._fail(key, current, error)
                    return
                # A clean end: SessionClosed follows the last results.
                batch = await outbox.get_batch()
            else:
                getting = asyncio.ensure_future(outbox.get_batch())
                await asyncio.wait({getting, runner}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    await asyncio.gather(getting, return_exceptions=True)
                    continue
                batch = getting.result()
            if await self._send_results(current, batch):
                return

    async def _send_results(self, current: _Decoupled, batch: list[Any]) -> bool:
        """Queue a batch of the outbox's results; True once the session has closed."""
        for item in batch:
            if type(item) is StreamItem:
                await self._out.put(self._response(current, item))
            elif isinstance(item, SessionClosed):
                return True
        return False

    async def _fail(self, key: tuple[str, int], current: _Decoupled,
              error: BaseException | None) -> None:
        assert error is not None
        await self._out.put(error_response(None, error, current.pipeline.name,
                                            current.last_id))
        if self._sessions.get(key) is current:
            del self._sessions[key]
            task = asyncio.ensure_future(self._release(current, error))
            _RELEASES.add(task)
            task.add_done_callback(_RELEASES.discard)

    async def _finish(self, key: tuple[str, int]) -> None:
        """The client ended the stream: end the session's input and let its last results
        (the end-of-stream flush) go out."""
        current = self._sessions.get(key)
        if current is None:
            return
        current.session.end_input()
        if current.pump is not None:
            await asyncio.gather(current.pump, return_exceptions=True)

    async def _close(self, key: tuple[str, int]) -> None:
        current = self._sessions.pop(key, None)
        if current is not None:
            await self._release(current, None)

    async def _release(self, current: _Decoupled, error: BaseException | None) -> None:
        for task in (current.pump, current.runner):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (current.pump, current.runner) if t is not None),
                             return_exceptions=True)
        try:
            await current.session.aclose()
        finally:
            current.lease.close()
            telemetry = self.service.telemetry
            if telemetry is not None:
                for report in current.session.reports():
                    telemetry.observe_node(report, failed=isinstance(error, NodeFailed)
                                           and error.node_id == report.node_id)


# Releases of failed sessions, running while the stream goes on (kept referenced).
_RELEASES: set[asyncio.Task[None]] = set()


async def model_stream_infer(service: InferenceService, context: Context,
                             observe: Callable[[str, str, float], None] | None) -> None:
    """The ModelStreamInfer handler: admitted as a stream (load shedding, drain)."""
    request_id_var.set(request_id_of(context))
    started = time.perf_counter()
    code = "OK"
    try:
        with service.admission.stream():
            await InferStream(service, context).run()
    except TensorlineServerError as error:
        # The stream itself was refused (draining, too many streams).
        code = status_code_of(error).name
        await abort(context, error)
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    finally:
        if observe is not None:
            observe("ModelStreamInfer", code, time.perf_counter() - started)
