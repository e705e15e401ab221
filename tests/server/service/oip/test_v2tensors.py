"""v2 tensors <-> pipeline values, every datatype both ways: raw and typed contents, BYTES
framing, the port kinds, declared datatype and shape, and what cannot be carried."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorline.oip.v2 import inference_pb2 as pb
from tensorline.server.service._v2tensors import (
    CONTENTS_FIELDS,
    DTYPES,
    InputTarget,
    OutputNotEncodable,
    decode_tensor,
    encode_output,
    frame_response,
    join_bytes_elements,
    split_bytes_elements,
)
from tensorline.wire import Audio, Json, Limits

LIMITS = Limits(max_tensor_bytes=1 << 20, max_json_depth=8)
TENSOR = InputTarget("tensor")


def tensor(datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)


def decode(message: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
           target: InputTarget = TENSOR) -> tuple[Any, list[str]]:
    value, problems = decode_tensor(message, raw, target, "inputs[0]", "model 'm' input 'x'",
                                    LIMITS)
    return value, [p.description for p in problems]


def sample(datatype: str) -> np.ndarray[Any, Any]:
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind == "f":
        return (np.arange(6).reshape(2, 3) / 3 - 1).astype(dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, info.max - 1, info.min + 1]], dtype=dtype)


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_numeric_datatype_round_trips_raw_bit_for_bit(datatype: str) -> None:
    array = sample(datatype)
    value, problems = decode(tensor(datatype, [2, 3]), array.tobytes())
    assert problems == []
    assert value.dtype == DTYPES[datatype] and value.shape == (2, 3)
    assert value.tobytes() == array.tobytes()
    out, raw = encode_output("y", value)
    assert (out.datatype, list(out.shape), raw) == (datatype, [2, 3], array.tobytes())


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "FP16"])
def test_typed_contents_of_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    message = tensor(datatype, [2, 3])
    getattr(message.contents, CONTENTS_FIELDS[datatype]).extend(array.reshape(-1).tolist())
    value, problems = decode(message, None)
    assert problems == []
    assert value.tobytes() == array.tobytes()


def test_typed_contents_problems() -> None:
    fp16 = tensor("FP16", [1])
    assert "FP16 has no typed contents field" in decode(fp16, None)[1][0]
    narrow = tensor("INT8", [1])
    narrow.contents.int_contents.append(300)
    assert "outside the range of INT8" in decode(narrow, None)[1][0]
    wrong_field = tensor("FP32", [1])
    wrong_field.contents.fp64_contents.append(1.0)
    assert "go in contents.fp32_contents, not contents.fp64_contents" in decode(
        wrong_field, None)[1][0]
    short = tensor("INT64", [3])
    short.contents.int64_contents.extend([1, 2])
    assert "holds 2 value(s) but the shape has 3" in decode(short, None)[1][0]


def test_bytes_framing() -> None:
    elements = [b"", b"a\x00b", bytes(range(256))]
    raw = join_bytes_elements(elements)
    assert split_bytes_elements(raw, 3) == elements
    assert split_bytes_elements(raw, 2) == "holds 3 element(s) but the shape has 2"
    assert split_bytes_elements(raw[:-1], 3) == "element 2 declares 256 bytes but only 255 remain"
    assert split_bytes_elements(raw + b"\x01", 3) == ("1 trailing byte(s) are not a 4-byte "
                                                      "element length")


@pytest.mark.parametrize(("kind", "element", "expected"), [
    ("binary", b"\x00\xff", b"\x00\xff"),
    ("any", b"\x00\xff", b"\x00\xff"),
    ("text", "héllo".encode(), "héllo"),
    ("json", b'{"a": [1, 2]}', Json({"a": [1, 2]})),
])
def test_one_bytes_element_per_kind(kind: str, element: bytes, expected: Any) -> None:
    value, problems = decode(tensor("BYTES", [1]), join_bytes_elements([element]),
                             InputTarget(kind))
    assert problems == [] and value == expected


def test_kind_problems() -> None:
    two = join_bytes_elements([b"a", b"b"])
    assert "a text input takes a BYTES tensor of one element, got BYTES of shape [2]" in decode(
        tensor("BYTES", [2]), two, InputTarget("text"))[1][0]
    assert "not UTF-8 text" in decode(tensor("BYTES", [1]), join_bytes_elements([b"\xff"]),
                                      InputTarget("text"))[1][0]
    deep = join_bytes_elements([b"[" * 9 + b"]" * 9])
    assert "nested 9 levels deep; the limit is 8" in decode(tensor("BYTES", [1]), deep,
                                                            InputTarget("json"))[1][0]
    assert "a tensor input takes a numeric datatype, not BYTES" in decode(
        tensor("BYTES", [1]), join_bytes_elements([b"a"]))[1][0]


def test_audio_takes_samples_and_a_sample_rate() -> None:
    samples = np.arange(4, dtype=np.int16)
    message = tensor("INT16", [4])
    assert "needs a positive int64 parameter 'sample_rate'" in decode(
        message, samples.tobytes(), InputTarget("audio"))[1][0]
    message.parameters["sample_rate"].int64_param = 16000
    value, problems = decode(message, samples.tobytes(), InputTarget("audio"))
    assert problems == [] and isinstance(value, Audio) and value.sample_rate == 16000
    out, raw = encode_output("y", value)
    assert (out.datatype, out.parameters["sample_rate"].int64_param, raw) == (
        "INT16", 16000, samples.tobytes())


def test_declared_datatype_and_shape_and_the_size_limit() -> None:
    declared = InputTarget("tensor", "FP32", (-1, 3))
    assert decode(tensor("FP32", [5, 3]), bytes(60), declared)[1] == []
    assert "expects FP32, got FP64" in decode(tensor("FP64", [1, 3]), bytes(24), declared)[1][0]
    assert "expects shape [-1, 3] (-1: any size), got [3]" in decode(
        tensor("FP32", [3]), bytes(12), declared)[1][0]
    assert "negative dimension in [-1]" in decode(tensor("FP32", [-1]), b"", TENSOR)[1][0]
    big = tensor("UINT8", [(1 << 20) + 1])
    value, problems = decode_tensor(big, bytes((1 << 20) + 1), TENSOR, "inputs[0]", "x", LIMITS)
    assert value is None and problems[0].kind == "limit"


def test_outputs_of_every_kind() -> None:
    for value, expected in ((b"\x00z", b"\x00z"), ("é", "é".encode()),
                            (Json({"k": 1}), b'{"k":1}')):
        out, raw = encode_output("y", value)
        assert (out.datatype, list(out.shape)) == ("BYTES", [1])
        assert raw == join_bytes_elements([expected])
    big_endian = np.arange(3, dtype=">i4")
    out, raw = encode_output("y", big_endian)
    assert (out.datatype, raw) == ("INT32", np.arange(3, dtype="<i4").tobytes())
    transposed = np.arange(6.0).reshape(2, 3).T
    out, raw = encode_output("y", transposed)
    assert (list(out.shape), raw) == ([3, 2], np.ascontiguousarray(transposed).tobytes())
    with pytest.raises(OutputNotEncodable, match="dtype complex64"):
        encode_output("y", np.zeros(2, np.complex64))


def test_outputs_are_checked_against_their_declaration() -> None:
    value = np.zeros((2, 3), np.float32)
    assert encode_output("y", value, "FP32", (-1, 3))[0].datatype == "FP32"
    with pytest.raises(OutputNotEncodable, match=r"is FP32 of shape \[2, 3\]; the manifest "
                                                 r"declares FP64 \[-1, 3\]"):
        encode_output("y", value, "FP64", (-1, 3))
    with pytest.raises(OutputNotEncodable, match=r"declares \[6\]"):
        encode_output("y", value, None, (6,))


def test_a_framed_response_parses_as_tritons() -> None:
    from tritonclient.grpc import service_pb2

    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    raws = []
    for name, value in (("a", np.arange(300, dtype=np.int64)), ("b", b"x" * 200),
                        ("c", np.zeros((0, 3), np.float32))):
        tensor, raw = encode_output(name, value)
        response.outputs.append(tensor)
        raws.append(raw)
    parsed = service_pb2.ModelInferResponse.FromString(frame_response(response, raws))
    assert (parsed.model_name, parsed.id, [o.name for o in parsed.outputs]) == ("m", "r",
                                                                               ["a", "b", "c"])
    assert list(parsed.raw_output_contents) == [np.arange(300, dtype=np.int64).tobytes(),
                                                join_bytes_elements([b"x" * 200]), b""]
