"""tensorline server: runs pipelines of Python nodes over tensors, in-process or sandboxed.

    server, port = await create_server(Settings(port=0))
    await server.start()
    ...
    await server.stop()
"""

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
from tensorline.server._eventloop import run as run_on_event_loop
from tensorline.server._logging import JsonFormatter, configure_logging
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
    "JsonFormatter",
    "LimitExceeded",
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
    "TensorlineServer",
    "TensorlineServerError",
    "__version__",
    "configure_logging",
    "create_server",
    "run_on_event_loop",
    "serve",
]
