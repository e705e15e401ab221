"""The client's exception tree, mapped from gRPC statuses in one place (``from_rpc_error``).

    TensorlineError                 base of everything the client raises
    ├── TransportError              UNAVAILABLE: server unreachable, draining or restarting
    ├── RequestError                the server refused the request as given
    │   ├── InvalidRequestError     INVALID_ARGUMENT (``violations`` lists every problem)
    │   ├── LimitExceededError      RESOURCE_EXHAUSTED (``retry_after_s`` when shedding load)
    │   ├── AuthenticationError     UNAUTHENTICATED
    │   └── PermissionDeniedError   PERMISSION_DENIED (e.g. trust policy)
    ├── NodeError                   a node raised (``node_id``, ``exception_type``)
    ├── SandboxError                the sandbox worker running a node died or hit a limit
    ├── DeadlineExceededError       DEADLINE_EXCEEDED
    ├── CallCancelledError          CANCELLED (named apart from asyncio.CancelledError)
    └── ServerError                 INTERNAL and anything unexpected
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class TensorlineError(Exception):
    """Base class. ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 reason: str = "", metadata: dict[str, str] | None = None,
                 violations: list[FieldViolation] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.violations = violations or []
        self.retry_after_s = retry_after_s


class TransportError(TensorlineError):
    pass


class RequestError(TensorlineError):
    pass


class InvalidRequestError(RequestError):
    pass


class NotFoundError(RequestError):
    """NOT_FOUND: the request named something the server does not hold (a pipeline of its
    repository, or a version of one); the message says which."""


class LimitExceededError(RequestError):
    pass


class AuthenticationError(RequestError):
    pass


class PermissionDeniedError(RequestError):
    pass


class NodeError(TensorlineError):
    @property
    def node_id(self) -> str:
        return self.metadata.get("node_id", "")

    @property
    def exception_type(self) -> str:
        return self.metadata.get("exception_type", "")


class SandboxError(TensorlineError):
    @property
    def node_id(self) -> str:
        return self.metadata.get("node_id", "")


class DeadlineExceededError(TensorlineError):
    pass


class CallCancelledError(TensorlineError):
    pass


class ServerError(TensorlineError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TensorlineError]] = {
    grpc.StatusCode.UNAVAILABLE: TransportError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNKNOWN: NodeError,
    grpc.StatusCode.ABORTED: SandboxError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
}


def from_rpc_error(error: grpc.RpcError) -> TensorlineError:
    """The client exception for a failed call, with the server's rich details decoded."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or code.name  # type: ignore[attr-defined]
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    cls = _BY_CODE.get(code, ServerError)
    if code == grpc.StatusCode.UNKNOWN and reason != "NODE_ERROR":
        cls = ServerError
    return cls(message, code=code, reason=reason, metadata=metadata, violations=violations,
               retry_after_s=retry_after)
