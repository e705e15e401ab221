"""How a sandbox worker reports a failure: the ``error`` reply for an exception, with the
``kind`` the server classifies it by (``_messages.ERROR_KINDS``).

``memory``, ``permission`` and ``limit`` are failures the sandbox caused (a cap or a blocked
syscall, found anywhere in the exception's chain); a node class that cannot be loaded in the
worker is ``import`` (or ``memory``); everything else is the node's own (``node``).
"""

from __future__ import annotations

import errno
from typing import Any

from tensorline.server.runtime.sandbox import _isolation
from tensorline.server.runtime.sandbox._messages import LIMIT, MEMORY, NODE, PERMISSION, error


class _LoadFailed(Exception):
    """The node class could not be imported in the worker (classified as the sandbox's doing:
    in the server the same import had succeeded)."""

    def __init__(self, kind: str, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.exc_type, self.message = kind, exc_type, message

def _failure(exc: BaseException, during: str) -> tuple[Any, ...]:
    """The ``error`` reply for an exception a node method (or loading the node) raised
    ``during`` initialize or process; the CPU reading is taken last."""
    if isinstance(exc, _LoadFailed):
        kind, exc_type, message = exc.kind, exc.exc_type, exc.message
    elif isinstance(exc, KeyboardInterrupt | SystemExit):
        # A node calling sys.exit() must not end the worker silently.
        kind, exc_type, message = NODE, type(exc).__name__, str(exc)
    else:
        kind, exc_type, message = classify(exc), type(exc).__name__, describe(exc)
    return error(kind, exc_type, message, _isolation.cpu_used(), during)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# A cap of the sandbox, hit: the scratch quota, the file size, descriptors, threads.
_LIMIT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EMFILE, errno.ENFILE})


def classify(exc: BaseException) -> str:
    """``memory`` / ``permission`` / ``limit`` for failures the sandbox causes, ``node``
    otherwise."""
    for item in _chain(exc):
        if isinstance(item, MemoryError) or (
                isinstance(item, OSError) and item.errno == errno.ENOMEM):
            return MEMORY
        if isinstance(item, OSError) and item.errno in (errno.EPERM, errno.EACCES):
            return PERMISSION
        if isinstance(item, OSError) and item.errno in _LIMIT_ERRNOS:
            return LIMIT
        if isinstance(item, RuntimeError) and "can't start new thread" in str(item):
            return LIMIT
    return NODE


def describe(exc: BaseException) -> str:
    text = str(exc)
    if classify(exc) == PERMISSION:
        for item in _chain(exc):
            if isinstance(item, OSError) and item.errno in (errno.EPERM, errno.EACCES):
                if item is not exc:
                    text = f"{text} (caused by {type(item).__name__}: {item})"
                break
    return text
