from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_COMPLEX64: _ClassVar[DType]
    DTYPE_COMPLEX128: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_BOOL: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
DTYPE_UINT16: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_COMPLEX64: DType
DTYPE_COMPLEX128: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Audio(_message.Message):
    __slots__ = ("samples", "sample_rate")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    samples: Tensor
    sample_rate: int
    def __init__(self, samples: _Optional[_Union[Tensor, _Mapping]] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "audio", "text", "json", "binary", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    audio: Audio
    text: str
    json: str
    binary: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., audio: _Optional[_Union[Audio, _Mapping]] = ..., text: _Optional[str] = ..., json: _Optional[str] = ..., binary: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PortValue(_message.Message):
    __slots__ = ("node_id", "port", "value")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    port: str
    value: Value
    def __init__(self, node_id: _Optional[str] = ..., port: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("manifest_json", "inputs", "pipeline", "pipeline_version")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    inputs: _containers.RepeatedCompositeFieldContainer[PortValue]
    pipeline: str
    pipeline_version: int
    def __init__(self, manifest_json: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[PortValue, _Mapping]]] = ..., pipeline: _Optional[str] = ..., pipeline_version: _Optional[int] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("outputs", "metrics")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[PortValue]
    metrics: ExecutionMetrics
    def __init__(self, outputs: _Optional[_Iterable[_Union[PortValue, _Mapping]]] = ..., metrics: _Optional[_Union[ExecutionMetrics, _Mapping]] = ...) -> None: ...

class NodeMetrics(_message.Message):
    __slots__ = ("node_id", "node_type", "runtime", "selection_reason", "wall_ms", "fallback", "inputs_consumed", "outputs_produced")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    SELECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_PRODUCED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_type: str
    runtime: str
    selection_reason: str
    wall_ms: float
    fallback: str
    inputs_consumed: int
    outputs_produced: int
    def __init__(self, node_id: _Optional[str] = ..., node_type: _Optional[str] = ..., runtime: _Optional[str] = ..., selection_reason: _Optional[str] = ..., wall_ms: _Optional[float] = ..., fallback: _Optional[str] = ..., inputs_consumed: _Optional[int] = ..., outputs_produced: _Optional[int] = ...) -> None: ...

class ExecutionMetrics(_message.Message):
    __slots__ = ("total_ms", "nodes", "plan_cached")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PLAN_CACHED_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeMetrics]
    plan_cached: bool
    def __init__(self, total_ms: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeMetrics, _Mapping]]] = ..., plan_cached: _Optional[bool] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("init", "data", "close", "cancel")
    INIT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    init: StreamInit
    data: StreamChunk
    close: StreamClose
    cancel: StreamCancel
    def __init__(self, init: _Optional[_Union[StreamInit, _Mapping]] = ..., data: _Optional[_Union[StreamChunk, _Mapping]] = ..., close: _Optional[_Union[StreamClose, _Mapping]] = ..., cancel: _Optional[_Union[StreamCancel, _Mapping]] = ...) -> None: ...

class StreamInit(_message.Message):
    __slots__ = ("manifest_json", "queue_size", "pipeline", "pipeline_version")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    manifest_json: str
    queue_size: int
    pipeline: str
    pipeline_version: int
    def __init__(self, manifest_json: _Optional[str] = ..., queue_size: _Optional[int] = ..., pipeline: _Optional[str] = ..., pipeline_version: _Optional[int] = ...) -> None: ...

class StreamChunk(_message.Message):
    __slots__ = ("sequence", "node_id", "port", "value")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    node_id: str
    port: str
    value: Value
    def __init__(self, sequence: _Optional[int] = ..., node_id: _Optional[str] = ..., port: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class StreamClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamCancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("ready", "result", "event", "closed", "results", "error")
    READY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ready: StreamReady
    result: StreamResult
    event: StreamEvent
    closed: StreamClosed
    results: StreamResults
    error: StreamError
    def __init__(self, ready: _Optional[_Union[StreamReady, _Mapping]] = ..., result: _Optional[_Union[StreamResult, _Mapping]] = ..., event: _Optional[_Union[StreamEvent, _Mapping]] = ..., closed: _Optional[_Union[StreamClosed, _Mapping]] = ..., results: _Optional[_Union[StreamResults, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: bytes
    def __init__(self, status: _Optional[bytes] = ...) -> None: ...

class StreamReady(_message.Message):
    __slots__ = ("session_id", "nodes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeMetrics]
    def __init__(self, session_id: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeMetrics, _Mapping]]] = ...) -> None: ...

class StreamResult(_message.Message):
    __slots__ = ("sequence", "node_id", "port", "value")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    node_id: str
    port: str
    value: Value
    def __init__(self, sequence: _Optional[int] = ..., node_id: _Optional[str] = ..., port: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("node_id", "kind", "message", "progress")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    kind: str
    message: str
    progress: float
    def __init__(self, node_id: _Optional[str] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., progress: _Optional[float] = ...) -> None: ...

class StreamResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StreamResult]
    def __init__(self, results: _Optional[_Iterable[_Union[StreamResult, _Mapping]]] = ...) -> None: ...

class StreamClosed(_message.Message):
    __slots__ = ("metrics", "chunks_received", "results_sent", "max_buffered_items", "max_buffered_bytes")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_SENT_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFERED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    metrics: ExecutionMetrics
    chunks_received: int
    results_sent: int
    max_buffered_items: int
    max_buffered_bytes: int
    def __init__(self, metrics: _Optional[_Union[ExecutionMetrics, _Mapping]] = ..., chunks_received: _Optional[int] = ..., results_sent: _Optional[int] = ..., max_buffered_items: _Optional[int] = ..., max_buffered_bytes: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PortInfo(_message.Message):
    __slots__ = ("name", "kind", "description", "required", "many")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MANY_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    description: str
    required: bool
    many: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., required: _Optional[bool] = ..., many: _Optional[bool] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_type", "description", "params_schema_json", "inputs", "outputs", "allowed_runtimes", "module", "streaming", "reusable", "trusted")
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    REUSABLE_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_FIELD_NUMBER: _ClassVar[int]
    node_type: str
    description: str
    params_schema_json: str
    inputs: _containers.RepeatedCompositeFieldContainer[PortInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[PortInfo]
    allowed_runtimes: _containers.RepeatedScalarFieldContainer[str]
    module: str
    streaming: bool
    reusable: bool
    trusted: bool
    def __init__(self, node_type: _Optional[str] = ..., description: _Optional[str] = ..., params_schema_json: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[PortInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[PortInfo, _Mapping]]] = ..., allowed_runtimes: _Optional[_Iterable[str]] = ..., module: _Optional[str] = ..., streaming: _Optional[bool] = ..., reusable: _Optional[bool] = ..., trusted: _Optional[bool] = ...) -> None: ...

class UnavailableNodeType(_message.Message):
    __slots__ = ("node_type", "missing_dependencies")
    NODE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MISSING_DEPENDENCIES_FIELD_NUMBER: _ClassVar[int]
    node_type: str
    missing_dependencies: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_type: _Optional[str] = ..., missing_dependencies: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "unavailable")
    NODES_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    unavailable: _containers.RepeatedCompositeFieldContainer[UnavailableNodeType]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., unavailable: _Optional[_Iterable[_Union[UnavailableNodeType, _Mapping]]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SandboxLayer(_message.Message):
    __slots__ = ("name", "active", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    active: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., active: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("server_version", "protocol_version", "instance_id", "max_message_bytes", "max_tensor_bytes", "max_concurrent_executions", "max_concurrent_streams", "sandbox_layers", "worker_pool_size", "runtimes", "pipelines")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    protocol_version: str
    instance_id: str
    max_message_bytes: int
    max_tensor_bytes: int
    max_concurrent_executions: int
    max_concurrent_streams: int
    sandbox_layers: _containers.RepeatedCompositeFieldContainer[SandboxLayer]
    worker_pool_size: int
    runtimes: _containers.RepeatedScalarFieldContainer[str]
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineStatus]
    def __init__(self, server_version: _Optional[str] = ..., protocol_version: _Optional[str] = ..., instance_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., max_concurrent_executions: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., sandbox_layers: _Optional[_Iterable[_Union[SandboxLayer, _Mapping]]] = ..., worker_pool_size: _Optional[int] = ..., runtimes: _Optional[_Iterable[str]] = ..., pipelines: _Optional[_Iterable[_Union[PipelineStatus, _Mapping]]] = ...) -> None: ...

class PipelinePort(_message.Message):
    __slots__ = ("name", "node_id", "port", "kind", "datatype", "shape", "required")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    node_id: str
    port: str
    kind: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    required: bool
    def __init__(self, name: _Optional[str] = ..., node_id: _Optional[str] = ..., port: _Optional[str] = ..., kind: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., required: _Optional[bool] = ...) -> None: ...

class PipelineStatus(_message.Message):
    __slots__ = ("name", "state", "versions", "reason", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    source: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListPipelinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PipelineInfo(_message.Message):
    __slots__ = ("status", "inputs", "outputs")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    status: PipelineStatus
    inputs: _containers.RepeatedCompositeFieldContainer[PipelinePort]
    outputs: _containers.RepeatedCompositeFieldContainer[PipelinePort]
    def __init__(self, status: _Optional[_Union[PipelineStatus, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[PipelinePort, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[PipelinePort, _Mapping]]] = ...) -> None: ...

class ListPipelinesResponse(_message.Message):
    __slots__ = ("pipelines",)
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineInfo]
    def __init__(self, pipelines: _Optional[_Iterable[_Union[PipelineInfo, _Mapping]]] = ...) -> None: ...
