"""tensorline server: runs pipelines of Python nodes over tensors, in-process or sandboxed.

    server, port = await create_server(Settings(port=0))
    await server.start()
    ...
    await server.stop()

The command line (the client package's ``cli``) uses ``run_server`` (serve, demo),
``check_manifest`` (validate) and ``local_catalogue`` (nodes), which raise ``SetupError``.

Names are imported on first use (PEP 562): importing a submodule (the sandbox launcher imports
``tensorline.server.runtime.sandbox._zygote``, node authors ``tensorline.server.nodes``) then
costs no gRPC service, executor or settings import, which matters to cold start (see
docs/performance.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorline.server._entry import (
        ManifestCheck,
        SetupError,
        check_manifest,
        local_catalogue,
        run_server,
    )
    from tensorline.server._errors import (
        DeadlineExceeded,
        LimitExceeded,
        NodeFailed,
        PermissionDenied,
        PipelineNotFound,
        RequestInvalid,
        SandboxFailure,
        ServiceUnavailable,
        TensorlineServerError,
    )
    from tensorline.server._preload import PreloadError
    from tensorline.server._settings import Settings
    from tensorline.server._version import __version__
    from tensorline.server.executor import PipelineEngine
    from tensorline.server.repository import PipelineRepository
    from tensorline.server.service import PIPELINE_HEALTH_PREFIX, TensorlineServer, create_server, serve

# Exported name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "PIPELINE_HEALTH_PREFIX": "tensorline.server.service",
    "DeadlineExceeded": "tensorline.server._errors",
    "LimitExceeded": "tensorline.server._errors",
    "ManifestCheck": "tensorline.server._entry",
    "NodeFailed": "tensorline.server._errors",
    "PermissionDenied": "tensorline.server._errors",
    "PipelineEngine": "tensorline.server.executor",
    "PipelineNotFound": "tensorline.server._errors",
    "PipelineRepository": "tensorline.server.repository",
    "PreloadError": "tensorline.server._preload",
    "RequestInvalid": "tensorline.server._errors",
    "SandboxFailure": "tensorline.server._errors",
    "ServiceUnavailable": "tensorline.server._errors",
    "Settings": "tensorline.server._settings",
    "SetupError": "tensorline.server._entry",
    "TensorlineServer": "tensorline.server.service",
    "TensorlineServerError": "tensorline.server._errors",
    "__version__": "tensorline.server._version",
    "check_manifest": "tensorline.server._entry",
    "create_server": "tensorline.server.service",
    "local_catalogue": "tensorline.server._entry",
    "run_server": "tensorline.server._entry",
    "serve": "tensorline.server.service",
}


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "PIPELINE_HEALTH_PREFIX",
    "DeadlineExceeded",
    "LimitExceeded",
    "ManifestCheck",
    "NodeFailed",
    "PermissionDenied",
    "PipelineEngine",
    "PipelineNotFound",
    "PipelineRepository",
    "PreloadError",
    "RequestInvalid",
    "SandboxFailure",
    "ServiceUnavailable",
    "Settings",
    "SetupError",
    "TensorlineServer",
    "TensorlineServerError",
    "__version__",
    "check_manifest",
    "create_server",
    "local_catalogue",
    "run_server",
    "serve",
]
