"""The server's exception tree. The service translates these to gRPC statuses in one place
(``tensorline.server.service._status``); nothing else in the server knows about status codes.

    TensorlineServerError
    ├── RequestInvalid        INVALID_ARGUMENT   bad manifest / params / inputs (all violations)
    ├── LimitExceeded         RESOURCE_EXHAUSTED oversize tensor, too many concurrent calls
    ├── PermissionDenied      PERMISSION_DENIED  trust policy refused a runtime hint
    ├── NodeFailed            UNKNOWN            a node's own exception (names node + exception)
    ├── SandboxFailure        ABORTED            the worker hosting a node died or hit a limit
    ├── DeadlineExceeded      DEADLINE_EXCEEDED  request deadline or node timeout
    ├── SessionCancelled      CANCELLED          the client cancelled its stream (StreamCancel)
    └── ServiceUnavailable    UNAVAILABLE        draining / shutting down

Anything else escaping a handler is a server bug and becomes INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorline.client._codec import Violation

# How much of one piece of request-supplied text (a name, an id, a node's exception message)
# goes into an error message or a log line: enough to recognize it, never megabytes.
TEXT_LIMIT = 200
MESSAGE_LIMIT = 2000


def clip(text: object, limit: int = TEXT_LIMIT) -> str:
    """``text`` as a string of at most about ``limit`` characters, saying how much was cut."""
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value) - limit} more characters)"

__all__ = [
    "DeadlineExceeded",
    "LimitExceeded",
    "NodeFailed",
    "PermissionDenied",
    "RequestInvalid",
    "SandboxFailure",
    "ServiceUnavailable",
    "SessionCancelled",
    "TensorlineServerError",
    "Violation",
    "clip",
]


class TensorlineServerError(Exception):
    """Base of every error the service translates to a gRPC status."""

    reason = "TENSORLINE_ERROR"

    def __init__(self, message: str) -> None:
        message = clip(message, MESSAGE_LIMIT)
        super().__init__(message)
        self.message = message


class RequestInvalid(TensorlineServerError):
    """The request cannot run as given; ``violations`` lists every problem found."""

    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[Violation], summary: str = "invalid request") -> None:
        self.violations = list(violations)
        lines = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"{summary} ({len(self.violations)} problem(s)): {lines}")


class LimitExceeded(TensorlineServerError):
    """A size or concurrency limit was hit; ``retry_after_s`` is a hint for load shedding."""

    reason = "LIMIT_EXCEEDED"

    def __init__(
        self,
        message: str,
        violations: Sequence[Violation] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.violations = list(violations)
        self.retry_after_s = retry_after_s


class PermissionDenied(TensorlineServerError):
    reason = "PERMISSION_DENIED"


class NodeFailed(TensorlineServerError):
    """A node raised. Carries the node id and the exception type so clients can tell which."""

    reason = "NODE_ERROR"

    def __init__(self, node_id: str, exc_type: str, detail: str, sequence: int | None = None):
        self.node_id = node_id
        self.exc_type = exc_type
        self.detail = detail
        self.sequence = sequence
        where = f"node '{node_id}'" + (f" at sequence {sequence}" if sequence is not None else "")
        super().__init__(f"{where} failed: {exc_type}: {detail}")


class SandboxFailure(TensorlineServerError):
    """The sandbox worker hosting a node crashed or was killed (memory, CPU, signal)."""

    reason = "SANDBOX_FAILURE"
    def __init__(self, node_id: str, cause: str, *, during: str = "process") -> None:
        self.node_id = node_id
        self.cause = cause
        self.during = during
        super().__init__(f"node '{node_id}' failed in the sandbox during {during}: {cause}")

    @property
    def fallback_eligible(self) -> bool:
        """Whether the sandbox (a blocked syscall, the memory cap, a crash while importing or
        initializing) rather than the node caused this, so an in-process retry may help."""
        return True


class DeadlineExceeded(TensorlineServerError):
    reason = "DEADLINE_EXCEEDED"


class SessionCancelled(TensorlineServerError):
    """The client cancelled its streaming session; everything stopped, no metrics."""

    reason = "CANCELLED"


class ServiceUnavailable(TensorlineServerError):
    reason = "UNAVAILABLE"
