"""tensorline server: runs pipelines of Python nodes over tensors, in-process or sandboxed.

    server, port = await create_server(Settings(port=0))
    await server.start()
    ...
    await server.stop()

Names are imported on first use (PEP 562): ``import tensorline.server.runtime.sandbox._zygote``
(the sandbox launcher) or ``tensorline.server.nodes`` (node authors) then costs no gRPC service,
executor or settings import, which matters to cold start (see docs/performance.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorline.server._errors import (
        DeadlineExceeded,
        LimitExceeded,
        NodeFailed,
        PermissionDenied,
        RequestInvalid,
        SandboxFailure,
        ServiceUnavailable,
        TensorlineServerError,
    )
    from tensorline.server._eventloop import run as run_on_event_loop
    from tensorline.server._logging import JsonFormatter, configure_logging
    from tensorline.server._preload import PreloadError
    from tensorline.server._prestart import prestart as prestart_launcher
    from tensorline.server._settings import Settings
    from tensorline.server._version import __version__
    from tensorline.server.executor import PipelineEngine
    from tensorline.server.service import TensorlineServer, create_server, serve

# Exported name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "DeadlineExceeded": ("tensorline.server._errors", "DeadlineExceeded"),
    "LimitExceeded": ("tensorline.server._errors", "LimitExceeded"),
    "NodeFailed": ("tensorline.server._errors", "NodeFailed"),
    "PermissionDenied": ("tensorline.server._errors", "PermissionDenied"),
    "RequestInvalid": ("tensorline.server._errors", "RequestInvalid"),
    "SandboxFailure": ("tensorline.server._errors", "SandboxFailure"),
    "ServiceUnavailable": ("tensorline.server._errors", "ServiceUnavailable"),
    "TensorlineServerError": ("tensorline.server._errors", "TensorlineServerError"),
    "run_on_event_loop": ("tensorline.server._eventloop", "run"),
    "JsonFormatter": ("tensorline.server._logging", "JsonFormatter"),
    "configure_logging": ("tensorline.server._logging", "configure_logging"),
    "PreloadError": ("tensorline.server._preload", "PreloadError"),
    "prestart_launcher": ("tensorline.server._prestart", "prestart"),
    "Settings": ("tensorline.server._settings", "Settings"),
    "__version__": ("tensorline.server._version", "__version__"),
    "PipelineEngine": ("tensorline.server.executor", "PipelineEngine"),
    "TensorlineServer": ("tensorline.server.service", "TensorlineServer"),
    "create_server": ("tensorline.server.service", "create_server"),
    "serve": ("tensorline.server.service", "serve"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DeadlineExceeded",
    "JsonFormatter",
    "LimitExceeded",
    "NodeFailed",
    "PermissionDenied",
    "PipelineEngine",
    "PreloadError",
    "RequestInvalid",
    "SandboxFailure",
    "ServiceUnavailable",
    "Settings",
    "TensorlineServer",
    "TensorlineServerError",
    "__version__",
    "configure_logging",
    "create_server",
    "prestart_launcher",
    "run_on_event_loop",
    "serve",
]
