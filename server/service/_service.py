"""The gRPC service: decodes requests with the codec, runs them on the engine, translates errors.

Methods are registered through a generic handler (not the generated servicer base) so that the
bulk-data messages use the codec's zero-copy (de)serializers; the small messages use the
generated classes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from functools import partial
from typing import Any

import grpc

from tensorline.server._settings import Settings
from tensorline.server._version import __version__
from tensorline.server.executor import PipelineEngine
from tensorline.server.repository import PipelineRepository
from tensorline.server.runtime import ExecutionScope
from tensorline.server.service._admission import Admission
from tensorline.server.service._pipelines import list_pipelines, named_version, pipeline_statuses
from tensorline.server.service._status import translate_errors
from tensorline.server.service._telemetry import Telemetry
from tensorline.v1 import PROTOCOL_VERSION, SERVICE_NAME
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    DecodedExecuteRequest,
    Limits,
    decode_execute_request,
    decode_stream_request,
    encode_execute_response,
    encode_execution_metrics,
)

Context = Any  # grpc.aio.ServicerContext (grpc ships no type information)


def scope_for(context: Context, execution_id: str) -> ExecutionScope:
    remaining = context.time_remaining()
    deadline = None
    if remaining is not None:
        # A little before the client's own deadline: the server's DEADLINE_EXCEEDED, which
        # names the node that ran out of time, must reach the client before the client's
        # deadline turns it into a bare "Deadline Exceeded" (and gRPC cancels this handler).
        deadline = asyncio.get_running_loop().time() + remaining - min(0.2, remaining * 0.05)
    return ExecutionScope(execution_id=execution_id, deadline=deadline,
                          caller=context.peer() or "")


class PipelineService:
    def __init__(self, engine: PipelineEngine, settings: Settings, admission: Admission,
                 telemetry: Telemetry | None = None,
                 repository: PipelineRepository | None = None) -> None:
        self.engine = engine
        self.repository = repository
        self.settings = settings
        self.telemetry = telemetry
        self.admission = admission
        self._catalogue: pb.ListNodesResponse | None = None
        # Execution ids: unique per server without paying for uuid4 on every call.
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]

    def next_execution_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    @translate_errors("ExecutePipeline")
    async def execute_pipeline(self, request: DecodedExecuteRequest, context: Context) -> bytes:
        started = time.perf_counter()
        scope = scope_for(context, self.next_execution_id())
        # The in-flight gauges read the admission counters at scrape time: nothing per call.
        self.admission.enter_execution()
        try:
            named = named_version(request.manifest_json, request.pipeline,
                                  request.pipeline_version, self.repository,
                                  prior=request.violations)
            if named is None:
                lookup = self.engine.lookup(request.manifest_json, request.violations)
                result = await self.engine.execute_plan(lookup.plan, request.inputs,
                                                        prior=request.violations, scope=scope)
                cached = lookup.cached
            else:
                # Held for the whole call: a version replaced or unloaded meanwhile finishes it.
                with named.repository.lease(named.name, named.version) as pipeline:
                    result = await self.engine.execute_plan(
                        pipeline.plan, request.inputs, prior=request.violations, scope=scope)
                cached = True  # compiled when the version was loaded
        finally:
            self.admission.leave_execution()
        metrics = encode_execution_metrics((time.perf_counter() - started) * 1000.0,
                                           result.reports, cached)
        return encode_execute_response(result.outputs, metrics)

    @translate_errors("ListNodes")
    async def list_nodes(self, request: pb.ListNodesRequest, context: Context) -> pb.ListNodesResponse:
        if self._catalogue is None:
            self._catalogue = catalogue(self.engine)
        return self._catalogue

    @translate_errors("GetServerInfo")
    async def get_server_info(self, request: pb.GetServerInfoRequest,
                              context: Context) -> pb.ServerInfo:
        layers = [pb.SandboxLayer(name=layer.name, active=layer.active, detail=layer.detail)
                  for runtime in self.engine.runtimes.values() for layer in runtime.layers()]
        return pb.ServerInfo(
            server_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            instance_id=self.settings.instance_id,
            max_message_bytes=self.settings.max_message_bytes,
            max_tensor_bytes=self.settings.max_tensor_bytes,
            max_concurrent_executions=self.settings.max_concurrent_executions,
            max_concurrent_streams=self.settings.max_concurrent_streams,
            sandbox_layers=layers,
            worker_pool_size=self._live_workers(),
            runtimes=sorted(self.engine.runtimes),
            pipelines=pipeline_statuses(self.repository),
        )

    @translate_errors("ListPipelines")
    async def list_pipelines(self, request: pb.ListPipelinesRequest,
                             context: Context) -> pb.ListPipelinesResponse:
        return list_pipelines(self.repository)

    def _live_workers(self) -> int:
        """Worker processes alive now, over every runtime that has a pool."""
        return sum(int(runtime.stats().get("workers", 0.0))
                   for runtime in self.engine.runtimes.values())

    def handler(self) -> grpc.GenericRpcHandler:
        # Imported here: the stream handler module imports this one.
        from tensorline.server.service._stream import StreamHandler

        limits = Limits(max_tensor_bytes=self.settings.max_tensor_bytes,
                        max_json_depth=self.settings.max_json_depth)
        stream = StreamHandler(self.engine, self.settings, self.admission, self.telemetry,
                               self.repository)
        methods = {
            "ExecutePipeline": grpc.unary_unary_rpc_method_handler(
                self.execute_pipeline,
                request_deserializer=partial(decode_execute_request, limits=limits),
                # The handler returns the encoded bytes: no serializer.
                response_serializer=None,
            ),
            "StreamPipeline": grpc.stream_stream_rpc_method_handler(
                stream.stream_pipeline,
                request_deserializer=partial(decode_stream_request, limits=limits),
                response_serializer=None,
            ),
            "ListNodes": grpc.unary_unary_rpc_method_handler(
                self.list_nodes,
                request_deserializer=pb.ListNodesRequest.FromString,
                response_serializer=pb.ListNodesResponse.SerializeToString,
            ),
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                self.get_server_info,
                request_deserializer=pb.GetServerInfoRequest.FromString,
                response_serializer=pb.ServerInfo.SerializeToString,
            ),
            "ListPipelines": grpc.unary_unary_rpc_method_handler(
                self.list_pipelines,
                request_deserializer=pb.ListPipelinesRequest.FromString,
                response_serializer=pb.ListPipelinesResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


def catalogue(engine: PipelineEngine) -> pb.ListNodesResponse:
    nodes = []
    for entry in engine.registry:
        allowed = ["sandbox"] if not entry.trusted else sorted(engine.runtimes)
        nodes.append(pb.NodeInfo(
            node_type=entry.node_type,
            description=entry.description,
            params_schema_json=entry.params_schema_json(),
            inputs=[pb.PortInfo(name=p.name, kind=p.kind, description=p.description,
                                required=p.required, many=p.many) for p in entry.inputs],
            outputs=[pb.PortInfo(name=p.name, kind=p.kind, description=p.description)
                     for p in entry.outputs],
            allowed_runtimes=allowed,
            module=entry.module,
            streaming=entry.streaming,
            reusable=entry.reusable,
            trusted=entry.trusted,
        ))
    unavailable = [pb.UnavailableNodeType(node_type=node_type, missing_dependencies=missing)
                   for node_type, missing in sorted(engine.registry.optional.items())
                   if node_type not in engine.registry]
    return pb.ListNodesResponse(nodes=nodes, unavailable=unavailable)
