"""The gRPC surface: service methods, error translation and the server factory."""

from tensorline.server.service._server import (
    PIPELINE_HEALTH_PREFIX,
    TensorlineServer,
    build_engine,
    create_server,
    grpc_options,
    serve,
)
from tensorline.server.service._service import PipelineService, catalogue
from tensorline.server.service._status import status_code_of, to_status
from tensorline.v1 import SERVICE_NAME

__all__ = [
    "PIPELINE_HEALTH_PREFIX",
    "SERVICE_NAME",
    "PipelineService",
    "TensorlineServer",
    "build_engine",
    "catalogue",
    "create_server",
    "grpc_options",
    "serve",
    "status_code_of",
    "to_status",
]
