"""Generated protocol buffers of the Open Inference Protocol (KServe v2) gRPC messages.

``inference_pb2`` is generated from ``inference.proto`` by ``grpc_tools.protoc`` and committed
(``tests/protos/test_stub_drift.py`` fails when it drifts). Regenerate with ``python -m
grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos
protos/tensorline/oip/v2/inference.proto``.

The messages are wire-compatible with KServe v2 / Triton's ``inference`` package under a package
name of their own (``tensorline.oip.v2``), so they never collide with a client library's
``inference`` messages in one process. The service is served at the path clients call:
``SERVICE_NAME``.
"""

from tensorline.oip.v2 import inference_pb2 as _pb

# The gRPC service name Triton and KServe clients call ("/inference.GRPCInferenceService/...").
SERVICE_NAME = "inference.GRPCInferenceService"

# The methods tensorline implements, from the .proto's service (its own package's name aside).
METHODS: tuple[str, ...] = tuple(
    method.name for method in _pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)

__all__ = ["METHODS", "SERVICE_NAME"]
