"""What ``Client`` and ``AsyncClient`` share (as httpx's clients share a base): configuration,
request building, metadata, deadlines, response decoding and error mapping. ``BaseClient`` holds
it; the faces in ``tensorline.client._client`` only make the calls, blocking or awaited."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from tensorline.client._exceptions import TensorlineError, from_rpc_error
from tensorline.v1 import SERVICE_NAME
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    DecodedExecuteResponse,
    PortItem,
    decode_execute_response,
    encode_execute_request,
)
from tensorline.wire import load_yaml as safe_load
from tensorline.wire import yaml_syntax_error as syntax_error

SERVICE = f"/{SERVICE_NAME}/"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Deadlines when neither the call nor the client names one: a server that never answers (a
# stuck node, a lost replica) must not hang a caller forever. Unary calls get five minutes (the
# server's own limit of one sandboxed call), a streaming session an hour. ``None`` in the
# client's configuration means no deadline.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_STREAM_TIMEOUT_S = 3600.0

ManifestLike = Mapping[str, Any] | str | os.PathLike[str]
InputsLike = Mapping[str, Any] | Sequence[PortItem] | None


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a manifest file (.json, .yaml or .yml). Every ValueError names the file (and, for a
    syntax error, the line and column) in one line; OSError names the file itself."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not UTF-8 text") from None
    try:
        data = json.loads(text) if source.endswith(".json") else safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise syntax_error(exc, source) from None
    except ValueError as exc:  # the YAML loader's bounds
        raise ValueError(f"{source}: {exc}") from None
    if data is None:  # an empty file, or comments only: the one prefix names the file
        raise ValueError(f"{source}: the manifest is empty; write a mapping with 'version' "
                         "and 'nodes' (see examples/)")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a manifest must be a mapping")
    return data


def manifest_json(manifest: ManifestLike) -> str:
    """The JSON text of a manifest given as a mapping, JSON/YAML text or a file path."""
    if isinstance(manifest, Mapping):
        return json.dumps(manifest, separators=(",", ":"))
    if isinstance(manifest, os.PathLike):
        return json.dumps(load_manifest(manifest), separators=(",", ":"))
    text = manifest.strip()
    if text.startswith("{"):
        return text
    if "\n" not in text and text.lower().endswith((".json", ".yaml", ".yml")):
        return json.dumps(load_manifest(text), separators=(",", ":"))  # a file name
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, "manifest text") from None
    if isinstance(data, dict):
        return json.dumps(data, separators=(",", ":"))
    raise ValueError("manifest text is neither a JSON object nor a YAML mapping")


def split_key(key: str) -> tuple[str, str]:
    node_id, _, port = key.partition(":")
    return node_id, port


def port_items(inputs: InputsLike) -> list[PortItem]:
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        items = []
        for key, value in inputs.items():
            node_id, port = split_key(key)
            items.append(PortItem(node_id, port, value))
        return items
    return list(inputs)


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """Where a node ran and why, and its time; of a call's result, a stream's Ready (``nodes``)
    and a stream's final metrics. ``inputs_consumed`` and ``outputs_produced`` count a stream's
    values (0 in a unary call's result and in Ready)."""

    node_id: str
    node_type: str
    runtime: str
    selection_reason: str
    wall_ms: float
    fallback: str = ""
    inputs_consumed: int = 0
    outputs_produced: int = 0

    @classmethod
    def from_proto(cls, m: pb.NodeMetrics) -> NodeMetrics:
        return cls(m.node_id, m.node_type, m.runtime, m.selection_reason, m.wall_ms, m.fallback,
                   m.inputs_consumed, m.outputs_produced)


@dataclass(frozen=True, slots=True)
class ExecutionMetrics:
    total_ms: float
    nodes: list[NodeMetrics]
    plan_cached: bool

    @classmethod
    def from_proto(cls, metrics: pb.ExecutionMetrics) -> ExecutionMetrics:
        return cls(
            total_ms=metrics.total_ms,
            nodes=[NodeMetrics.from_proto(m) for m in metrics.nodes],
            plan_cached=metrics.plan_cached,
        )


@dataclass(frozen=True, slots=True)
class ExecuteResult:
    outputs: dict[str, Any]
    metrics: ExecutionMetrics
    items: list[PortItem] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.outputs[key]

    @classmethod
    def from_response(cls, response: DecodedExecuteResponse) -> ExecuteResult:
        counts: dict[str, int] = {}
        for item in response.outputs:
            counts[item.node_id] = counts.get(item.node_id, 0) + 1
        outputs = {
            (item.node_id if counts[item.node_id] == 1 else f"{item.node_id}:{item.port}"):
                item.value
            for item in response.outputs
        }
        return cls(outputs, ExecutionMetrics.from_proto(response.metrics), response.outputs)


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings shared by both clients."""

    target: str
    token: str | None = None
    # TLS: server CA (PEM) and, for mutual TLS, the client certificate chain and key (PEM).
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    tls: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Retry calls refused with UNAVAILABLE (draining replica, balancer failover).
    retry_unavailable: bool = True
    # Deadline of unary calls and of whole streaming sessions, seconds (None: none).
    timeout: float | None = DEFAULT_TIMEOUT_S
    stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S
    # "round_robin" spreads calls over every resolved address (e.g. a headless Service).
    load_balancing: str | None = None
    extra_options: tuple[tuple[str, Any], ...] = ()

    def options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        config: dict[str, Any] = {}
        if self.retry_unavailable:
            def retry(codes: list[str]) -> dict[str, Any]:
                return {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": codes}

            config["methodConfig"] = [
                # A draining replica refuses new work with UNAVAILABLE. A call it accepted but
                # never handed to a handler when its gRPC server stopped ends CANCELLED: a
                # pipeline execution has no side effects, so it is safe to send again.
                {"name": [{"service": SERVICE_NAME, "method": "ExecutePipeline"}],
                 "retryPolicy": retry(["UNAVAILABLE", "CANCELLED"])},
                {"name": [{"service": SERVICE_NAME}], "retryPolicy": retry(["UNAVAILABLE"])},
            ]
            options += [
                ("grpc.enable_retries", 1),
                # Calls are retried only while their request fits the retry buffer.
                ("grpc.per_rpc_retry_buffer_size", 4 * 1024 * 1024),
            ]
        if self.load_balancing:
            # Client-side balancing over every address the target resolves to, skipping
            # backends whose gRPC health is not SERVING (e.g. draining).
            config["loadBalancingConfig"] = [{self.load_balancing: {}}]
            config["healthCheckConfig"] = {"serviceName": ""}
        if config:
            options.append(("grpc.service_config", json.dumps(config)))
        return [*options, *self.extra_options]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.certificate_chain):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def metadata(self, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        metadata = [("x-request-id", request_id or uuid.uuid4().hex)]
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return tuple(metadata)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """What a call runs: a manifest (as JSON text), or a named pipeline of the server's
    repository and its version (0 = the newest)."""

    manifest_json: str = ""
    pipeline: str = ""
    version: int = 0

    @classmethod
    def of(cls, manifest: ManifestLike | None, pipeline: str | None,
           version: int | None) -> Target:
        """Exactly one of ``manifest`` and ``pipeline``; ``version`` only with ``pipeline``."""
        if (manifest is None) == (pipeline is None):
            raise TensorlineError("give either a manifest or pipeline= (the name of a pipeline "
                                  "of the server's repository), not both or neither")
        if pipeline is None:
            if version is not None:
                raise TensorlineError("version= goes with pipeline=")
            assert manifest is not None
            return cls(manifest_json=manifest_json(manifest))
        if not pipeline:
            raise TensorlineError("pipeline= must be a pipeline name")
        if version is not None and version < 1:
            raise TensorlineError(f"version= must be >= 1 (None = the newest), got {version}")
        return cls(pipeline=pipeline, version=version or 0)


class Calls:
    """Builds the method callables on a channel (the same for sync and aio channels)."""

    def __init__(self, channel: Any) -> None:
        self.execute = channel.unary_unary(
            SERVICE + "ExecutePipeline",
            request_serializer=None,
            response_deserializer=decode_execute_response,
        )
        self.list_nodes = channel.unary_unary(
            SERVICE + "ListNodes",
            request_serializer=pb.ListNodesRequest.SerializeToString,
            response_deserializer=pb.ListNodesResponse.FromString,
        )
        self.server_info = channel.unary_unary(
            SERVICE + "GetServerInfo",
            request_serializer=pb.GetServerInfoRequest.SerializeToString,
            response_deserializer=pb.ServerInfo.FromString,
        )
        self.list_pipelines = channel.unary_unary(
            SERVICE + "ListPipelines",
            request_serializer=pb.ListPipelinesRequest.SerializeToString,
            response_deserializer=pb.ListPipelinesResponse.FromString,
        )


HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class BaseClient:
    """The configuration and every step of a call but the call itself (see the module
    docstring). A face opens ``_channel`` with ``_open_channel`` and builds ``_calls`` on it."""

    _channel: Any
    _calls: Calls

    def __init__(self, target: str, **config: Any) -> None:
        self.config = ClientConfig(target, **config)

    def _open_channel(self, insecure: Callable[..., Any], secure: Callable[..., Any]) -> Any:
        """A channel to the target from grpc's (or grpc.aio's) channel factories."""
        credentials = self.config.credentials()
        if credentials is None:
            return insecure(self.config.target, options=self.config.options())
        return secure(self.config.target, credentials, self.config.options())

    # --- deadlines and metadata ---

    def _timeout(self, timeout: float | None) -> float | None:
        """A unary call's deadline: the call's, else the client's (``None`` there: none)."""
        return timeout if timeout is not None else self.config.timeout

    def _stream_timeout(self, timeout: float | None) -> float | None:
        """A streaming session's deadline: the session's, else the client's ``stream_timeout``."""
        return timeout if timeout is not None else self.config.stream_timeout

    def _call_options(self, timeout: float | None = None,
                      request_id: str | None = None) -> dict[str, Any]:
        """The deadline and metadata of a unary call."""
        return {"timeout": self._timeout(timeout), "metadata": self.config.metadata(request_id)}

    def _config_options(self) -> dict[str, Any]:
        """The configuration but the target, as keyword arguments of a client."""
        return {f.name: getattr(self.config, f.name)
                for f in dataclasses.fields(self.config) if f.name != "target"}

    # --- requests and responses ---

    @staticmethod
    def _execute_request(manifest: ManifestLike | None, inputs: InputsLike,
                         pipeline: str | None = None, version: int | None = None) -> bytes:
        try:
            target = Target.of(manifest, pipeline, version)
            return encode_execute_request(target.manifest_json, port_items(inputs),
                                          target.pipeline, target.version)
        except (TypeError, ValueError) as exc:
            raise TensorlineError(f"cannot encode the request: {exc}") from exc

    @staticmethod
    def _execute_result(response: DecodedExecuteResponse) -> ExecuteResult:
        return ExecuteResult.from_response(response)

    def _health_method(self) -> Any:
        """grpc.health.v1 Check on the channel (its stubs are imported on first use)."""
        from grpc_health.v1 import health_pb2

        return self._channel.unary_unary(
            HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    @staticmethod
    def _health_request(service: str) -> Any:
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckRequest(service=service)

    @staticmethod
    def _health_status(reply: Any) -> str:
        from grpc_health.v1 import health_pb2

        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # --- errors ---

    @staticmethod
    @contextlib.contextmanager
    def _errors() -> Iterator[None]:
        """A failed call raises the client's exception for its status (``from_rpc_error``)."""
        try:
            yield
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_STREAM_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "BaseClient",
    "Calls",
    "ClientConfig",
    "ExecuteResult",
    "ExecutionMetrics",
    "InputsLike",
    "ManifestLike",
    "NodeMetrics",
    "Target",
    "load_manifest",
    "manifest_json",
    "port_items",
    "split_key",
]
