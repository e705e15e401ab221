"""The Open Inference Protocol (KServe v2) over gRPC: Triton and KServe clients call named
pipelines as models, on the server's one port.

Each named pipeline of the repository is a model: its request-fed ports are the model's inputs,
its sinks the model's outputs (``PipelinePort.name``), its repository versions the model's
versions. Methods are registered through a generic handler at Triton's paths
(``/inference.GRPCInferenceService/<Method>``) with our own wire-compatible messages
(``tensorline.oip.v2``), so the same auth interceptor, admission (load shedding, drain),
error translation (``_status``) and telemetry apply as to PipelineService.

Errors take the status codes Triton returns: an unknown model NOT_FOUND, a model that is not
ready UNAVAILABLE, a bad input (name, datatype, shape, contents) INVALID_ARGUMENT naming the
model and the input; a streamed request's error goes back in ``error_message`` and the stream
goes on, as Triton does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from tensorline.oip.v2 import SERVICE_NAME
from tensorline.oip.v2 import inference_pb2 as pb
from tensorline.server._errors import (
    PipelineNotFound,
    PipelineNotReady,
    RequestInvalid,
    TensorlineServerError,
    Violation,
    clip,
)
from tensorline.server._settings import Settings
from tensorline.server._version import __version__
from tensorline.server.executor import PipelineEngine
from tensorline.server.repository import (
    Lease,
    LoadedPipeline,
    PipelinePort,
    PipelineRepository,
)
from tensorline.server.service._admission import Admission
from tensorline.server.service._inference_stream import (
    MalformedRequest,
    model_stream_infer,
    parser,
)
from tensorline.server.service._service import scope_for
from tensorline.server.service._status import translate_errors
from tensorline.server.service._telemetry import Telemetry
from tensorline.server.service._v2tensors import (
    InputTarget,
    OutputNotEncodable,
    Raw,
    decode_tensor,
    encode_output,
    frame_plain_response,
    frame_response,
    plain_input,
    response_head,
)
from tensorline.wire import Limits, PortItem

Context = Any  # grpc.aio.ServicerContext

# ModelMetadata's platform for every pipeline.
PLATFORM = "tensorline_pipeline"
# The v2 extensions this server implements (ServerMetadata).
EXTENSIONS = ("model_repository",)
# ModelMetadata of a port whose manifest declares no datatype / shape: text, json and binary
# ports take one BYTES element; a tensor port takes any datatype ("" says so) of any shape.
_KIND_DATATYPES = {"text": "BYTES", "json": "BYTES", "binary": "BYTES"}


def _version_of(text: str, field: str) -> int | None:
    """A request's version string as a repository version ("" = the newest)."""
    if not text:
        return None
    # ASCII only: str.isdigit() admits "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()):
        raise RequestInvalid([Violation(field, f"a model version is a positive integer, got "
                                        f"{clip(text)!r}")], "invalid request")
    return int(text)


def _tensor_metadata(port: PipelinePort) -> pb.ModelMetadataResponse.TensorMetadata:
    datatype = port.datatype or _KIND_DATATYPES.get(port.kind, "")
    shape = port.shape if port.shape is not None else (
        (1,) if port.kind in _KIND_DATATYPES else (-1,))
    return pb.ModelMetadataResponse.TensorMetadata(name=port.name, datatype=datatype,
                                                  shape=list(shape))


class InferenceService:
    """The GRPCInferenceService methods over the server's repository and engine."""

    def __init__(self, engine: PipelineEngine, settings: Settings, admission: Admission,
                 telemetry: Telemetry | None = None,
                 repository: PipelineRepository | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.admission = admission
        self.telemetry = telemetry
        self.repository = repository
        self.limits = Limits(max_tensor_bytes=settings.max_tensor_bytes,
                             max_json_depth=settings.max_json_depth)
        # Whether the server takes work (not warming up, not draining, runtimes healthy); the
        # server sets it once it exists.
        self.is_server_ready: Callable[[], bool] = lambda: not admission.draining
        self._ids = 0
        self._heads: dict[tuple[str, int], bytes] = {}

    # --- the repository -----------------------------------------------------------------------

    def _repository(self, name: str) -> PipelineRepository:
        if self.repository is None:
            raise PipelineNotFound(f"no model named {clip(name)!r}: this server serves no named "
                                   "pipelines (start it with --pipelines DIR)")
        return self.repository

    def _not_found(self, name: str, error: PipelineNotFound) -> TensorlineServerError:
        """NOT_FOUND for a name the repository does not know, UNAVAILABLE (as Triton) for one it
        knows that cannot run now."""
        assert self.repository is not None
        for state in self.repository.states():
            if state.name == name and state.state != "READY":
                why = f": {state.reason}" if state.reason else ""
                return PipelineNotReady(f"model {clip(name)!r} is not ready "
                                        f"({state.state.lower()}){why}")
        return error

    def pipeline(self, name: str, version: int | None) -> Lease:
        """The named pipeline for one call, leased from the repository for the ``with`` block:
        a version replaced or unloaded meanwhile finishes this call. NOT_FOUND / UNAVAILABLE
        as Triton answers."""
        repository = self._repository(name)
        try:
            return repository.lease(name, version)
        except PipelineNotFound as error:
            raise self._not_found(name, error) from None

    # --- server and model state -----------------------------------------------------------------

    @translate_errors("ServerLive")
    async def server_live(self, request: pb.ServerLiveRequest,
                          context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @translate_errors("ServerReady")
    async def server_ready(self, request: pb.ServerReadyRequest,
                            context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_server_ready())

    @translate_errors("ServerMetadata")
    async def server_metadata(self, request: pb.ServerMetadataRequest,
                              context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tensorline", version=__version__,
                                         extensions=list(EXTENSIONS))

    @translate_errors("ModelReady")
    async def model_ready(self, request: pb.ModelReadyRequest,
                          context: Context) -> pb.ModelReadyResponse:
        version = _version_of(request.version, "version")
        return pb.ModelReadyResponse(ready=self.repository is not None
                                     and self.is_server_ready()
                                     and self.repository.ready(request.name, version))

    @translate_errors("ModelMetadata")
    async def model_metadata(self, request: pb.ModelMetadataRequest,
                             context: Context) -> pb.ModelMetadataResponse:
        version = _version_of(request.version, "version")
        with self.pipeline(request.name, version) as pipeline:
            versions = [str(v) for state in self._repository(request.name).states()
                        if state.name == request.name for v in state.versions]
            return pb.ModelMetadataResponse(
                name=pipeline.name, versions=versions or [str(pipeline.version)],
                platform=PLATFORM,
                inputs=[_tensor_metadata(port) for port in pipeline.inputs],
                outputs=[_tensor_metadata(port) for port in pipeline.outputs])

    # --- repository -----------------------------------------------------------------------------

    @translate_errors("RepositoryIndex")
    async def repository_index(self, request: pb.RepositoryIndexRequest,
                               context: Context) -> pb.RepositoryIndexResponse:
        models = []
        for state in self.repository.states() if self.repository is not None else []:
            if request.ready and state.state != "READY":
                continue
            if state.versions:
                models += [pb.RepositoryIndexResponse.ModelIndex(
                    name=state.name, version=str(version), state=state.state,
                    reason=state.reason) for version in state.versions]
            else:
                models.append(pb.RepositoryIndexResponse.ModelIndex(
                    name=state.name, state=state.state, reason=state.reason))
        return pb.RepositoryIndexResponse(models=models)

    @translate_errors("RepositoryModelLoad")
    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest,
                                    context: Context) -> pb.RepositoryModelLoadResponse:
        """Re-read the model's manifest, compile and warm it: it becomes the newest version (the
        one before keeps serving if it fails)."""
        self._check_repository_request(request.repository_name, request.parameters)
        await self._repository(request.model_name).load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @translate_errors("RepositoryModelUnload")
    async def repository_model_unload(self, request: pb.RepositoryModelUnloadRequest,
                                      context: Context) -> pb.RepositoryModelUnloadResponse:
        """The model takes no new calls; calls in flight finish on their version."""
        # tritonclient always sends unload_dependents; a pipeline has no dependent models.
        self._check_repository_request(request.repository_name, request.parameters,
                                       allowed=("unload_dependents",))
        await self._repository(request.model_name).unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @staticmethod
    def _check_repository_request(repository_name: str, parameters: Any,
                                  allowed: tuple[str, ...] = ()) -> None:
        """A load or unload names no other repository and passes no parameters (Triton's
        ``config`` and file overrides have no meaning here): refused, not ignored."""
        problems = []
        if repository_name:
            problems.append(Violation("repository_name", "this server has one repository; "
                                      f"leave it empty (got {clip(repository_name)!r})"))
        unsupported = sorted(clip(key) for key in parameters if key not in allowed)
        if unsupported:
            problems.append(Violation("parameters", "load/unload parameters are not supported "
                                      f"(got {', '.join(unsupported)}); edit the manifest in "
                                      "the pipelines directory instead"))
        if problems:
            raise RequestInvalid(problems, "invalid repository request")

    # --- inference ------------------------------------------------------------------------------

    def inputs_of(self, request: pb.ModelInferRequest,
                  pipeline: LoadedPipeline) -> list[PortItem]:
        """The request's tensors as port values; RequestInvalid lists every problem."""
        plain = self._plain_inputs(request, pipeline)
        return plain if plain is not None else self._inputs_in_full(request, pipeline)

    def _plain_inputs(self, request: pb.ModelInferRequest,
                      pipeline: LoadedPipeline) -> list[PortItem] | None:
        """The commonest request in few steps: every input of the model given once, each a
        numeric raw tensor its port takes (``plain_input``). None otherwise: the full decoding
        then reads it, and reports every problem."""
        tensors, contents = request.inputs, request.raw_input_contents
        count = len(tensors)
        if count != len(contents) or count != len(pipeline.inputs):
            return None
        ports = pipeline.inputs_by_name
        max_bytes = self.limits.max_tensor_bytes
        items: list[PortItem] = []
        for index in range(count):
            tensor = tensors[index]
            port = ports.get(tensor.name)
            if port is None or tensor.parameters or tensor.HasField("contents"):
                return None
            value = plain_input(tensor, contents[index], port.kind, port.datatype, port.shape,
                                max_bytes)
            if value is None:
                return None
            items.append(PortItem(port.node_id, port.port, value))
        # As many as the model has inputs, each one of them: no name given twice, none missing.
        if count > 1 and len({tensor.name for tensor in tensors}) != count:
            return None
        return items

    def _inputs_in_full(self, request: pb.ModelInferRequest,
                        pipeline: LoadedPipeline) -> list[PortItem]:
        model = clip(pipeline.name)
        problems: list[Violation] = []
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            problems.append(Violation("raw_input_contents", f"model {model!r}: "
                                      f"{len(raw)} raw contents for {len(request.inputs)} "
                                      "input(s); send one per input, in order"))
            raw = []
        ports = pipeline.inputs_by_name
        items: list[PortItem] = []
        seen: set[str] = set()
        for index, tensor in enumerate(request.inputs):
            field = f"inputs[{index}]"
            where = f"model {model!r} input {clip(tensor.name)!r}"
            port = ports.get(tensor.name)
            if port is None:
                problems.append(Violation(f"{field}.name", f"model {model!r} has no input "
                                          f"{clip(tensor.name)!r}; its inputs: "
                                          f"{', '.join(ports) or '(none)'}"))
                continue
            if tensor.name in seen:
                problems.append(Violation(f"{field}.name", f"{where} is given twice"))
                continue
            seen.add(tensor.name)
            if any(key.startswith("shared_memory") for key in tensor.parameters):
                problems.append(Violation(f"{field}.parameters", f"{where}: shared memory "
                                          "is not supported; send the tensor's contents"))
                continue
            if raw and tensor.HasField("contents"):
                problems.append(Violation(f"{field}.contents", f"{where}: contents and "
                                          "raw_input_contents cannot be mixed in one request"))
                continue
            value, found = decode_tensor(
                tensor, raw[index] if raw else None,
                InputTarget(port.kind, port.datatype, port.shape), field, where, self.limits)
            problems += found
            if value is not None:
                items.append(PortItem(port.node_id, port.port, value))
        missing = [port.name for port in pipeline.inputs
                   if port.required and port.name not in seen]
        if missing:
            problems.append(Violation("inputs", f"model {model!r}: missing required input(s) "
                                      f"{', '.join(missing)}"))
        if problems:
            raise RequestInvalid(problems, f"invalid inference request for model {model!r}")
        return items

    def _requested(self, request: pb.ModelInferRequest,
                   pipeline: LoadedPipeline) -> Sequence[PipelinePort]:
        if not request.outputs:
            return pipeline.outputs
        model = clip(pipeline.name)
        by_name = {port.name: port for port in pipeline.outputs}
        problems = [Violation(f"outputs[{index}].name", f"model {model!r} has no output "
                              f"{clip(output.name)!r}; its outputs: {', '.join(by_name)}")
                    for index, output in enumerate(request.outputs)
                    if output.name not in by_name]
        # Extensions this server does not implement are refused, not ignored: the client
        # would otherwise read a plain tensor as what it asked for.
        problems += [Violation(f"outputs[{index}].parameters", f"model {model!r} output "
                               f"{clip(output.name)!r}: {key.split('_')[0]} is not supported")
                     for index, output in enumerate(request.outputs)
                     for key in sorted(output.parameters)
                     if key == "classification" or key.startswith("shared_memory")]
        if problems:
            raise RequestInvalid(problems, f"invalid inference request for model {model!r}")
        wanted = {output.name for output in request.outputs}
        return [port for port in pipeline.outputs if port.name in wanted]

    @staticmethod
    def not_encodable(pipeline: LoadedPipeline, port: PipelinePort,
                      error: OutputNotEncodable) -> RequestInvalid:
        """FAILED_PRECONDITION: the model produced an output the protocol cannot carry, or not
        the one its manifest declares."""
        return RequestInvalid(
            [Violation(f"outputs.{port.name}", f"model {clip(pipeline.name)!r}: {error}",
                       kind="precondition")],
            f"model {clip(pipeline.name)!r} produced an output it cannot send")

    @staticmethod
    def version_of(text: str) -> int | None:
        """A request's ``model_version`` as a repository version ("" = the newest)."""
        return _version_of(text, "model_version")

    def _next_execution_id(self) -> str:
        self._ids += 1
        return f"oip-{self.settings.instance_id}-{self._ids}"

    async def run(self, request: pb.ModelInferRequest, context: Context,
                  ) -> tuple[LoadedPipeline, Sequence[PipelinePort], dict[tuple[str, str], Any]]:
        """Run one inference request: the pipeline version that ran it, the outputs the
        request asked for, and the values the pipeline produced by (node, port)."""
        version = _version_of(request.model_version, "model_version")
        self.admission.enter_execution()
        try:
            with self.pipeline(request.model_name, version) as pipeline:
                items = self.inputs_of(request, pipeline)
                requested = self._requested(request, pipeline)
                result = await self.engine.execute_plan(
                    pipeline.plan, items, scope=scope_for(context, self._next_execution_id()))
        finally:
            self.admission.leave_execution()
        return pipeline, requested, {(item.node_id, item.port): item.value
                                     for item in result.outputs}

    async def infer(self, request: pb.ModelInferRequest,
                    context: Context) -> tuple[pb.ModelInferResponse, list[Raw]]:
        """Run one inference request (one request of a stream): the response without its raw
        contents, and the raw contents of its outputs, in order."""
        return self.response(request, *await self.run(request, context))

    def response(self, request: pb.ModelInferRequest, pipeline: LoadedPipeline,
                 requested: Sequence[PipelinePort], produced: dict[tuple[str, str], Any],
                 ) -> tuple[pb.ModelInferResponse, list[Raw]]:
        response = pb.ModelInferResponse(model_name=pipeline.name,
                                         model_version=str(pipeline.version), id=request.id)
        raws: list[Raw] = []
        for port in requested:
            try:
                tensor, raw = encode_output(port.name, produced[(port.node_id, port.port)],
                                            port.datatype, port.shape)
            except OutputNotEncodable as exc:
                raise self.not_encodable(pipeline, port, exc) from None
            response.outputs.append(tensor)
            raws.append(raw)
        return response, raws

    def _head(self, pipeline: LoadedPipeline) -> bytes:
        """The response's model name and version, serialized once per pipeline version."""
        key = (pipeline.name, pipeline.version)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= 1024:  # bounded: versions come and go
                self._heads.clear()
            head = self._heads[key] = response_head(pipeline.name, str(pipeline.version))
        return head

    @translate_errors("ModelInfer")
    async def model_infer(self, request: pb.ModelInferRequest, context: Context) -> bytes:
        pipeline, requested, produced = await self.run(request, context)
        framed = frame_plain_response(
            self._head(pipeline), request.id,
            [(port.name, port.datatype, port.shape, produced[(port.node_id, port.port)])
             for port in requested])
        if framed is not None:
            return framed
        return frame_response(*self.response(request, pipeline, requested, produced))

    async def model_stream_infer(self, requests: Any, context: Context) -> None:
        """ModelStreamInfer (see ``_inference_stream``)."""
        observe = self.telemetry.observe_request if self.telemetry is not None else None
        await model_stream_infer(self, context, observe)

    @staticmethod
    async def _refuse(request: MalformedRequest, context: Context) -> None:
        raise RequestInvalid([Violation("request", request.why)], "malformed request")

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(name: str, method: Callable[..., Any], request: Any,
                  serializer: Callable[[Any], bytes] | None) -> Any:
            # Bytes that do not parse are the client's error (INVALID_ARGUMENT), reported
            # through the same translation and telemetry as the method's own errors.
            async def refuse_malformed(_: Any, malformed: MalformedRequest,
                                       context: Context) -> None:
                await self._refuse(malformed, context)

            refuse = translate_errors(name)(refuse_malformed)

            async def call(message: Any, context: Context) -> Any:
                if isinstance(message, MalformedRequest):
                    return await refuse(self, message, context)
                return await method(message, context)

            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=parser(request), response_serializer=serializer)

        def plain(name: str, method: Callable[..., Any], request: Any, response: Any) -> Any:
            return unary(name, method, request, response.SerializeToString)

        methods = {
            "ServerLive": plain("ServerLive", self.server_live, pb.ServerLiveRequest,
                                pb.ServerLiveResponse),
            "ServerReady": plain("ServerReady", self.server_ready, pb.ServerReadyRequest,
                                 pb.ServerReadyResponse),
            "ServerMetadata": plain("ServerMetadata", self.server_metadata,
                                    pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelReady": plain("ModelReady", self.model_ready, pb.ModelReadyRequest,
                                pb.ModelReadyResponse),
            "ModelMetadata": plain("ModelMetadata", self.model_metadata,
                                   pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            # The handler frames the response itself (``frame_response``): no serializer.
            "ModelInfer": unary("ModelInfer", self.model_infer, pb.ModelInferRequest, None),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer,
                request_deserializer=parser(pb.ModelInferRequest),
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
            "RepositoryIndex": plain("RepositoryIndex", self.repository_index,
                                     pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": plain("RepositoryModelLoad", self.repository_model_load,
                                         pb.RepositoryModelLoadRequest,
                                         pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": plain("RepositoryModelUnload",
                                           self.repository_model_unload,
                                           pb.RepositoryModelUnloadRequest,
                                           pb.RepositoryModelUnloadResponse),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)
