"""Error translation at the service boundary: the one place where server exceptions become gRPC
statuses with google.rpc rich details (BadRequest field violations, ErrorInfo, RetryInfo)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tensorline.server._errors import (
    DeadlineExceeded,
    LayerMissing,
    LimitExceeded,
    NodeFailed,
    PermissionDenied,
    RequestInvalid,
    RuntimeUnavailable,
    SandboxFailure,
    ServiceUnavailable,
    SessionCancelled,
    TensorlineServerError,
    Violation,
)
from tensorline.server._logging import request_id_var

log = logging.getLogger(__name__)

DOMAIN = "tensorline.dev"

_CODES: list[tuple[type[TensorlineServerError], grpc.StatusCode]] = [
    (RequestInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NodeFailed, grpc.StatusCode.UNKNOWN),
    (SandboxFailure, grpc.StatusCode.ABORTED),
    (RuntimeUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (LayerMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServiceUnavailable, grpc.StatusCode.UNAVAILABLE),
    (SessionCancelled, grpc.StatusCode.CANCELLED),
]


# What the sandbox did to a call, by ``SandboxFailure.kind``: a denial or a cap is the caller's
# to know about (retrying cannot help); anything not listed (a crash, a protocol violation, a
# node that cannot be loaded) stays ABORTED.
_SANDBOX_CODES: dict[str, grpc.StatusCode] = {
    "permission": grpc.StatusCode.PERMISSION_DENIED,
    "memory": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "cpu": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def status_code_of(error: TensorlineServerError) -> grpc.StatusCode:
    if isinstance(error, RequestInvalid) and any(v.kind == "limit" for v in error.violations):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, SandboxFailure):
        return _SANDBOX_CODES.get(error.kind, grpc.StatusCode.ABORTED)
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _error_metadata(error: TensorlineServerError) -> dict[str, str]:
    if isinstance(error, NodeFailed):
        meta = {"node_id": error.node_id, "exception_type": error.exc_type}
        if error.sequence is not None:
            meta["sequence"] = str(error.sequence)
        return meta
    if isinstance(error, SandboxFailure):
        return {"node_id": error.node_id, "cause": error.cause, "during": error.during,
                "kind": error.kind}
    if isinstance(error, RuntimeUnavailable):
        return {"node_id": error.node_id, "runtime": error.runtime}
    if isinstance(error, LayerMissing):
        return {"layers": ",".join(error.layers)}
    return {}


def to_status(error: TensorlineServerError) -> status_pb2.Status:
    code = status_code_of(error)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN,
                                                 metadata=_error_metadata(error)))]
    violations: list[Violation] = list(getattr(error, "violations", []))
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ])))
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        seconds = int(retry_after)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=seconds, nanos=int((retry_after - seconds) * 1e9)))))
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message,
                             details=details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: TensorlineServerError) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


class RequestObserver(Protocol):
    def observe_request(self, method: str, code: str, seconds: float) -> None: ...


def translate_errors(name: str) -> Callable[[Handler], Handler]:
    """Wrap a unary handler of RPC ``name``: server errors -> rich statuses, anything else ->
    INTERNAL; sets the request id for logging and reports method/status/latency to the
    service's ``telemetry`` (when it has one)."""

    def decorate(method: Handler) -> Handler:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: Any) -> Any:
            request_id_var.set(request_id_of(context))
            telemetry: RequestObserver | None = getattr(self, "telemetry", None)
            started = time.perf_counter()
            code = "OK"
            try:
                return await method(self, request, context)
            except TensorlineServerError as error:
                code = status_code_of(error).name
                log.info("%s: %s", name, error.message)
                await abort(context, error)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("%s: internal error", name)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    "internal server error (see server log)")
            finally:
                if telemetry is not None:
                    telemetry.observe_request(name, code, time.perf_counter() - started)

        return wrapper  # type: ignore[return-value]

    return decorate


_REQUEST_IDS = itertools.count(1)
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:12]


def request_id_of(context: Any) -> str:
    """The caller's ``x-request-id`` metadata, or a fresh id unique to this process (a counter:
    no uuid4, which reads the kernel's random pool, on every call)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return str(value)
    return f"{_REQUEST_ID_PREFIX}-{next(_REQUEST_IDS)}"
