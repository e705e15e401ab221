"""The server's exception tree. The service translates these to gRPC statuses in one place
(``tensorline.server.service._status``); nothing else in the server knows about status codes.

    TensorlineServerError
    ├── RequestInvalid        INVALID_ARGUMENT   bad manifest / params / inputs (all violations)
    ├── LimitExceeded         RESOURCE_EXHAUSTED oversize tensor, too many concurrent calls
    ├── PermissionDenied      PERMISSION_DENIED  trust policy refused a runtime hint
    ├── NodeFailed            UNKNOWN            a node's own exception (names node + exception)
    ├── SandboxFailure        by ``kind``: the sandbox denied, stopped or could not host a call
    │                         PERMISSION_DENIED  permission (EPERM/EACCES, seccomp, Landlock)
    │                         RESOURCE_EXHAUSTED memory, cpu, limit (a cap of the sandbox)
    │                         UNAVAILABLE        unavailable (no worker could be started)
    │                         ABORTED            crash, protocol, import, transfer, anything else
    ├── RuntimeUnavailable    FAILED_PRECONDITION a node's runtime is missing and it may not fall back
    ├── LayerMissing          FAILED_PRECONDITION a sandbox layer untrusted nodes require is missing
    ├── DeadlineExceeded      DEADLINE_EXCEEDED  request deadline or node timeout
    ├── SessionCancelled      CANCELLED          the client cancelled its stream (StreamCancel)
    ├── ServiceUnavailable    UNAVAILABLE        draining / shutting down
    │   └── PipelineNotReady  UNAVAILABLE        a named pipeline that failed to load or is unloaded
    └── PipelineNotFound      NOT_FOUND          no such named pipeline (or version) in the repository

Anything else escaping a handler is a server bug and becomes INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorline.wire import Violation

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
    "FALLBACK_KINDS",
    "DeadlineExceeded",
    "LayerMissing",
    "LimitExceeded",
    "NodeFailed",
    "PermissionDenied",
    "PipelineNotFound",
    "PipelineNotReady",
    "RequestInvalid",
    "RuntimeUnavailable",
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


# Sandbox failures where the sandbox could not host the call at all, so nothing of it ran under
# isolation: no worker could be started (``unavailable``), the node class cannot be loaded in a
# worker (``import``), or its values cannot cross the process boundary (``transfer``). These
# alone may be retried in-process; every other kind means the sandbox denied or stopped what the
# node did, and running it again without the sandbox would undo exactly that.
FALLBACK_KINDS = frozenset({"unavailable", "import", "transfer"})


class SandboxFailure(TensorlineServerError):
    """The sandbox denied, stopped or could not host a node's call.

    ``kind`` says which: ``permission`` (a blocked syscall: EPERM/EACCES, seccomp, Landlock),
    ``memory`` / ``cpu`` / ``limit`` (a resource cap: memory, CPU, scratch quota, file size,
    descriptors, threads), ``crash`` (the worker died or was killed),
    ``protocol`` (the worker broke the control protocol), or one of ``FALLBACK_KINDS``. An
    unclassified failure is a ``crash``: it must never look eligible for an in-process retry.
    """

    reason = "SANDBOX_FAILURE"

    def __init__(self, node_id: str, cause: str, *, during: str = "process",
                 kind: str = "crash") -> None:
        self.node_id = node_id
        self.cause = cause
        self.during = during
        self.kind = kind
        super().__init__(f"node '{node_id}' failed in the sandbox during {during}: {cause}")

    @property
    def fallback_eligible(self) -> bool:
        """Whether the sandbox could not host the call at all (``FALLBACK_KINDS``), so an
        in-process retry runs nothing the sandbox refused."""
        return self.kind in FALLBACK_KINDS


class RuntimeUnavailable(TensorlineServerError):
    """The runtime chosen for a node is not on this server and the node may not fall back."""

    reason = "RUNTIME_UNAVAILABLE"

    def __init__(self, node_id: str, node_type: str, runtime: str, why: str) -> None:
        self.node_id = node_id
        self.runtime = runtime
        super().__init__(f"node '{node_id}' ({node_type}) must run in the {runtime} runtime, "
                         f"which is not available on this server: {why}")


class LayerMissing(TensorlineServerError):
    """Untrusted code was refused: a sandbox layer the operator requires for it
    (``sandbox_required_layers``) is not active on this host."""

    reason = "SANDBOX_LAYER_MISSING"

    def __init__(self, subject: str, layers: Sequence[str]) -> None:
        self.subject = subject
        self.layers = list(layers)
        super().__init__(f"{subject} is untrusted and was refused: the sandbox layer(s) "
                         f"{', '.join(self.layers)} required for untrusted code are not active "
                         "on this server (see GetServerInfo sandbox_layers)")


class DeadlineExceeded(TensorlineServerError):
    reason = "DEADLINE_EXCEEDED"


class SessionCancelled(TensorlineServerError):
    """The client cancelled its streaming session; everything stopped, no metrics."""

    reason = "CANCELLED"


class ServiceUnavailable(TensorlineServerError):
    reason = "UNAVAILABLE"


class PipelineNotFound(TensorlineServerError):
    """A request named a pipeline (or a version of one) the repository does not hold."""

    reason = "PIPELINE_NOT_FOUND"


class PipelineNotReady(ServiceUnavailable):
    """A named pipeline the repository knows but cannot run now (it failed to load, or was
    unloaded): UNAVAILABLE, as Triton answers for a model that is not ready."""

    reason = "PIPELINE_NOT_READY"
