"""How the sandbox runtime reports failures.

The node's own exceptions are ``NodeFailed`` (raised by the call path); failures of the sandbox
are ``WorkerFailure``, a ``SandboxFailure`` with ``during`` (``initialize`` / ``process``), a
machine-readable ``kind`` and ``fallback_eligible``, which the executor's fallback rule reads.
``ModuleUnavailable`` is an untrusted module that cannot be imported or described in its
worker; ``_WorkerGone`` (internal) a request that never reached its worker, which is always safe
to send to another one.
"""

from __future__ import annotations

import signal

from tensorline.server._errors import SandboxFailure


class ModuleUnavailable(Exception):
    """An untrusted module could not be imported or described in its sandboxed worker."""

    def __init__(self, module: str, cause: str) -> None:
        super().__init__(f"untrusted module {module} could not be loaded in the sandbox: {cause}")
        self.module = module
        self.cause = cause


class WorkerFailure(SandboxFailure):
    """A ``SandboxFailure`` with a machine-readable ``kind``, for the executor's fallback.

    Kinds: ``permission`` (a blocked syscall surfaced as EPERM/EACCES), ``memory`` (MemoryError
    under the cap), ``import`` (the node class cannot be loaded in the worker), ``crash`` (the
    worker died: signal or exit), ``cpu`` (SIGXCPU), ``protocol`` (the worker broke the control
    protocol), ``unavailable`` (no worker could be started).
    """

    # An import the worker reports as failed may itself have hit the sandbox (module code that
    # opens a socket or a file outside the allow-list): that is a denial, not a load failure.
    _DENIAL_MARKS = ("PermissionError", "[Errno 1]", "[Errno 13]", "Operation not permitted",
                     "Permission denied", "MemoryError")

    def __init__(self, node_id: str, cause: str, *, during: str, kind: str) -> None:
        super().__init__(node_id, cause, during=during, kind=kind)

    @property
    def fallback_eligible(self) -> bool:
        """Only when the worker could not host the node at all (no worker, a class that cannot
        be loaded there, values that cannot cross); never for what the sandbox denied or
        stopped, whether during initialize or process."""
        if self.kind == "import" and any(mark in self.cause for mark in self._DENIAL_MARKS):
            return False
        return super().fallback_eligible


class _WorkerGone(Exception):
    """The worker died before the request could be sent (the caller may re-create and retry)."""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
