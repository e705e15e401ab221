"""Client side of StreamPipeline: ``AsyncStream`` (asyncio) and ``Stream`` (blocking).

    async with client.stream(manifest, on_event=print) as s:
        await s.send("mic", Audio(frame, 16000))       # sequence numbers count up from 0
        async for out in s:                            # node_id, port, sequence, value
            ...                                        # (usually in another task)
        metrics = await s.close()                      # drain + flush, final metrics

Leaving the ``async with`` block normally closes the stream; leaving it with an exception
cancels it. ``close`` drains everything in flight and returns the session metrics; results not
consumed yet stay readable with ``async for`` afterwards. ``cancel`` stops at once (no metrics).

Flow control: ``send`` waits while the server is busy (its queues are bounded), so a slow node
slows the sender. Results are read in the background into a local buffer, unbounded by default
(so sending everything before reading cannot deadlock); ``max_buffered`` bounds it, in which
case results must be consumed while sending (``close`` lifts the bound to reach the metrics).
Events (node initialization, unjoined inputs...) go to ``on_event`` and ``events``, never into
the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import status_pb2

from tensorline.client._base import NodeMetrics, Target
from tensorline.client._exceptions import TensorlineError, from_rpc_error
from tensorline.v1 import SERVICE_NAME
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    DecodedStreamResponse,
    StreamItem,
    decode_stream_response,
    encode_stream_cancel,
    encode_stream_chunk,
    encode_stream_close,
    encode_stream_init,
)

STREAM_METHOD = f"/{SERVICE_NAME}/StreamPipeline"

# A result of a stream: ``node_id``, ``port``, ``sequence`` (of the input it derives from, -1
# for end-of-stream flushes) and ``value``.
StreamOutput = StreamItem


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Status or progress reported by the server (never data)."""

    node_id: str
    kind: str
    message: str
    progress: float


@dataclass(frozen=True, slots=True)
class StreamMetrics:
    """Final metrics of a closed session."""

    total_ms: float
    nodes: list[NodeMetrics]
    plan_cached: bool
    chunks_received: int
    results_sent: int
    # Peak values (and bytes) the server buffered between nodes: bounded by its queues.
    max_buffered_items: int
    max_buffered_bytes: int

    @classmethod
    def from_proto(cls, closed: pb.StreamClosed) -> StreamMetrics:
        return cls(closed.metrics.total_ms,
                   [NodeMetrics.from_proto(m) for m in closed.metrics.nodes],
                   closed.metrics.plan_cached, closed.chunks_received, closed.results_sent,
                   closed.max_buffered_items, closed.max_buffered_bytes)


_END: Any = object()
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _StatusCarrier(grpc.RpcError):  # type: ignore[misc]
    """A google.rpc.Status received as a StreamError message, shaped like a failed call so
    that ``from_rpc_error`` (the one place mapping statuses to exceptions) handles it."""

    def __init__(self, serialized: bytes) -> None:
        self._status = status_pb2.Status.FromString(serialized)

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self._status.code, grpc.StatusCode.UNKNOWN)

    def details(self) -> str:
        return str(self._status.message)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


class _Buffer:
    """Results read but not consumed yet: bounded by ``maxsize`` (0 = unbounded) except for the
    end marker, which always fits and stays (every later read ends too)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    def append(self, item: Any) -> None:
        self._items.append(item)
        self._readable.set()

    async def put(self, item: Any) -> None:
        while self.maxsize and len(self._items) >= self.maxsize:
            self._room.clear()
            await self._room.wait()
        self.append(item)

    def unbound(self) -> None:
        self.maxsize = 0
        self._room.set()

    async def get(self) -> Any:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item = self._items[0]
        if item is not _END:
            self._items.popleft()
            self._room.set()
        return item


@dataclass
class _State:
    session_id: str = ""
    nodes: list[NodeMetrics] = field(default_factory=list)
    metrics: StreamMetrics | None = None
    error: TensorlineError | None = None
    # The failure announced by a StreamError message (wins over what the transport reports).
    server_error: TensorlineError | None = None
    finished: bool = False
    cancelled: bool = False


class AsyncStream:
    """One StreamPipeline session (see the module docstring)."""

    def __init__(self, channel: grpc.aio.Channel, target: Target, *,
                 queue_size: int = 0, timeout: float | None = None,
                 metadata: tuple[tuple[str, str], ...] = (),
                 on_event: Callable[[StreamEvent], Any] | None = None,
                 max_buffered: int = 0) -> None:
        self._channel = channel
        self._target = target
        self._queue_size = queue_size
        self._timeout = timeout
        self._metadata = metadata
        self._on_event = on_event
        self.events: list[StreamEvent] = []
        self._results = _Buffer(max_buffered)
        self._state = _State()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._next_sequence = 0
        self._closing = False
        # grpc allows one write (or half-close) at a time per call.
        self._write_lock = asyncio.Lock()

    # --- properties ---

    @property
    def session_id(self) -> str:
        return self._state.session_id

    @property
    def nodes(self) -> list[NodeMetrics]:
        """Where each node runs and why (from the server's Ready)."""
        return self._state.nodes

    @property
    def metrics(self) -> StreamMetrics | None:
        return self._state.metrics

    # --- opening ---

    async def __aenter__(self) -> AsyncStream:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._state.finished or self._state.cancelled:
            return
        if exc_type is None:
            await self.close()
        else:
            await self.cancel("client error")

    async def open(self) -> None:
        """Send init and wait for Ready (initialization errors raise here)."""
        self._call = self._channel.stream_stream(
            STREAM_METHOD, request_serializer=None,
            response_deserializer=decode_stream_response,
        )(timeout=self._timeout, metadata=self._metadata)
        try:
            target = self._target
            await self._call.write(encode_stream_init(target.manifest_json, self._queue_size,
                                                      target.pipeline, target.version))
            while True:
                response: Any = await self._call.read()
                if response is grpc.aio.EOF:
                    raise TensorlineError("the server ended the stream before Ready")
                if response.kind == "event":
                    self._event(response.event)
                elif response.kind == "ready":
                    ready = response.ready
                    self._state.session_id = ready.session_id
                    self._state.nodes = [NodeMetrics.from_proto(m) for m in ready.nodes]
                    break
                else:
                    raise TensorlineError(f"unexpected {response.kind} before Ready")
        except grpc.RpcError as error:
            self._state.finished = True
            raise from_rpc_error(error) from None
        except BaseException:
            self._call.cancel()
            raise
        self._reader = asyncio.ensure_future(self._read_loop())

    def _event(self, event: pb.StreamEvent) -> None:
        info = StreamEvent(event.node_id, event.kind, event.message, event.progress)
        self.events.append(info)
        if self._on_event is not None:
            self._on_event(info)

    async def _read_loop(self) -> None:
        results = self._results
        try:
            while True:
                response: DecodedStreamResponse = await self._call.read()
                if response is grpc.aio.EOF:  # type: ignore[comparison-overlap]
                    break
                kind = response.kind
                if kind == "results":
                    for item in response.results:
                        if results.maxsize:
                            await results.put(item)
                        else:
                            results.append(item)
                elif kind == "event":
                    assert response.event is not None
                    self._event(response.event)
                elif kind == "closed":
                    assert response.closed is not None
                    self._state.metrics = StreamMetrics.from_proto(response.closed)
                elif kind == "error":
                    # Stop sending and half-close: the server then ends the call with this
                    # status (writing on would race with it; see the proto).
                    self._state.server_error = from_rpc_error(
                        _StatusCarrier(response.error_status))
                    async with self._write_lock:
                        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                            await self._call.done_writing()
        except grpc.RpcError as error:
            if not self._state.cancelled:
                self._state.error = self._state.server_error or from_rpc_error(error)
        except asyncio.CancelledError:
            pass
        finally:
            if self._state.error is None and not self._state.cancelled:
                self._state.error = self._state.server_error
            self._state.finished = True
            results.append(_END)

    # --- sending ---

    async def send(self, node: str, value: Any, *, port: str = "",
                   sequence: int | None = None) -> int:
        """Send ``value`` to ``node`` (``"node:port"`` also works); returns its sequence.

        Waits while the server's queues are full. Raises the session's error if it failed."""
        if port == "" and ":" in node:
            node, _, port = node.partition(":")
        if sequence is None:
            sequence = self._next_sequence
        self._next_sequence = sequence + 1
        try:
            data = encode_stream_chunk(sequence, node, port, value)
        except (TypeError, ValueError) as exc:
            raise TensorlineError(f"cannot encode chunk {sequence}: {exc}") from exc
        await self._write(data)
        return sequence

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._state.server_error is not None:
                raise self._state.server_error
            if not (self._state.finished or self._closing):
                try:
                    await self._call.write(data)
                    return
                except (grpc.RpcError, asyncio.InvalidStateError):
                    pass
        await self._raise_final("the stream has ended" if self._state.finished
                                else "the stream is closed")

    async def _raise_final(self, fallback: str) -> None:
        if self._reader is not None:
            await asyncio.shield(self._reader)
        if self._state.error is not None:
            raise self._state.error
        raise TensorlineError(fallback)

    # --- receiving ---

    def __aiter__(self) -> AsyncIterator[StreamOutput]:
        return self

    async def __anext__(self) -> StreamOutput:
        item = await self._results.get()
        if item is _END:
            if self._state.error is not None and not self._state.cancelled:
                raise self._state.error
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    # --- ending ---

    async def close(self) -> StreamMetrics:
        """Drain everything in flight, flush the nodes and return the session metrics."""
        if self._state.metrics is not None:
            return self._state.metrics
        # Whatever is still in flight must be read to reach the final metrics: it is kept for
        # ``async for`` however much it is.
        self._results.unbound()
        if not self._closing and not self._state.finished:
            self._closing = True
            async with self._write_lock:
                try:
                    await self._call.write(encode_stream_close())
                    await self._call.done_writing()
                except (grpc.RpcError, asyncio.InvalidStateError):
                    pass  # the call already ended: its status tells why
        assert self._reader is not None
        await asyncio.shield(self._reader)
        if self._state.error is not None:
            raise self._state.error
        if self._state.metrics is None:
            raise TensorlineError("the stream ended without its final metrics")
        return self._state.metrics

    async def cancel(self, reason: str = "") -> None:
        """Stop the session at once: the server cleans up; no metrics."""
        if self._state.finished:
            return
        self._state.cancelled = True
        async with self._write_lock:
            try:
                await self._call.write(encode_stream_cancel(reason))
                await self._call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
            except TimeoutError:
                self._call.cancel()
                await self._reader


class Stream:
    """Blocking wrapper around ``AsyncStream``, running it on a private event loop thread."""

    def __init__(self, address: str, config: dict[str, Any], target: Target,
                 **options: Any) -> None:
        self._address = address
        self._config = config
        self._target = target
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tensorline-stream")
        self._client: Any = None
        self._stream: AsyncStream | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def session_id(self) -> str:
        assert self._stream is not None
        return self._stream.session_id

    @property
    def events(self) -> list[StreamEvent]:
        assert self._stream is not None
        return self._stream.events

    def __enter__(self) -> Stream:
        self._thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self._shutdown()
            raise
        return self

    async def _open(self) -> None:
        from tensorline.client._client import AsyncClient

        self._client = AsyncClient(self._address, **self._config)
        target = self._target
        self._stream = self._client.stream(target.manifest_json or None,
                                           pipeline=target.pipeline or None,
                                           version=target.version or None, **self._options)
        await self._stream.open()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            assert self._stream is not None
            self._run(self._stream.__aexit__(exc_type, None, None))
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._client is not None:
            self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def send(self, node: str, value: Any, *, port: str = "", sequence: int | None = None) -> int:
        assert self._stream is not None
        return int(self._run(self._stream.send(node, value, port=port, sequence=sequence)))

    def __iter__(self) -> Iterator[StreamOutput]:
        assert self._stream is not None
        stream = self._stream
        while True:
            try:
                yield self._run(stream.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> StreamMetrics:
        assert self._stream is not None
        metrics: StreamMetrics = self._run(self._stream.close())
        return metrics

    def cancel(self, reason: str = "") -> None:
        assert self._stream is not None
        self._run(self._stream.cancel(reason))
