"""The stream messages of the codec: byte-exact with protobuf, zero-copy, violations not raises."""

from __future__ import annotations

import numpy as np
import pytest

from tensorline.client import Audio, Json, Tagged
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import (
    Limits,
    StreamItem,
    decode_stream_request,
    decode_stream_response,
    encode_stream_cancel,
    encode_stream_chunk,
    encode_stream_close,
    encode_stream_init,
    encode_stream_results,
)

VALUES = [np.arange(6, dtype=">i2").reshape(2, 3), np.asarray(2.5), np.zeros((0, 3), np.float32),
          np.ones((4, 2), np.complex64)[:, :1], np.array([True, False]),
          Audio(np.arange(8, dtype=np.int16), 16000), "text", Json({"a": [1, 2]}), b"\x00\x01",
          Tagged(np.arange(3.0), {"k": "v"})]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("sequence", [0, 7, -1, 1 << 40])
def test_chunk_round_trip_and_protobuf_agree(value: object, sequence: int) -> None:
    raw = encode_stream_chunk(sequence, "node", "port", value)
    parsed = pb.StreamRequest.FromString(raw)
    assert (parsed.data.sequence, parsed.data.node_id, parsed.data.port) == (sequence, "node",
                                                                            "port")
    decoded = decode_stream_request(raw)
    assert decoded.kind == "data" and not decoded.violations
    assert decoded.chunk is not None and decoded.chunk.sequence == sequence
    got = decoded.chunk.item.value
    if isinstance(value, np.ndarray):
        assert got.shape == value.shape and np.array_equal(got, value)
    elif isinstance(value, Audio):
        assert np.array_equal(got.samples, value.samples) and got.sample_rate == 16000
    elif isinstance(value, Tagged):
        assert got.metadata == value.metadata and np.array_equal(got.value, value.value)
    else:
        assert got == value


def test_tensor_chunks_decode_as_views_of_the_message() -> None:
    raw = encode_stream_chunk(1, "n", "", np.arange(1024, dtype=np.float32))
    value = decode_stream_request(raw).chunk.item.value  # type: ignore[union-attr]
    assert value.base is not None and not value.flags.writeable  # a view, no copy


def test_control_messages() -> None:
    init = decode_stream_request(encode_stream_init('{"nodes": []}', 8))
    assert init.kind == "init" and init.init is not None and init.init.queue_size == 8
    named = decode_stream_request(encode_stream_init("", 0, "scaler", 2)).init
    assert named is not None
    assert (named.manifest_json, named.pipeline, named.pipeline_version) == ("", "scaler", 2)
    assert decode_stream_request(encode_stream_close()).kind == "close"
    cancel = decode_stream_request(encode_stream_cancel("bye"))
    assert cancel.kind == "cancel" and cancel.cancel_reason == "bye"


def test_bad_requests_become_violations() -> None:
    assert decode_stream_request(b"").violations[0].field == "request"
    assert "malformed" in decode_stream_request(b"\x12\x05ab").violations[0].description
    bad = pb.StreamRequest(data=pb.StreamChunk(node_id="n", value=pb.Value(
        tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\x00" * 8)))).SerializeToString()
    assert decode_stream_request(bad).violations[0].field == "data.value.tensor.data"
    big = encode_stream_chunk(0, "n", "", np.zeros(100, np.float32))
    limited = decode_stream_request(big, Limits(max_tensor_bytes=100))
    assert limited.violations[0].kind == "limit"


def test_results_single_and_batched() -> None:
    one = [StreamItem(3, "a", "out", np.arange(3))]
    assert pb.StreamResponse.FromString(encode_stream_results(one)).WhichOneof("kind") == "result"
    many = [StreamItem(i, "a", "out", np.full(2, i)) for i in range(5)] + [
        StreamItem(-1, "b", "total", "done")]
    raw = encode_stream_results(many)
    assert len(pb.StreamResponse.FromString(raw).results.results) == 6
    decoded = decode_stream_response(raw)
    assert decoded.kind == "results"
    assert [(r.sequence, r.node_id, r.port) for r in decoded.results] == [
        (i, "a", "out") for i in range(5)] + [(-1, "b", "total")]
    assert decoded.results[-1].value == "done"


def test_error_message() -> None:
    raw = pb.StreamResponse(error=pb.StreamError(status=b"\x08\x02")).SerializeToString()
    decoded = decode_stream_response(raw)
    assert decoded.kind == "error" and decoded.error_status == b"\x08\x02"
