"""Generated protocol buffers and gRPC stubs of the tensorline v1 wire protocol.

The modules beside this file are generated from ``tensorline.proto`` by ``grpc_tools.protoc``
and committed; ``tests/protos/test_stub_drift.py`` fails when they drift from the .proto source.
Regenerate with ``python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos
--grpc_python_out=protos protos/tensorline/v1/tensorline.proto``.
"""

from tensorline.v1 import tensorline_pb2 as _pb

PROTOCOL_VERSION = "v1"

# The gRPC service's full name ("tensorline.v1.PipelineService"), from the generated descriptor.
SERVICE_NAME: str = _pb.DESCRIPTOR.services_by_name["PipelineService"].full_name
