"""tensorline client: run pipelines on a tensorline server from Python.

    from tensorline.client import Client

    with Client("localhost:50051") as client:
        result = client.execute("pipeline.yaml", inputs={"src": samples})
"""

from tensorline.client._base import (
    ClientConfig,
    ExecuteResult,
    ExecutionMetrics,
    NodeMetrics,
    load_manifest,
    manifest_json,
)
from tensorline.client._client import AsyncClient, Client
from tensorline.client._exceptions import (
    AuthenticationError,
    CallCancelledError,
    DeadlineExceededError,
    FieldViolation,
    InvalidRequestError,
    LimitExceededError,
    NodeError,
    NotFoundError,
    PermissionDeniedError,
    RequestError,
    SandboxError,
    ServerError,
    TensorlineError,
    TransportError,
    from_rpc_error,
)
from tensorline.client._stream import (
    AsyncStream,
    Stream,
    StreamEvent,
    StreamMetrics,
    StreamOutput,
)
from tensorline.wire import Audio, Json, PortItem, Tagged

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Audio",
    "AuthenticationError",
    "CallCancelledError",
    "Client",
    "ClientConfig",
    "DeadlineExceededError",
    "ExecuteResult",
    "ExecutionMetrics",
    "FieldViolation",
    "InvalidRequestError",
    "Json",
    "LimitExceededError",
    "NodeError",
    "NodeMetrics",
    "NotFoundError",
    "PermissionDeniedError",
    "PortItem",
    "RequestError",
    "SandboxError",
    "ServerError",
    "Stream",
    "StreamEvent",
    "StreamMetrics",
    "StreamOutput",
    "Tagged",
    "TensorlineError",
    "TransportError",
    "from_rpc_error",
    "load_manifest",
    "manifest_json",
]
