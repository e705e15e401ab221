"""The Open Inference Protocol's fast paths against the general ones they stand in for.

``plain_input`` either declines (None) or gives exactly what ``decode_tensor`` gives, across
every datatype and a set of good and bad tensors; ``frame_plain_response`` either declines or
makes exactly the bytes of the generated serializer plus ``frame_response``, across every
datatype, shapes (0-d, empty, dimensions past one varint byte), layouts and request ids; and
declines whatever the general path would refuse or encode differently."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorline.oip.v2 import inference_pb2 as pb
from tensorline.server.service._v2tensors import (
    DTYPES,
    InputTarget,
    OutputNotEncodable,
    decode_tensor,
    encode_output,
    frame_plain_response,
    frame_response,
    plain_input,
    response_head,
)
from tensorline.wire import Limits

LIMITS = Limits(max_tensor_bytes=1 << 16, max_json_depth=8)


def tensor(datatype: str, shape: list[int], **parameters: int) -> Any:
    message = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)
    for key, value in parameters.items():
        message.parameters[key].int64_param = value
    return message


# (datatype, shape, raw size) of tensors; the targets they are decoded for.
INPUTS = [
    *[(datatype, [2, 3], 6 * dtype.itemsize) for datatype, dtype in DTYPES.items()],
    ("FP32", [], 4), ("FP32", [0, 3], 0), ("FP32", [1, 300], 1200), ("FP32", [2, 3], 20),
    ("FP32", [-1], 0), ("FP32", [2, -3], 24), ("BYTES", [1], 5), ("FP8", [1], 1),
    ("UINT8", [(1 << 16) + 1], (1 << 16) + 1), ("UINT8", [1 << 16], 1 << 16),
]
TARGETS = [InputTarget("tensor"), InputTarget("any"), InputTarget("text"),
           InputTarget("audio", "FP32"), InputTarget("tensor", "FP32"),
           InputTarget("tensor", "FP32", (-1, 3)), InputTarget("tensor", "FP32", (2, 3)),
           InputTarget("tensor", None, (1, -1)), InputTarget("tensor", "INT64", (2, 3))]


@pytest.mark.parametrize("target", TARGETS, ids=repr)
def test_plain_input_declines_or_decodes_as_the_general_path(target: InputTarget) -> None:
    taken = 0
    for datatype, shape, size in INPUTS:
        message = tensor(datatype, shape)
        raw = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        fast = plain_input(message, raw, target.kind, target.datatype, target.shape,
                           LIMITS.max_tensor_bytes)
        if fast is None:
            continue
        taken += 1
        general, problems = decode_tensor(message, raw, target, "inputs[0]", "x", LIMITS)
        assert problems == [], (datatype, shape, size)
        assert (fast.dtype, fast.shape) == (general.dtype, general.shape)
        assert fast.tobytes() == general.tobytes()
    # The cases a tensor port takes do take the fast path (the test cannot pass vacuously).
    assert taken >= (0 if target.kind not in ("tensor", "any") else 1)


def test_plain_input_declines_what_only_the_general_path_reads() -> None:
    raw = bytes(24)
    target = ("tensor", "FP32", None, LIMITS.max_tensor_bytes)
    assert plain_input(tensor("FP32", [2, 3]), raw, *target) is not None
    assert plain_input(tensor("FP32", [2, 3]), raw, "text", None, None, 0) is None
    assert plain_input(tensor("FP32", [2, 3]), raw, "tensor", "FP64", None, 0) is None
    assert plain_input(tensor("FP32", [2, 3]), raw[:-1], *target) is None
    assert plain_input(tensor("FP32", [6, -1]), raw, *target) is None
    assert plain_input(tensor("BYTES", [1]), b"\x01\x00\x00\x00a", "any", None, None, 0) is None


def framed_in_general(model: str, version: str, request_id: str,
                      outputs: list[tuple[str, Any]]) -> bytes:
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    raws = []
    for name, value in outputs:
        out, raw = encode_output(name, value)
        response.outputs.append(out)
        raws.append(raw)
    return frame_response(response, raws)


def arrays() -> list[np.ndarray[Any, Any]]:
    out: list[np.ndarray[Any, Any]] = []
    for dtype in DTYPES.values():
        out.append((np.arange(12) % 2).astype(dtype).reshape(3, 4))
    out += [np.array(3.5, np.float32), np.zeros((0, 3), np.float32),
            np.arange(300 * 2, dtype=np.float32).reshape(2, 300),
            np.arange(20000, dtype=np.uint8), np.arange(12.0).reshape(3, 4).T,
            np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
            np.arange(24, dtype=np.int16)[::2]]
    return out


@pytest.mark.parametrize("request_id", ["", "r-1", "é" * 70])
def test_a_plain_response_is_the_bytes_of_the_general_framing(request_id: str) -> None:
    head = response_head("model", "7")
    for index, value in enumerate(arrays()):
        outputs = [("OUT", value), (f"second{index}", value[..., :1] if value.ndim else value)]
        fast = frame_plain_response(head, request_id,
                                    [(name, None, None, v) for name, v in outputs])
        assert fast == framed_in_general("model", "7", request_id, outputs), value.dtype


def test_a_plain_response_declines_what_the_general_path_encodes_otherwise() -> None:
    head = response_head("m", "1")
    value = np.zeros((2, 3), np.float32)
    assert frame_plain_response(head, "", [("y", "FP32", (-1, 3), value)]) is not None
    for declared, shape, other in [("FP64", None, value), (None, (6,), value),
                                   (None, (2, 3, 1), value), ("FP32", (3, -1), value),
                                   (None, None, value.astype(">f4")),
                                   (None, None, np.zeros(2, np.complex64)),
                                   (None, None, b"bytes"), (None, None, np.float32(1.0))]:
        assert frame_plain_response(head, "", [("y", declared, shape, other)]) is None
    # ... and those the general path refuses, it refuses.
    with pytest.raises(OutputNotEncodable):
        encode_output("y", value, "FP64", None)
