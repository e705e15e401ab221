"""The Python client: ``AsyncClient`` (grpc.aio) and ``Client`` (blocking), one configuration.

    async with AsyncClient("localhost:50051") as client:
        result = await client.execute(manifest, inputs={"src": samples})
        print(result.outputs["scale"], result.metrics.nodes)

Inputs are keyed ``"node"`` or ``"node:port"``. Outputs are keyed by node id when the node
returned one output, else ``"node:port"``. Arrays are sent little-endian and C-contiguous (the
client converts big-endian and strided arrays); received arrays are read-only views over the
response buffer (no copy): ``np.array(x)`` for a writable copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from tensorline.client._base import (
    BaseClient,
    Calls,
    ClientConfig,
    ExecuteResult,
    ExecutionMetrics,
    InputsLike,
    ManifestLike,
    NodeMetrics,
    Target,
    load_manifest,
    manifest_json,
)
from tensorline.client._exceptions import TransportError
from tensorline.v1 import tensorline_pb2 as pb

if TYPE_CHECKING:
    from tensorline.client._stream import AsyncStream, Stream, StreamEvent


class AsyncClient(BaseClient):
    """asyncio client. Use as ``async with AsyncClient(target) as client``."""

    def __init__(self, target: str, **config: Any) -> None:
        super().__init__(target, **config)
        self._channel: grpc.aio.Channel = self._open_channel(grpc.aio.insecure_channel,
                                                             grpc.aio.secure_channel)
        self._calls = Calls(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def execute(self, manifest: ManifestLike | None = None, inputs: InputsLike = None, *,
                      pipeline: str | None = None, version: int | None = None,
                      timeout: float | None = None,
                      request_id: str | None = None) -> ExecuteResult:
        """Run ``manifest`` once, or the pipeline named ``pipeline`` of the server's repository
        (its newest ready version, or ``version``)."""
        request = self._execute_request(manifest, inputs, pipeline, version)
        with self._errors():
            response = await self._calls.execute(request, **self._call_options(timeout,
                                                                                request_id))
        return self._execute_result(response)

    def stream(self, manifest: ManifestLike | None = None, *, pipeline: str | None = None,
               version: int | None = None, queue_size: int = 0,
               timeout: float | None = None, request_id: str | None = None,
               on_event: Callable[[StreamEvent], Any] | None = None,
               max_buffered: int = 0) -> AsyncStream:
        """A StreamPipeline session, used as ``async with client.stream(manifest) as s``
        (see ``tensorline.client._stream``). ``queue_size`` overrides the server's per-node
        buffer; ``timeout`` is the deadline of the whole session (default: the client's
        ``stream_timeout``, an hour unless configured; its ``timeout`` is meant for single
        calls, not long streams)."""
        from tensorline.client._stream import AsyncStream

        return AsyncStream(self._channel, Target.of(manifest, pipeline, version),
                           queue_size=queue_size,
                           timeout=self._stream_timeout(timeout),
                           metadata=self.config.metadata(request_id), on_event=on_event,
                           max_buffered=max_buffered)

    async def list_nodes(self) -> list[pb.NodeInfo]:
        return list((await self.catalogue()).nodes)

    async def catalogue(self) -> pb.ListNodesResponse:
        """The whole ListNodes answer: the node types, and those the server cannot run for a
        missing optional dependency (``unavailable``)."""
        with self._errors():
            response: pb.ListNodesResponse = await self._calls.list_nodes(
                pb.ListNodesRequest(), **self._call_options())
        return response

    async def server_info(self) -> pb.ServerInfo:
        with self._errors():
            info: pb.ServerInfo = await self._calls.server_info(pb.GetServerInfoRequest(),
                                                                **self._call_options())
        return info

    async def list_pipelines(self) -> list[pb.PipelineInfo]:
        """The named pipelines of the server's repository: state, versions, signature."""
        with self._errors():
            response: pb.ListPipelinesResponse = await self._calls.list_pipelines(
                pb.ListPipelinesRequest(), **self._call_options())
        return list(response.pipelines)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name (SERVING, NOT_SERVING, ...)."""
        with self._errors():
            reply = await self._health_method()(self._health_request(service), timeout=timeout,
                                                metadata=self.config.metadata())
        return self._health_status(reply)


class Client(BaseClient):
    """Blocking client with the same methods as ``AsyncClient``."""

    def __init__(self, target: str, **config: Any) -> None:
        super().__init__(target, **config)
        self._channel: grpc.Channel = self._open_channel(grpc.insecure_channel,
                                                         grpc.secure_channel)
        self._calls = Calls(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def execute(self, manifest: ManifestLike | None = None, inputs: InputsLike = None, *,
                pipeline: str | None = None, version: int | None = None,
                timeout: float | None = None, request_id: str | None = None) -> ExecuteResult:
        """See ``AsyncClient.execute``."""
        request = self._execute_request(manifest, inputs, pipeline, version)
        with self._errors():
            response = self._calls.execute(request, **self._call_options(timeout, request_id))
        return self._execute_result(response)

    def stream(self, manifest: ManifestLike | None = None, *, pipeline: str | None = None,
               version: int | None = None, **options: Any) -> Stream:
        """A blocking StreamPipeline session: ``with client.stream(manifest) as s`` (or
        ``pipeline="name"``); the same options as ``AsyncClient.stream``. It runs on a private
        event loop thread and channel."""
        from tensorline.client._stream import Stream

        return Stream(self.config.target, self._config_options(),
                      Target.of(manifest, pipeline, version), **options)

    def list_nodes(self) -> list[pb.NodeInfo]:
        return list(self.catalogue().nodes)

    def catalogue(self) -> pb.ListNodesResponse:
        """The whole ListNodes answer (see ``AsyncClient.catalogue``)."""
        with self._errors():
            response: pb.ListNodesResponse = self._calls.list_nodes(pb.ListNodesRequest(),
                                                                    **self._call_options())
        return response

    def server_info(self) -> pb.ServerInfo:
        with self._errors():
            info: pb.ServerInfo = self._calls.server_info(pb.GetServerInfoRequest(),
                                                          **self._call_options())
        return info

    def list_pipelines(self) -> list[pb.PipelineInfo]:
        """See ``AsyncClient.list_pipelines``."""
        with self._errors():
            response: pb.ListPipelinesResponse = self._calls.list_pipelines(
                pb.ListPipelinesRequest(), **self._call_options())
        return list(response.pipelines)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name (SERVING, NOT_SERVING, ...)."""
        with self._errors():
            reply = self._health_method()(self._health_request(service), timeout=timeout,
                                          metadata=self.config.metadata())
        return self._health_status(reply)


# ClientConfig, the result types and the manifest helpers live in ``_base``; they are
# re-exported here, where they used to be defined.
__all__ = [
    "AsyncClient",
    "Client",
    "ClientConfig",
    "ExecuteResult",
    "ExecutionMetrics",
    "NodeMetrics",
    "TransportError",
    "load_manifest",
    "manifest_json",
]
