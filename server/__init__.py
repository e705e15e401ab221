"""tensorline server: runs pipelines of Python nodes over tensors, in-process or sandboxed.

    server, port = await create_server(Settings(port=0))
    await server.start()
    ...
    await server.stop()

The command line (``tensorline.client.cli``) uses ``run_server`` (serve, demo),
``check_manifest`` (validate) and ``local_catalogue`` (nodes), which raise ``SetupError``.
"""

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
from tensorline.server.service import (
    PIPELINE_HEALTH_PREFIX,
    TensorlineServer,
    create_server,
    serve,
)

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
