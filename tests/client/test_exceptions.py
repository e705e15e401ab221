"""The client's exception tree: one mapping from gRPC status (with rich details) to exceptions."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tensorline.client import (
    AuthenticationError,
    CallCancelledError,
    DeadlineExceededError,
    FieldViolation,
    InvalidRequestError,
    LimitExceededError,
    NodeError,
    PermissionDeniedError,
    RequestError,
    SandboxError,
    ServerError,
    TensorlineError,
    TransportError,
    from_rpc_error,
)


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, *rich: Any) -> None:
        self._code, self._details = code, details
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=details)
        for message in rich:
            packed = any_pb2.Any()
            packed.Pack(message)
            status.details.append(packed)
        self._trailing = (("grpc-status-details-bin", status.SerializeToString()),) if rich else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


@pytest.mark.parametrize(("code", "cls", "parent"), [
    (grpc.StatusCode.UNAVAILABLE, TransportError, TensorlineError),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError, RequestError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, LimitExceededError, RequestError),
    (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError, RequestError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError, RequestError),
    (grpc.StatusCode.ABORTED, SandboxError, TensorlineError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError, TensorlineError),
    (grpc.StatusCode.CANCELLED, CallCancelledError, TensorlineError),
    (grpc.StatusCode.INTERNAL, ServerError, TensorlineError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError, TensorlineError),
    (grpc.StatusCode.UNKNOWN, ServerError, TensorlineError),  # UNKNOWN without NODE_ERROR
])
def test_status_codes_map_to_the_tree(code: grpc.StatusCode, cls: type, parent: type) -> None:
    error = from_rpc_error(FakeError(code, "something"))
    assert type(error) is cls
    assert isinstance(error, parent)
    assert error.code == code
    assert error.message == "something"


def test_node_error_details() -> None:
    info = error_details_pb2.ErrorInfo(reason="NODE_ERROR", domain="tensorline.dev", metadata={
        "node_id": "resample", "exception_type": "ZeroDivisionError"})
    error = from_rpc_error(FakeError(grpc.StatusCode.UNKNOWN, "node 'resample' failed", info))
    assert isinstance(error, NodeError)
    assert (error.node_id, error.exception_type, error.reason) == (
        "resample", "ZeroDivisionError", "NODE_ERROR")


def test_bad_request_and_retry_info() -> None:
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="nodes[0].id", description="dup"),
        error_details_pb2.BadRequest.FieldViolation(field="inputs", description="missing")])
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1,
                                                                          nanos=500_000_000))
    error = from_rpc_error(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", bad, retry))
    assert isinstance(error, LimitExceededError)
    assert error.violations == [FieldViolation("nodes[0].id", "dup"),
                                FieldViolation("inputs", "missing")]
    assert error.retry_after_s == 1.5


def test_sandbox_error_names_the_node() -> None:
    info = error_details_pb2.ErrorInfo(reason="SANDBOX_FAILURE", metadata={"node_id": "w"})
    error = from_rpc_error(FakeError(grpc.StatusCode.ABORTED, "worker died", info))
    assert isinstance(error, SandboxError)
    assert error.node_id == "w"


def test_empty_details_fall_back_to_the_code_name() -> None:
    error = from_rpc_error(FakeError(grpc.StatusCode.INTERNAL, ""))
    assert error.message == "INTERNAL"
