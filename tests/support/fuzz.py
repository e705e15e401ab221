"""Seeded fuzzing of the two data RPCs through a real server (the CI test and bench/fuzz.py).

Cases are raw request bytes, so nothing on the client side can refuse or repair them: manifests
that are mutated, deep, huge-numbered, cyclic, long or wrong-typed; values of every kind with
mismatched shapes, bad dtypes, invalid UTF-8 or JSON bombs; whole messages bit-flipped,
truncated or replaced by garbage; stream sequences in any order; and the Open Inference
Protocol's ModelInfer against the models of ``MODELS`` (``write_models``: the fuzzed server's
pipelines directory), with every datatype and junk ones, shapes past numpy's limits, raw and
typed contents mixed and miscounted, parameters, versions and requested outputs. Case ``i`` of
a seed is always the same (its own ``random.Random``), so a failure names a case that can be
replayed.

Streams are sent with the blocking grpc API: grpc.aio clients replace the server's status with
INTERNAL when a write races the end of the call (grpc/grpc#36066), and what is judged here is the
server.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tensorline.client._exceptions import from_rpc_error
from tensorline.oip.v2 import inference_pb2 as oip
from tensorline.v1 import tensorline_pb2 as pb

SERVICE = "/tensorline.v1.PipelineService/"
OIP_SERVICE = "/inference.GRPCInferenceService/"
# Node modules the fuzzed server loads (fast, sandbox-free test nodes beside the builtins).
NODE_MODULES = "tests.nodes.basic,tests.nodes.streaming,tests.nodes.oip"
NODE_TYPES = ("Scale", "Add", "PassThrough", "Cast", "Reshape", "Normalize", "Calculator",
              "Concat", "Split", "Fail", "Expander", "Filter", "Counter", "AudioChunker",
              "AudioResample", "Accumulator", "Pair", "Gain", "Nope", "", "scale")
PORTS = ("", "in", "out", "a", "b", "gain", "first", "second", "total", "nope")
RUNTIME_HINTS = (None, "auto", "inprocess", "sandbox", "gpu", "", 7)
# Deadline of one fuzzed call: far above what any case needs, so a hang shows as
# DEADLINE_EXCEEDED instead of stalling the run.
CALL_TIMEOUT_S = 20.0


# --- values ---------------------------------------------------------------------------------


def _text(rng: random.Random, *, big: bool = False) -> str:
    """A name or a string value; ``big`` ones are sometimes far longer than any limit."""
    pick = rng.random()
    if big and pick < 0.05:
        return "n" * rng.choice([1000, 100_000])
    if pick < 0.6:
        return rng.choice(["x", "src", "a", "b", "node-1", "é", "名前", "\u202e", " ", ""])
    return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 40)))


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.4:
        return rng.choice([0, 1, -1, 2.5, 1e300, True, None, "s", 10**rng.randrange(1, 30)])
    if pick < 0.7:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {_text(rng): _json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _bomb(rng: random.Random) -> str:
    """JSON text that hurts naive parsers: deep nesting, a huge integer, NaN, a long string."""
    depth = rng.choice([65, 200, 1000, 5000, 50_000])
    return rng.choice([
        "[" * depth + "]" * depth,
        '{"a":' * depth + "1" + "}" * depth,
        "[" * depth,
        "1" * rng.choice([4301, 5000, 100_000]),
        "[NaN, Infinity]", "1e999", '"' + "x" * 20_000 + '"', '"\\ud800"',
    ])


def _tensor(rng: random.Random) -> pb.Tensor:
    dtype = rng.choice([1, 2, 3, 4, 5, 6, 9, 10, 11, 0, 99, -1]) if rng.random() < 0.3 else \
        rng.choice([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_INT64, pb.DTYPE_INT32])
    if rng.random() < 0.7:
        shape = [rng.randrange(0, 6) for _ in range(rng.randrange(0, 4))]
    else:
        shape = rng.choice([[-1], [2**62, 2**62], [0, 2**63 - 1], [1] * 40, [3, -3], [10**6]])
    itemsize = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_INT64: 8,
                pb.DTYPE_INT32: 4}.get(dtype, 1)
    count = 1
    for dim in shape:
        count *= max(dim, 0)
    size = count * itemsize if count * itemsize < 4096 and rng.random() < 0.7 \
        else rng.randrange(0, 64)
    data = rng.randbytes(size)
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64) and rng.random() < 0.8:
        fmt = "<f" if dtype == pb.DTYPE_FLOAT32 else "<d"
        step = struct.calcsize(fmt)
        data = b"".join(struct.pack(fmt, rng.uniform(-4, 4)) for _ in range(size // step))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _good_tensor(rng: random.Random) -> pb.Value:
    count = rng.randrange(1, 8)
    data = b"".join(struct.pack("<f", rng.uniform(-4, 4)) for _ in range(count))
    return pb.Value(tensor=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[count], data=data))


def value(rng: random.Random) -> pb.Value:
    kind = rng.choice(["good", "good", "tensor", "tensor", "audio", "text", "json", "bomb", "binary",
                       "empty", "meta"])
    if kind == "good":
        return _good_tensor(rng)
    if kind == "tensor":
        return pb.Value(tensor=_tensor(rng))
    if kind == "audio":
        return pb.Value(audio=pb.Audio(samples=_tensor(rng),
                                       sample_rate=rng.choice([16000, 0, -5, 8000, 2**31 - 1])))
    if kind == "text":
        return pb.Value(text=_text(rng, big=True))
    if kind == "json":
        return pb.Value(json=json.dumps(_json_value(rng)))
    if kind == "bomb":
        return pb.Value(json=_bomb(rng))
    if kind == "binary":
        return pb.Value(binary=rng.randbytes(rng.randrange(0, 64)))
    if kind == "meta":
        return pb.Value(tensor=_tensor(rng), metadata={_text(rng): _text(rng)})
    return pb.Value()


# --- manifests ------------------------------------------------------------------------------


def _node(rng: random.Random, node_id: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"id": node_id, "node_type": rng.choice(NODE_TYPES)}
    if rng.random() < 0.6:
        node["params"] = rng.choice([
            {"factor": rng.choice([2, 0.5, "x", None, 1e308, 10**400])},
            {"dtype": rng.choice(["float32", "int8", "bogus"])},
            {"shape": rng.choice([[2, 2], [-1], [0], "x", [10**6] * 8])},
            {"copies": rng.choice([0, 1, 3, -1, 10**9])},
            {"operation": rng.choice(["add", "nope"])},
            {"message": _text(rng)},
            {_text(rng): _json_value(rng)},
            _json_value(rng),
        ])
    if rng.random() < 0.2:
        node["runtime_hint"] = rng.choice(RUNTIME_HINTS)
    if rng.random() < 0.1:
        node["timeout_s"] = rng.choice([0, -1, 0.001, 5, "x"])
    if rng.random() < 0.05:
        node[rng.choice(["params2", "type", "inputs"])] = 1
    return node


def _valid_manifest(rng: random.Random) -> dict[str, Any]:
    """A pipeline that runs when fed float tensors at ``n0``: a short chain of numeric nodes."""
    kinds = [("Scale", {"factor": 2}), ("PassThrough", {}), ("Add", {}),
             ("Cast", {"dtype": "float64"}), ("Expander", {"copies": 2}), ("Filter", {})]
    chain = [rng.choice(kinds) for _ in range(rng.randrange(1, 4))]
    nodes = [{"id": f"n{i}", "node_type": kind, "params": params}
             for i, (kind, params) in enumerate(chain)]
    return {"nodes": nodes,
            "connections": [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(len(nodes) - 1)]}


def manifest(rng: random.Random) -> Any:
    """A manifest as data: mostly plausible, often broken, sometimes hostile."""
    shape = rng.choices(["small", "valid", "chain", "cycle", "wide", "deep", "junk"],
                        [50, 25, 5, 5, 4, 5, 6])[0]
    if shape == "valid":
        return _valid_manifest(rng)
    if shape == "junk":
        return rng.choice([[], "x", 1, None, {"nodes": "x"}, {"nodes": [1, 2]},
                           {"version": "v2", "nodes": []}, {"nodes": [{}]}, _json_value(rng)])
    count = {"small": rng.randrange(1, 5), "chain": rng.choice([70, 1200]),
             "cycle": rng.choice([2, 1000]), "wide": rng.choice([65, 300]),
             "deep": 1}[shape]
    ids = [f"n{i}" for i in range(count)]
    if rng.random() < 0.1:
        ids[-1] = ids[0]  # a duplicate id
    if rng.random() < 0.05:
        ids[0] = rng.choice(["", "bad id", "x" * 129, 5])
    nodes = [_node(rng, node_id) for node_id in ids]
    if shape in ("chain", "cycle"):
        for node in nodes:
            node["node_type"] = "PassThrough"
    connections: list[dict[str, Any]] = []
    if shape in ("chain", "cycle") or (shape == "small" and count > 1):
        connections = [{"from": ids[i], "to": ids[i + 1]} for i in range(count - 1)]
    if shape == "cycle":
        connections.append({"from": ids[-1], "to": ids[0]})
    if shape == "small" and rng.random() < 0.3:
        connections.append({"from": rng.choice([*ids, "ghost"]), "to": rng.choice(ids),
                            "from_port": rng.choice(PORTS), "to_port": rng.choice(PORTS)})
    data: dict[str, Any] = {"version": "v1", "metadata": {"name": _text(rng, big=True)},
                            "nodes": nodes,
                            "connections": connections}
    if shape == "deep":
        nodes[0]["params"] = {"p": json.loads("[" * 60 + "]" * 60) if rng.random() < 0.5
                              else 10**rng.choice([100, 4000])}
    if rng.random() < 0.05:
        data[rng.choice(["node", "extra", "connection"])] = []
    return data


def manifest_text(rng: random.Random) -> str:
    if rng.random() < 0.06:
        return _bomb(rng)
    text = json.dumps(manifest(rng), separators=(",", ":"))
    if rng.random() < 0.15:  # character-level damage
        chars = list(text)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(chars) + 1)
            chars[at:at + rng.randrange(0, 3)] = rng.choice(['"', "{", "]", ",", ":", "\\", "x"])
        text = "".join(chars)
    return text


# --- raw bytes ------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Bit flips, truncation, insertion of random bytes, or a varint made too long."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        pick = rng.random()
        if pick < 0.4 and buf:
            at = rng.randrange(len(buf))
            buf[at] ^= 1 << rng.randrange(8)
        elif pick < 0.6 and buf:
            del buf[rng.randrange(len(buf)):]
        elif pick < 0.85:
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randrange(1, 8))
        else:
            buf[:0] = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    return bytes(buf)


def garbage(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 200))


def _invalid_utf8_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field whose payload is not valid UTF-8."""
    body = payload + b"\xff\xfe\xc3\x28"
    return bytes([number << 3 | 2, len(body)]) + body


def execute_request(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.05:
        return garbage(rng)
    if pick < 0.08:  # a manifest that is not UTF-8
        return _invalid_utf8_field(1, b'{"nodes":[]}')
    if pick < 0.2:  # well-formed: it runs, so execution is fuzzed too, not only validation
        request = pb.ExecuteRequest(manifest_json=json.dumps(_valid_manifest(rng)))
        request.inputs.append(pb.PortValue(node_id="n0", value=_good_tensor(rng)))
        return request.SerializeToString()
    request = pb.ExecuteRequest(manifest_json=manifest_text(rng))
    if rng.random() < 0.03:  # a thousand inputs to one node
        request.inputs.extend(pb.PortValue(node_id="n0", value=pb.Value(text="x"))
                              for _ in range(1000))
    for _ in range(rng.randrange(0, 4)):
        request.inputs.append(pb.PortValue(node_id=rng.choice(["n0", "n0", "n1", "ghost",
                                                               _text(rng)]),
                                           port=rng.choice(PORTS), value=value(rng)))
    raw = request.SerializeToString()
    return mutate(rng, raw) if rng.random() < 0.2 else raw


def _stream_message(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.55:
        chunk = pb.StreamChunk(sequence=rng.choice([0, 1, 2, -1, 2**63 - 1, rng.randrange(100)]),
                               node_id=rng.choice(["n0", "n0", "n0", "n1", "ghost", ""]),
                               port=rng.choice(PORTS), value=value(rng))
        raw = pb.StreamRequest(data=chunk).SerializeToString()
    elif pick < 0.65:
        raw = pb.StreamRequest(close=pb.StreamClose()).SerializeToString()
    elif pick < 0.72:
        raw = pb.StreamRequest(cancel=pb.StreamCancel(reason=_text(rng))).SerializeToString()
    elif pick < 0.77:
        reason = _invalid_utf8_field(1, b"why")  # a StreamCancel that does not parse
        raw = bytes([4 << 3 | 2, len(reason)]) + reason
    elif pick < 0.82:
        raw = _stream_init(rng)
    elif pick < 0.9:
        raw = garbage(rng)
    else:
        raw = b""
    return mutate(rng, raw) if rng.random() < 0.1 else raw


def _stream_init(rng: random.Random) -> bytes:
    if rng.random() < 0.08:  # a manifest that is not UTF-8, inside StreamInit
        inner = _invalid_utf8_field(1, b'{"nodes":[]}')
        return bytes([1 << 3 | 2, len(inner)]) + inner
    init = pb.StreamInit(manifest_json=manifest_text(rng),
                         queue_size=rng.choice([0, 0, 1, 4, -1, 2**31 - 1]))
    return pb.StreamRequest(init=init).SerializeToString()


def stream_requests(rng: random.Random) -> list[bytes]:
    messages = [] if rng.random() < 0.05 else [_stream_init(rng)]
    if messages and rng.random() < 0.1:
        messages[0] = mutate(rng, messages[0])
    messages += [_stream_message(rng) for _ in range(rng.randrange(0, 7))]
    return messages


# --- Open Inference Protocol ------------------------------------------------------------


# The fuzzed server's models (its pipelines directory) and their input names: a declared
# FP32 tensor, two undeclared tensors, binary and JSON inputs (with a complex output that has no
# v2 datatype), one binary input.
MODELS: dict[str, dict[str, Any]] = {
    "identity": {"metadata": {"name": "identity",
                              "inputs": [{"name": "INPUT0", "node": "p", "datatype": "FP32",
                                          "shape": [1, -1]}],
                              "outputs": [{"name": "OUTPUT0", "node": "p", "datatype": "FP32",
                                           "shape": [1, -1]}]},
                 "nodes": [{"id": "p", "node_type": "PassThrough"}]},
    "pair": {"metadata": {"name": "pair"},
             "nodes": [{"id": "left", "node_type": "Scale", "params": {"factor": 2}},
                       {"id": "right", "node_type": "Scale", "params": {"factor": 3}}]},
    "describe": {"metadata": {"name": "describe"},
                 "nodes": [{"id": "d", "node_type": "Describe"}]},
    "upper": {"metadata": {"name": "upper"}, "nodes": [{"id": "u", "node_type": "UpperBytes"}]},
}
MODEL_INPUTS = {"identity": ("INPUT0",), "pair": ("left", "right"),
                "describe": ("d.blob", "d.doc"), "upper": ("u",)}
MODEL_OUTPUTS = ("OUTPUT0", "left", "right", "d.summary", "d.spectrum", "u", "nope")
V2_DATATYPES = ("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                "FP16", "FP32", "FP64", "BYTES")
V2_ITEMSIZE = {"BOOL": 1, "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "UINT8": 1,
               "UINT16": 2, "UINT32": 4, "UINT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}
CONTENTS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
            "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")


def write_models(directory: Path) -> None:
    """The fuzzed server's pipelines directory (``TENSORLINE_PIPELINES_DIR``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, manifest_object in MODELS.items():
        (directory / f"{name}.json").write_text(json.dumps(manifest_object))


def _v2_shape(rng: random.Random) -> list[int]:
    if rng.random() < 0.75:
        return rng.choice([[1, 4], [4], [1, 1], [1], [2, 2], [0], [1, 0]])
    return [rng.choice([0, 1, 2, 3, -1, 255, 256, 2**31, 2**62, 2**63 - 1])
            for _ in range(rng.choice([0, 1, 2, 3, 33, 65, 70]))]


def _v2_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count if 0 <= count <= 64 else 1


def _typed_contents(rng: random.Random, tensor: Any, count: int) -> None:
    name = rng.choice(CONTENTS)
    values: list[Any] = {
        "bool_contents": [True], "int_contents": [2**31 - 1], "int64_contents": [-2**63],
        "uint_contents": [2**32 - 1], "uint64_contents": [2**64 - 1],
        "fp32_contents": [1.5], "fp64_contents": [float("nan")], "bytes_contents": [b"\xff{"],
    }[name]
    getattr(tensor.contents, name).extend(values * (count + rng.choice([0, 0, 0, 1, -1])))


def _v2_parameter(rng: random.Random, parameters: Any) -> None:
    parameter = parameters[rng.choice(["shared_memory_region", "sample_rate", "classification",
                                       "x"])]
    pick = rng.random()
    if pick < 0.5:
        parameter.int64_param = rng.choice([0, -1, 16000, 2**63 - 1])
    elif pick < 0.8:
        parameter.string_param = _text(rng)
    else:
        parameter.bool_param = True


def infer_request(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.05:
        return garbage(rng)
    model = rng.choice([*MODELS, *MODELS, "nope", _text(rng)])
    request = oip.ModelInferRequest(model_name=model, id=_text(rng) if rng.random() < 0.3 else "")
    if rng.random() < 0.1:
        request.model_version = rng.choice(["1", "0", "2", "-1", "²", "1.0", "9" * 30, " 1"])
    names = list(MODEL_INPUTS.get(model, ("x",)))
    raw = rng.random() < 0.6
    count = len(names) if rng.random() < 0.7 else rng.randrange(0, 4)
    for index in range(count):
        name = names[index % len(names)] if rng.random() < 0.85 else rng.choice(
            [*names, "ghost", _text(rng)])
        datatype = ("BYTES" if name in ("d.blob", "d.doc", "u") else "FP32") \
            if rng.random() < 0.7 else rng.choice([*V2_DATATYPES, "", "fp32", "FP8"])
        shape = _v2_shape(rng)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if rng.random() < 0.05:
            _v2_parameter(rng, tensor.parameters)
        elements = _v2_count(shape)
        if raw:
            if datatype == "BYTES":
                element = rng.choice([b"abc", b'{"k": [1, 2]}', b"\xff\xfe", b"{nope"])
                content = b"".join(struct.pack("<I", len(element)) + element
                                   for _ in range(elements))
            else:
                content = rng.randbytes(elements * V2_ITEMSIZE.get(datatype, 1))
            if rng.random() < 0.1:
                content = content[:-1] if content and rng.random() < 0.5 else content + b"\x00"
            request.raw_input_contents.append(content)
        else:
            _typed_contents(rng, tensor, elements)
    if raw and rng.random() < 0.05:
        request.raw_input_contents.append(b"extra")
    if rng.random() < 0.15:
        output = request.outputs.add(name=rng.choice(MODEL_OUTPUTS))
        if rng.random() < 0.3:
            _v2_parameter(rng, output.parameters)
    if rng.random() < 0.05:
        _v2_parameter(rng, request.parameters)
    data = request.SerializeToString()
    return mutate(rng, data) if rng.random() < 0.1 else data


# --- running --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one RPC's cases: counts by status, and the cases that broke the rules."""

    codes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def record(self, case: int, error: grpc.RpcError | None) -> None:
        if error is None:
            self.codes["OK"] += 1
            return
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        self.codes[code.name] += 1
        problem = judge(error)
        if problem:
            self.failures.append(f"case {case}: {problem}")


def judge(error: grpc.RpcError) -> str:
    """Why a failed call breaks the rules ("" when it does not): INTERNAL is a server bug, and
    UNKNOWN is only for a node's own exception, which names the node."""
    code = error.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INTERNAL:
        return f"INTERNAL: {error.details()}"  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNKNOWN:
        translated = from_rpc_error(error)
        if translated.reason != "NODE_ERROR" or not translated.metadata.get("node_id"):
            return f"UNKNOWN without a node: {translated.message}"
    return ""


def unary_runner(method: str) -> Callable[[grpc.Channel, bytes], grpc.RpcError | None]:
    """Send one case's bytes to the unary ``method``; the error, or None when it succeeded."""

    def run(channel: grpc.Channel, raw: bytes) -> grpc.RpcError | None:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(raw, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return error
        return None

    return run


run_execute = unary_runner(SERVICE + "ExecutePipeline")
run_infer = unary_runner(OIP_SERVICE + "ModelInfer")


def run_stream(channel: grpc.Channel, messages: list[bytes]) -> grpc.RpcError | None:
    call = channel.stream_stream(SERVICE + "StreamPipeline", request_serializer=None,
                                 response_deserializer=None)
    try:
        for _ in call(iter(messages), timeout=CALL_TIMEOUT_S):
            pass
    except grpc.RpcError as error:
        return error
    return None


RPCS: dict[str, tuple[Callable[[random.Random], Any], Callable[[grpc.Channel, Any],
                                                                grpc.RpcError | None]]] = {
    "ExecutePipeline": (execute_request, run_execute),
    "StreamPipeline": (stream_requests, run_stream),
    "ModelInfer": (infer_request, run_infer),
}


def case_rng(seed: int, rpc: str, case: int) -> random.Random:
    return random.Random(f"{seed}:{rpc}:{case}")


def cases(seed: int, rpc: str, count: int, start: int = 0) -> Iterator[tuple[int, Any]]:
    make = RPCS[rpc][0]
    for case in range(start, start + count):
        yield case, make(case_rng(seed, rpc, case))
