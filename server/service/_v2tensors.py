"""Open Inference Protocol (KServe v2) tensors <-> pipeline values.

Inputs arrive either as ``raw_input_contents`` (one bytes entry per input, little-endian
row-major; BYTES elements each framed by a 4-byte little-endian length, as Triton frames them)
or as typed ``contents`` (``fp32_contents`` and so on); a numeric raw tensor becomes a read-only
numpy view over the received bytes, no copy. What a port receives follows its kind: a tensor
port gets the numeric array; a ``binary`` / ``text`` / ``json`` port gets the one element of a
BYTES tensor as bytes / UTF-8 text / a JSON document; an ``any`` port either (a numeric array,
or the bytes of a one-element BYTES tensor); an ``audio`` port gets the samples with the
tensor's ``sample_rate`` parameter. Pipeline values are numeric tensors or single values (no
node passes an array of strings), so a BYTES tensor carries one element.

Outputs go back as ``raw_output_contents`` (what tritonclient's ``as_numpy`` reads): arrays by
their dtype, bytes / text / JSON as a one-element BYTES tensor, audio as its samples with a
``sample_rate`` parameter.

Decoding never raises on content: every problem is a ``Violation`` with the request's field path
and the model and input names, so the caller reports all of them at once.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorline.oip.v2 import inference_pb2 as pb
from tensorline.server._errors import Violation
from tensorline.wire import Audio, Json, JsonRejected, Limits, Tagged, loads

# The v2 datatypes with a fixed-size numpy dtype (little-endian, as the protocol's raw bytes).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
DATATYPES: tuple[str, ...] = (*DTYPES, BYTES)
_DATATYPE_OF: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DTYPES.items()}

# Which typed ``contents`` field carries each datatype (the protocol has none for FP16: it
# travels only as raw bytes).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}

# The parameter that carries an audio tensor's sample rate, in and out.
SAMPLE_RATE = "sample_rate"

_LENGTH = struct.Struct("<I")

# An output's raw contents: bytes, or a view of an array's bytes.
Raw = bytes | memoryview
# ModelInferResponse.raw_output_contents: its field number, length-delimited.
_RAW_OUTPUT_TAG = bytes([pb.ModelInferResponse.DESCRIPTOR.fields_by_name[
    "raw_output_contents"].number << 3 | 2])


@dataclass(frozen=True, slots=True)
class InputTarget:
    """What a decoded tensor is for: its port's kind and the manifest's declarations."""

    kind: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None


def datatype_of(dtype: np.dtype[Any]) -> str | None:
    """The v2 datatype of a numpy dtype (either byte order), None when it has none."""
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    return _DATATYPE_OF.get(little)


def _element_count(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def fits(declared: tuple[int, ...] | None, shape: Sequence[int]) -> bool:
    """Whether ``shape`` is one the manifest's ``declared`` shape admits (-1: any size; None:
    any shape)."""
    if declared is None:
        return True
    if len(shape) != len(declared):
        return False
    return all(want in (-1, got) for want, got in zip(declared, shape, strict=True))


def split_bytes_elements(raw: bytes, count: int) -> list[bytes] | str:
    """The elements of a raw BYTES tensor, or what is wrong with the framing."""
    elements: list[bytes] = []
    position, size = 0, len(raw)
    while position < size:
        if size - position < 4:
            return f"{size - position} trailing byte(s) are not a 4-byte element length"
        (length,) = _LENGTH.unpack_from(raw, position)
        position += 4
        if length > size - position:
            return (f"element {len(elements)} declares {length} bytes but only "
                    f"{size - position} remain")
        elements.append(raw[position:position + length])
        position += length
    if len(elements) != count:
        return f"holds {len(elements)} element(s) but the shape has {count}"
    return elements


def join_bytes_elements(elements: list[bytes]) -> bytes:
    """Raw BYTES contents: each element framed by its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def _typed_array(datatype: str, contents: pb.InferTensorContents, count: int,
                 field: str) -> tuple[npt.NDArray[Any] | None, str | None]:
    name = CONTENTS_FIELDS.get(datatype)
    if name is None:
        return None, f"{datatype} has no typed contents field; send it in raw_input_contents"
    populated = [f.name for f, _ in contents.ListFields()]
    if any(other != name for other in populated):
        return None, (f"a {datatype} tensor's values go in contents.{name}, not "
                      f"contents.{', '.join(other for other in populated if other != name)}")
    values = getattr(contents, name)
    if len(values) != count:
        return None, f"contents.{name} holds {len(values)} value(s) but the shape has {count}"
    if datatype == BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array, None
    dtype = DTYPES[datatype]
    wide = np.asarray(values)
    array = wide.astype(dtype)
    # The typed fields are wider than INT8/INT16/UINT8/UINT16: a value that does not fit would
    # wrap silently.
    if wide.size and not np.array_equal(array, wide):
        return None, f"contents.{name} holds values outside the range of {datatype}"
    return array, None


def decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                  target: InputTarget, field: str, where: str,
                  limits: Limits) -> tuple[Any, list[Violation]]:
    """The pipeline value of one input tensor (``raw`` when the request used raw contents),
    or None with the violations. ``where`` names the model and the input for messages."""
    problems: list[Violation] = []
    datatype, shape = tensor.datatype, list(tensor.shape)
    if datatype not in DATATYPES:
        return None, [Violation(f"{field}.datatype", f"{where}: unknown datatype {datatype!r}; "
                                f"one of {', '.join(DATATYPES)}")]
    if target.datatype is not None and datatype != target.datatype:
        problems.append(Violation(f"{field}.datatype", f"{where}: expects {target.datatype}, "
                                  f"got {datatype}"))
    if any(dim < 0 for dim in shape):
        problems.append(Violation(f"{field}.shape", f"{where}: negative dimension in {shape}"))
    elif not fits(target.shape, shape):
        problems.append(Violation(f"{field}.shape", f"{where}: expects shape "
                                  f"{list(target.shape or ())} (-1: any size), got {shape}"))
    if problems:
        return None, problems
    count = _element_count(shape)
    size = len(raw) if raw is not None else count * DTYPES.get(datatype, np.dtype("u1")).itemsize
    if limits.max_tensor_bytes and size > limits.max_tensor_bytes:
        return None, [Violation(field, f"{where}: {size} bytes exceed the tensor limit of "
                                f"{limits.max_tensor_bytes}", kind="limit")]
    array: npt.NDArray[Any] | None
    if raw is None:
        array, problem = _typed_array(datatype, tensor.contents, count, field)
    elif datatype == BYTES:
        elements = split_bytes_elements(raw, count)
        problem = elements if isinstance(elements, str) else None
        array = None
        if not isinstance(elements, str):
            array = np.empty(count, dtype=object)
            array[:] = elements
    else:
        dtype = DTYPES[datatype]
        expected = count * dtype.itemsize
        problem = (None if len(raw) == expected else
                   f"raw contents hold {len(raw)} bytes; shape {shape} of {datatype} needs "
                   f"{expected}")
        array = np.frombuffer(raw, dtype=dtype) if problem is None else None
    if array is None:
        assert problem is not None
        return None, [Violation(field, f"{where}: {problem}")]
    try:
        array = array.reshape(shape)
    except ValueError as exc:  # zero elements in a shape numpy refuses: too many or huge dims
        return None, [Violation(f"{field}.shape", f"{where}: unsupported shape {shape}: {exc}")]
    return _port_value(array, datatype, tensor, target, field, where, limits)


def plain_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes, kind: str,
                datatype: str | None, shape: tuple[int, ...] | None,
                max_bytes: int) -> npt.NDArray[Any] | None:
    """The commonest input in few steps: a numeric raw tensor, of the datatype and shape its
    tensor (or ``any``) port declares, within the limit, as a view over ``raw``. None for
    anything else, which ``decode_tensor`` then decodes or reports on, so this never decides
    what is wrong with a tensor."""
    name = tensor.datatype
    dtype = DTYPES.get(name)
    if dtype is None or (datatype is not None and name != datatype) or (
            kind != "tensor" and kind != "any"):
        return None
    dims = tensor.shape
    if not fits(shape, dims):
        return None
    count = 1
    for dim in dims:
        if dim < 0:
            return None
        count *= dim
    if len(raw) != count * dtype.itemsize or (max_bytes and len(raw) > max_bytes):
        return None
    try:
        # Positional: numpy parses keyword arguments at several times the cost.
        return np.frombuffer(raw, dtype).reshape(dims)
    except ValueError:  # a shape numpy refuses (too many dimensions, too large): reported there
        return None


def _port_value(array: npt.NDArray[Any], datatype: str,
                tensor: pb.ModelInferRequest.InferInputTensor, target: InputTarget, field: str,
                where: str, limits: Limits) -> tuple[Any, list[Violation]]:
    """The decoded array as the value its port's kind takes."""
    kind = target.kind
    if datatype != BYTES and kind in ("tensor", "any"):
        return array, []
    if kind == "tensor":
        return None, [Violation(f"{field}.datatype", f"{where}: a tensor input takes a numeric "
                                "datatype, not BYTES")]
    if kind == "audio":
        if datatype == BYTES:
            return None, [Violation(f"{field}.datatype", f"{where}: an audio input takes "
                                    "numeric samples, not BYTES")]
        rate = tensor.parameters.get(SAMPLE_RATE)
        if rate is None or rate.WhichOneof("parameter_choice") != "int64_param" or (
                rate.int64_param <= 0):
            return None, [Violation(f"{field}.parameters", f"{where}: an audio input needs a "
                                    f"positive int64 parameter {SAMPLE_RATE!r}")]
        return Audio(array, int(rate.int64_param)), []
    if datatype != BYTES or array.size != 1:
        return None, [Violation(field, f"{where}: a {kind} input takes a BYTES tensor of one "
                                f"element, got {datatype} of shape {list(array.shape)}")]
    element: bytes = array.reshape(-1)[0]
    if kind in ("binary", "any"):
        return element, []
    try:
        text = element.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [Violation(field, f"{where}: not UTF-8 text: {exc.reason} at byte "
                                f"{exc.start}")]
    if kind == "text":
        return text, []
    try:
        return Json(loads(text, max_depth=limits.max_json_depth)), []
    except JsonRejected as exc:
        return None, [Violation(field, f"{where}: {exc}")]


class OutputNotEncodable(ValueError):
    """A pipeline output has no Open Inference Protocol form (e.g. a complex tensor)."""


def encode_output(name: str, value: Any, datatype: str | None = None,
                  shape: tuple[int, ...] | None = None,
                  ) -> tuple[pb.ModelInferResponse.InferOutputTensor, Raw]:
    """One output tensor's metadata and its raw contents (bytes, or a view of the array's);
    OutputNotEncodable when it has no v2 form, or not the ``datatype`` / ``shape`` the manifest
    declares for it."""
    tensor, raw = _encode(name, value)
    produced = list(tensor.shape)
    if (datatype is not None and tensor.datatype != datatype) or not fits(shape, produced):
        declared = " ".join(filter(None, (datatype, str(list(shape)) if shape is not None
                                          else None)))
        raise OutputNotEncodable(f"output {name!r} is {tensor.datatype} of shape {produced}; "
                                 f"the manifest declares {declared}")
    return tensor, raw


def _encode(name: str, value: Any) -> tuple[pb.ModelInferResponse.InferOutputTensor, Raw]:
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name)
    if isinstance(value, Tagged):
        value = value.value
    if isinstance(value, Audio):
        tensor.parameters[SAMPLE_RATE].int64_param = value.sample_rate
        value = value.samples
    if isinstance(value, Json):
        value = json.dumps(value.value, separators=(",", ":")).encode()
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        tensor.datatype = BYTES
        tensor.shape.append(1)
        return tensor, join_bytes_elements([bytes(value)])
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise OutputNotEncodable(f"output {name!r} is a {type(value).__name__}, which has no "
                                 "Open Inference Protocol datatype")
    tensor.shape.extend(value.shape)
    datatype = datatype_of(value.dtype)
    if datatype is None:
        raise OutputNotEncodable(f"output {name!r} has dtype {value.dtype}, which has no Open "
                                 f"Inference Protocol datatype (one of {', '.join(DATATYPES)})")
    tensor.datatype = datatype
    little = np.ascontiguousarray(value.astype(DTYPES[datatype], copy=False))
    # A view of the array's bytes: the response is framed with one copy (``frame_response``).
    return tensor, little.reshape(-1).view(np.uint8).data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = [bytes([value]) for value in range(128)]
# ModelInferResponse / InferOutputTensor fields, tag bytes taken from the descriptors.
_RESPONSE = pb.ModelInferResponse.DESCRIPTOR
_OUTPUT = pb.ModelInferResponse.InferOutputTensor.DESCRIPTOR


def _tag(descriptor: Any, name: str) -> bytes:
    return bytes([descriptor.fields_by_name[name].number << 3 | 2])  # length-delimited


_ID_TAG = _tag(_RESPONSE, "id")
_OUTPUTS_TAG = _tag(_RESPONSE, "outputs")
_SHAPE_TAG = _tag(_OUTPUT, "shape")  # packed


def _length(value: int) -> bytes:
    return _SMALL_VARINTS[value] if value < 128 else _varint(value)


def _len_delimited(tag: bytes, body: bytes) -> bytes:
    return tag + _length(len(body)) + body


def response_head(model_name: str, model_version: str) -> bytes:
    """A response's ``model_name`` and ``model_version`` fields, serialized (made once per
    pipeline version by the caller)."""
    return pb.ModelInferResponse(model_name=model_name,
                                 model_version=model_version).SerializeToString()


_OUTPUT_HEADS: dict[tuple[str, str], bytes] = {}


def _output_head(name: str, datatype: str) -> bytes:
    key = (name, datatype)
    head = _OUTPUT_HEADS.get(key)
    if head is None:
        if len(_OUTPUT_HEADS) >= 4096:  # bounded: names come from manifests
            _OUTPUT_HEADS.clear()
        head = _OUTPUT_HEADS[key] = pb.ModelInferResponse.InferOutputTensor(
            name=name, datatype=datatype).SerializeToString()
    return head


def frame_plain_response(head: bytes, request_id: str,
                         outputs: list[tuple[str, str | None, tuple[int, ...] | None, Any]],
                         ) -> bytes | None:
    """The whole ModelInferResponse, framed by hand, when every output is a plain
    array of a v2 datatype that matches what the manifest declares for it; None
    otherwise (``encode_output`` and ``frame_response`` then encode it, or say why not).
    The tensors are copied once, into the joined bytes.
    ``outputs``: (name, declared datatype, declared shape, value). The bytes are those the
    generated serializer plus ``frame_response`` would make (fields in number order)."""
    tensors: list[bytes] = []
    # One-dimensional C-contiguous arrays: b"".join takes their buffers as they are.
    flat: list[npt.NDArray[Any]] = []
    for name, declared, declared_shape, value in outputs:
        if type(value) is not np.ndarray:
            return None
        datatype = _DATATYPE_OF.get(value.dtype)
        if datatype is None or (declared is not None and datatype != declared):
            return None
        shape = value.shape
        if not fits(declared_shape, shape):
            return None
        body = _output_head(name, datatype)
        if shape:
            packed = b"".join([_length(dim) for dim in shape])
            body += _SHAPE_TAG + _length(len(packed)) + packed
        tensors.append(_len_delimited(_OUTPUTS_TAG, body))
        # Row-major, contiguous: a view of a C-contiguous array, a copy of any other (reshape
        # alone leaves a strided one-dimensional array strided).
        row = value.reshape(-1)
        flat.append(row if row.flags.c_contiguous else row.copy())
    parts: list[Any] = [head]
    if request_id:
        parts.append(_len_delimited(_ID_TAG, request_id.encode()))
    parts += tensors
    for array in flat:
        parts += [_RAW_OUTPUT_TAG, _length(array.nbytes), array]
    return b"".join(parts)


def frame_response(response: pb.ModelInferResponse, raws: list[Raw]) -> bytes:
    """The serialized ModelInferResponse with ``raws`` as its ``raw_output_contents``.

    Protobuf parsers take a message's fields in any order, so the raw contents are appended
    after the rest of the message, framed by hand: the tensors are copied once (into the
    joined bytes gRPC sends), not into the message and again by its serialization."""
    parts: list[Raw] = [response.SerializeToString()]
    for raw in raws:
        parts += [_RAW_OUTPUT_TAG, _varint(len(raw)), raw]
    return b"".join(parts)
