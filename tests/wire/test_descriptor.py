"""The hand-written codec against the generated descriptors: every field number, tag and wire
type it uses must be the one the .proto defines.

The codec names each field number it uses as a module-level constant (``_F_*``, read from the
descriptors at import time) and builds its tags from them (``_T_*`` bytes for framing, ``_K_*``
single-byte ints for the inline scanners). These tests check

* each constant against the descriptor of the field it stands for (number, and for tags the wire
  type implied by the field's type);
* that every such constant in the codec is listed here (a new one cannot go unchecked);
* the source of the codec: no field number or tag written as a literal, and every
  ``number == _F_X [and wire_type == W]`` test of the scanners expecting the wire type the field
  has on the wire.
"""

from __future__ import annotations

import ast
import inspect
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import _codec, _streams, _unary

MODULES = (_codec, _unary, _streams)

VARINT, I64, LEN, I32 = 0, 1, 2, 5

# Wire type of a (non-packed) field of each descriptor type.
_WIRE_TYPE_OF = {
    FieldDescriptor.TYPE_DOUBLE: I64, FieldDescriptor.TYPE_FIXED64: I64,
    FieldDescriptor.TYPE_SFIXED64: I64,
    FieldDescriptor.TYPE_FLOAT: I32, FieldDescriptor.TYPE_FIXED32: I32,
    FieldDescriptor.TYPE_SFIXED32: I32,
    FieldDescriptor.TYPE_INT32: VARINT, FieldDescriptor.TYPE_INT64: VARINT,
    FieldDescriptor.TYPE_UINT32: VARINT, FieldDescriptor.TYPE_UINT64: VARINT,
    FieldDescriptor.TYPE_SINT32: VARINT, FieldDescriptor.TYPE_SINT64: VARINT,
    FieldDescriptor.TYPE_BOOL: VARINT, FieldDescriptor.TYPE_ENUM: VARINT,
    FieldDescriptor.TYPE_STRING: LEN, FieldDescriptor.TYPE_BYTES: LEN,
    FieldDescriptor.TYPE_MESSAGE: LEN,
}

# Every field constant of the codec: name -> (message, field name).
FIELDS: dict[str, tuple[Any, str]] = {
    "_F_TENSOR_DTYPE": (pb.Tensor, "dtype"),
    "_F_TENSOR_SHAPE": (pb.Tensor, "shape"),
    "_F_TENSOR_DATA": (pb.Tensor, "data"),
    "_F_AUDIO_SAMPLES": (pb.Audio, "samples"),
    "_F_AUDIO_SAMPLE_RATE": (pb.Audio, "sample_rate"),
    "_F_VALUE_TENSOR": (pb.Value, "tensor"),
    "_F_VALUE_AUDIO": (pb.Value, "audio"),
    "_F_VALUE_TEXT": (pb.Value, "text"),
    "_F_VALUE_JSON": (pb.Value, "json"),
    "_F_VALUE_BINARY": (pb.Value, "binary"),
    "_F_VALUE_METADATA": (pb.Value, "metadata"),
    "_F_PORT_NODE_ID": (pb.PortValue, "node_id"),
    "_F_PORT_PORT": (pb.PortValue, "port"),
    "_F_PORT_VALUE": (pb.PortValue, "value"),
    "_F_REQUEST_MANIFEST": (pb.ExecuteRequest, "manifest_json"),
    "_F_REQUEST_INPUTS": (pb.ExecuteRequest, "inputs"),
    "_F_REQUEST_PIPELINE": (pb.ExecuteRequest, "pipeline"),
    "_F_REQUEST_PIPELINE_VERSION": (pb.ExecuteRequest, "pipeline_version"),
    "_F_RESPONSE_OUTPUTS": (pb.ExecuteResponse, "outputs"),
    "_F_RESPONSE_METRICS": (pb.ExecuteResponse, "metrics"),
    "_F_METRICS_TOTAL_MS": (pb.ExecutionMetrics, "total_ms"),
    "_F_METRICS_NODES": (pb.ExecutionMetrics, "nodes"),
    "_F_METRICS_PLAN_CACHED": (pb.ExecutionMetrics, "plan_cached"),
    "_F_NODE_WALL_MS": (pb.NodeMetrics, "wall_ms"),
    "_F_CHUNK_SEQUENCE": (pb.StreamChunk, "sequence"),
    "_F_CHUNK_NODE_ID": (pb.StreamChunk, "node_id"),
    "_F_CHUNK_PORT": (pb.StreamChunk, "port"),
    "_F_CHUNK_VALUE": (pb.StreamChunk, "value"),
    "_F_SREQ_INIT": (pb.StreamRequest, "init"),
    "_F_SREQ_DATA": (pb.StreamRequest, "data"),
    "_F_SREQ_CLOSE": (pb.StreamRequest, "close"),
    "_F_SREQ_CANCEL": (pb.StreamRequest, "cancel"),
    "_F_SRESP_READY": (pb.StreamResponse, "ready"),
    "_F_SRESP_RESULT": (pb.StreamResponse, "result"),
    "_F_SRESP_EVENT": (pb.StreamResponse, "event"),
    "_F_SRESP_CLOSED": (pb.StreamResponse, "closed"),
    "_F_SRESP_RESULTS": (pb.StreamResponse, "results"),
    "_F_SRESP_ERROR": (pb.StreamResponse, "error"),
    "_F_RESULTS_RESULTS": (pb.StreamResults, "results"),
}

# Every tag constant: name -> the field constant it frames (``_T_X`` / ``_K_X`` -> ``_F_X``).
TAGS = sorted(
    name for module in MODULES for name in vars(module)
    if name.startswith(("_T_", "_K_")) and name[3:].isupper()
)


def _descriptor(name: str) -> FieldDescriptor:
    message, field_name = FIELDS[name]
    fields = message.DESCRIPTOR.fields_by_name
    assert field_name in fields, f"{message.DESCRIPTOR.full_name} has no field {field_name}"
    return fields[field_name]


def _wire_types(fd: FieldDescriptor) -> set[int]:
    """The wire types a parser accepts for the field (a repeated scalar: packed or not)."""
    base = _WIRE_TYPE_OF[fd.type]
    if fd.is_repeated and base != LEN:
        return {LEN, base}
    return {base}


def _encoded_wire_type(fd: FieldDescriptor) -> int:
    """The wire type a conforming encoder writes for the field."""
    return LEN if fd.is_packed else _WIRE_TYPE_OF[fd.type]


def _read_tag(tag: bytes) -> tuple[int, int]:
    value = shift = 0
    for i, byte in enumerate(tag):
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            assert i == len(tag) - 1, f"tag {tag!r} has bytes after its varint"
            return value >> 3, value & 7
    raise AssertionError(f"tag {tag!r} is a truncated varint")


def _constants(prefix: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for module in MODULES:
        for name, value in vars(module).items():
            if name.startswith(prefix) and name[len(prefix):].isupper():
                found[name] = value
    return found


def test_every_field_constant_is_checked() -> None:
    assert set(_constants("_F_")) == set(FIELDS)
    for tag in TAGS:
        field_constant = "_F_" + tag[3:].removesuffix("_UNPACKED")
        assert field_constant in FIELDS, f"{tag} frames no known field constant"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_field_numbers_match_the_descriptor(name: str) -> None:
    assert getattr(_codec, name) == _descriptor(name).number


@pytest.mark.parametrize("name", TAGS)
def test_tags_match_the_descriptor(name: str) -> None:
    # ``_K_X_UNPACKED``: the key of repeated scalar field ``_F_X`` in the unpacked form a
    # parser must accept besides the packed one encoders write.
    unpacked = name.endswith("_UNPACKED")
    fd = _descriptor("_F_" + name[3:].removesuffix("_UNPACKED"))
    value = _constants(name[:3])[name]
    if name.startswith("_K_"):  # the single byte the inline scanners compare against
        assert isinstance(value, int) and 0 < value < 0x80
        tag = bytes((value,))
    else:
        assert isinstance(value, bytes)
        tag = value
    number, wire_type = _read_tag(tag)
    assert number == fd.number, f"{name}: field {number}, descriptor says {fd.number}"
    if unpacked:
        assert fd.is_packed and wire_type in _wire_types(fd) - {LEN}, (
            f"{name}: wire type {wire_type} is no unpacked form of {fd.full_name}")
        return
    assert wire_type == _encoded_wire_type(fd), (
        f"{name}: wire type {wire_type}, but {fd.full_name} is written as "
        f"{_encoded_wire_type(fd)}")


def test_stream_result_frames_like_stream_chunk() -> None:
    # One framing serves both messages (encode_stream_item, decode_stream_chunk).
    for name in ("sequence", "node_id", "port", "value"):
        chunk = pb.StreamChunk.DESCRIPTOR.fields_by_name[name]
        result = pb.StreamResult.DESCRIPTOR.fields_by_name[name]
        assert (chunk.number, chunk.type) == (result.number, result.type)


# --- the source: no literals, and the scanners' wire-type tests ------------------------------

_NUMBER_NAMES = {"number", "inner"}
_WIRE_TYPE_NAMES = {"wire_type", "inner_type"}
_WIRE_TYPES = {"_VARINT": VARINT, "_I64": I64, "_LEN": LEN, "_I32": I32}
# Byte literals that are not tags: the empty joiner and a bool's value.
_ALLOWED_BYTES = {b"", b"\x01"}
# Functions whose first argument is a field number.
_NUMBER_ARGUMENT = {"_len_field", "_tag", "_key", "encode_port_value", "encode_stream_item"}


def _functions(module: ModuleType) -> list[ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(module))
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_no_literal_field_numbers_or_tags(module: ModuleType) -> None:
    problems: list[str] = []
    for function in _functions(module):
        for node in ast.walk(function):
            where = f"{module.__name__}.{function.name} line {getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Constant) and isinstance(node.value, bytes) and (
                    node.value not in _ALLOWED_BYTES):
                problems.append(f"{where}: literal bytes {node.value!r}")
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and (
                    node.left.id in _NUMBER_NAMES | {"key"}):
                for right in node.comparators:
                    if isinstance(right, ast.Constant) and right.value != 0:
                        problems.append(f"{where}: {node.left.id} compared with {right.value!r}")
                    if isinstance(right, ast.Tuple):
                        problems.append(f"{where}: {node.left.id} compared with a tuple")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                    node.func.id in _NUMBER_ARGUMENT) and node.args and isinstance(
                    node.args[0], ast.Constant):
                problems.append(f"{where}: {node.func.id}({node.args[0].value!r}, ...)")
    assert not problems, "\n".join(problems)


def _field_name(node: ast.expr) -> str | None:
    """``_F_X`` in ``number == _F_X``."""
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
            and node.left.id in _NUMBER_NAMES and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Eq) and isinstance(node.comparators[0], ast.Name)
            and node.comparators[0].id.startswith("_F_")):
        return node.comparators[0].id
    return None


def _wire_type_test(node: ast.expr, op: type[ast.cmpop]) -> int | None:
    """W in ``wire_type == W`` (op Eq) or ``wire_type != W`` (op NotEq)."""
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
            and node.left.id in _WIRE_TYPE_NAMES and len(node.ops) == 1
            and isinstance(node.ops[0], op) and isinstance(node.comparators[0], ast.Name)):
        return _WIRE_TYPES[node.comparators[0].id]
    return None


def _scanner_tests(module: ModuleType) -> list[tuple[str, str, int | None]]:
    """(where, field constant, wire type it is read as) for every field test of the scanners.
    A test without its own wire-type check inherits the loop's ``wire_type != W: continue``."""
    found: list[tuple[str, str, int | None]] = []
    for function in _functions(module):
        for loop in ast.walk(function):
            if not isinstance(loop, ast.For):
                continue
            default = None
            for node in ast.walk(loop):
                if isinstance(node, ast.If):
                    excluded = _wire_type_test(node.test, ast.NotEq)
                    if excluded is not None and any(
                            isinstance(s, ast.Continue) for s in node.body):
                        default = excluded
            for node in ast.walk(loop):
                where = f"{module.__name__}.{function.name} line {getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
                    names = [n for n in map(_field_name, node.values) if n]
                    types = [t for t in (_wire_type_test(v, ast.Eq) for v in node.values)
                             if t is not None]
                    found += [(where, n, types[0] if types else default) for n in names]
                elif isinstance(node, ast.If | ast.IfExp) and (name := _field_name(node.test)):
                    found.append((where, name, default))
    return found


def test_the_scanners_find_field_tests() -> None:
    seen = {name for module in MODULES for _, name, _ in _scanner_tests(module)}
    # Each decoded field of the ``_fields`` scanners (the generated parsers read the rest; the
    # tensor decoder compares tag bytes, ``_K_*``, checked by test_tags_match_the_descriptor).
    assert {"_F_VALUE_TENSOR",
            "_F_VALUE_METADATA", "_F_PORT_VALUE", "_F_CHUNK_SEQUENCE", "_F_CHUNK_VALUE",
            "_F_SREQ_DATA", "_F_SRESP_RESULTS", "_F_RESULTS_RESULTS",
            "_F_RESPONSE_METRICS", "_F_REQUEST_MANIFEST", "_F_REQUEST_PIPELINE",
            "_F_REQUEST_PIPELINE_VERSION"} <= seen


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_scanners_read_each_field_with_its_wire_type(module: ModuleType) -> None:
    problems = []
    for where, name, wire_type in _scanner_tests(module):
        fd = _descriptor(name)
        if wire_type is None:
            problems.append(f"{where}: {name} ({fd.full_name}) read without a wire-type check")
        elif wire_type not in _wire_types(fd):
            problems.append(f"{where}: {name} ({fd.full_name}) read as wire type {wire_type}, "
                            f"the descriptor allows {sorted(_wire_types(fd))}")
    assert not problems, "\n".join(problems)
