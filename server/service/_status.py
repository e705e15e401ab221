"""Error translation at the service boundary: the one place where server exceptions become gRPC
statuses with google.rpc rich details (BadRequest field violations, ErrorInfo, RetryInfo)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
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
    PipelineNotFound,
    RequestInvalid,
    RuntimeUnavailable,
    SandboxFailure,
    ServiceUnavailable,
    SessionCancelled,
    TensorlineServerError,
    Violation,
    clip,
)
from tensorline.server._logging import DeferredId, request_id_var

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
    (PipelineNotFound, grpc.StatusCode.NOT_FOUND),
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
    if isinstance(error, RequestInvalid):
        kinds = {v.kind for v in error.violations}
        if "limit" in kinds:
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        if "precondition" in kinds:
            return grpc.StatusCode.FAILED_PRECONDITION
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


# The status travels in trailing metadata: its message percent-encoded in grpc-message and
# again, with the details, base64-encoded in grpc-status-details-bin. grpc clients refuse
# metadata above 8 KiB by default (RESOURCE_EXHAUSTED "received metadata size exceeds limit",
# losing every detail), so both are capped: worst case 3 x MESSAGE_BYTES + 4/3 x (MESSAGE_BYTES
# + DETAILS_BYTES) + the fixed headers stays under 6.5 KiB.
MESSAGE_BYTES = 512
DETAILS_BYTES = 3000
# Room kept for the closing "N more problems" entry.
_MORE_BYTES = 80


def _clip_utf8(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit - 3].decode(errors="ignore") + "..."


_DIGITS = re.compile(r"\d+")


def _prioritized(violations: list[Violation]) -> list[Violation]:
    """Violations with one of each kind of problem first (same field path and description but
    for the numbers in them), then the repeats: a thousand duplicate inputs must not hide the
    one unknown node type behind them."""
    firsts: list[Violation] = []
    repeats: list[Violation] = []
    seen: set[tuple[str, str]] = set()
    for violation in violations:
        key = (_DIGITS.sub("#", violation.field), _DIGITS.sub("#", violation.description))
        (repeats if key in seen else firsts).append(violation)
        seen.add(key)
    return firsts + repeats


def _bad_request(violations: list[Violation], budget: int) -> error_details_pb2.BadRequest:
    """The field violations that fit ``budget`` serialized bytes, most useful first, and an
    entry counting the rest."""
    bad = error_details_pb2.BadRequest()
    ordered = _prioritized(violations)
    for shown, violation in enumerate(ordered):
        entry = error_details_pb2.BadRequest.FieldViolation(
            field=clip(violation.field), description=clip(violation.description, 1000))
        # 3 bytes of framing per entry at most (tag and a 2-byte length).
        if bad.ByteSize() + entry.ByteSize() + 3 > budget - _MORE_BYTES:
            bad.field_violations.append(error_details_pb2.BadRequest.FieldViolation(
                field="...", description=f"{len(ordered) - shown} more problem(s) not shown"))
            break
        bad.field_violations.append(entry)
    return bad


def to_status(error: TensorlineServerError) -> status_pb2.Status:
    """The google.rpc.Status of ``error``, sized to fit a client's default metadata limit."""
    code = status_code_of(error)
    details = [_pack(error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN,
        metadata={k: clip(v) for k, v in _error_metadata(error).items()}))]
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        seconds = int(retry_after)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=seconds, nanos=int((retry_after - seconds) * 1e9)))))
    violations: list[Violation] = list(getattr(error, "violations", []))
    if violations:
        used = sum(detail.ByteSize() for detail in details)
        details.insert(1, _pack(_bad_request(violations, DETAILS_BYTES - used)))
    return status_pb2.Status(code=getattr(code_pb2, code.name),
                             message=_clip_utf8(error.message, MESSAGE_BYTES), details=details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: TensorlineServerError) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


# How long a stream about to be refused waits for the client's first message.
FIRST_MESSAGE_WAIT_S = 2.0


async def await_first_message(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Before refusing a stream whose first message was not read yet: wait (bounded) for it.

    A grpc.aio client whose write fails because the call has already ended reports INTERNAL
    "Internal error from Core" in place of the server's status (grpc/grpc#36066). A client's
    first write is its init; once that has arrived, its write is complete and the refusal
    reaches it as sent. A client that sends nothing is refused when the wait is over."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(context.read(), FIRST_MESSAGE_WAIT_S)


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
            request_id_var.set(DeferredId(request_id_of, context))
            telemetry: RequestObserver | None = getattr(self, "telemetry", None)
            started = time.perf_counter()
            code = "OK"
            try:
                return await method(self, request, context)
            except TensorlineServerError as error:
                code = status_code_of(error).name
                log.info("%s: %s", name, clip(error.message, 500))
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
