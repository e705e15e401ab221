"""The wire package: what the client and the server share about the tensorline v1 protocol.

The generated messages are ``tensorline.v1``; this package converts between them and Python
values (numpy arrays, ``Audio``, ``Json``, text, bytes) without extra copies, bounds what a
peer may send (``Limits``), and parses request JSON with depth and size limits. Both ends
import it; neither imports the other's modules.

Modules: ``_values`` (the value types), ``_json`` (bounded JSON parsing), ``_codec`` (message
framing, tensors and values on raw protobuf bytes), ``_unary`` (ExecutePipeline's messages),
``_streams`` (StreamPipeline's messages), ``_layouts`` (messages that repeat an earlier one's
layout, decoded without parsing).
"""

from tensorline.wire._codec import (
    BAD_CONTENT,
    SENDABLE_DTYPES,
    SUPPORTED_DTYPES,
    DecodedExecuteRequest,
    DecodedExecuteResponse,
    Limits,
    MalformedMessage,
    PortItem,
    Violation,
    as_wire_array,
    encode_port_value,
    encode_value,
    join,
    numpy_dtype,
    wire_dtype,
)
from tensorline.wire._json import JsonRejected, json_depth, loads
from tensorline.wire._streams import (
    DecodedStreamChunk,
    DecodedStreamRequest,
    DecodedStreamResponse,
    StreamItem,
    decode_stream_chunk,
    decode_stream_request,
    decode_stream_response,
    encode_stream_cancel,
    encode_stream_chunk,
    encode_stream_close,
    encode_stream_init,
    encode_stream_item,
    encode_stream_results,
    scan_top_level,
)
from tensorline.wire._unary import (
    NodeFigures,
    decode_execute_request,
    decode_execute_response,
    encode_execute_request,
    encode_execute_response,
    encode_execution_metrics,
    node_metrics,
)
from tensorline.wire._values import Audio, Json, Tagged, kind_of
from tensorline.wire._yaml import safe_load as load_yaml
from tensorline.wire._yaml import syntax_error as yaml_syntax_error

__all__ = [
    "BAD_CONTENT",
    "SENDABLE_DTYPES",
    "SUPPORTED_DTYPES",
    "Audio",
    "DecodedExecuteRequest",
    "DecodedExecuteResponse",
    "DecodedStreamChunk",
    "DecodedStreamRequest",
    "DecodedStreamResponse",
    "Json",
    "JsonRejected",
    "Limits",
    "MalformedMessage",
    "NodeFigures",
    "PortItem",
    "StreamItem",
    "Tagged",
    "Violation",
    "as_wire_array",
    "decode_execute_request",
    "decode_execute_response",
    "decode_stream_chunk",
    "decode_stream_request",
    "decode_stream_response",
    "encode_execute_request",
    "encode_execute_response",
    "encode_execution_metrics",
    "encode_port_value",
    "encode_stream_cancel",
    "encode_stream_chunk",
    "encode_stream_close",
    "encode_stream_init",
    "encode_stream_item",
    "encode_stream_results",
    "encode_value",
    "join",
    "json_depth",
    "kind_of",
    "load_yaml",
    "loads",
    "node_metrics",
    "numpy_dtype",
    "scan_top_level",
    "wire_dtype",
    "yaml_syntax_error",
]
