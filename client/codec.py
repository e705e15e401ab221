"""The wire codec, public: encode/decode tensorline v1 messages (used by client and server)."""

from tensorline.client._codec import (
    SUPPORTED_DTYPES,
    DecodedExecuteRequest,
    DecodedExecuteResponse,
    Limits,
    MalformedMessage,
    PortItem,
    Violation,
    as_wire_array,
    decode_execute_request,
    decode_execute_response,
    encode_execute_request,
    encode_execute_response,
    encode_value,
    numpy_dtype,
    wire_dtype,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "DecodedExecuteRequest",
    "DecodedExecuteResponse",
    "Limits",
    "MalformedMessage",
    "PortItem",
    "Violation",
    "as_wire_array",
    "decode_execute_request",
    "decode_execute_response",
    "encode_execute_request",
    "encode_execute_response",
    "encode_value",
    "numpy_dtype",
    "wire_dtype",
]
