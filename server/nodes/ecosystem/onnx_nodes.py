"""ONNX models run with onnxruntime (CPU execution provider).

``OnnxModel`` loads the model file its ``path`` param names (a ``ModelPath``: resolved below the
server's model roots when the manifest is validated) into one ``InferenceSession`` per warm
instance, in ``initialize``: every call of that instance, concurrent ones included (a session's
``run`` is thread-safe), uses the same session. Inputs are checked against the model's
signature (element type, rank, fixed dimensions) before the session sees them, so a mistake is
a node error naming the model input rather than an onnxruntime message.

Threads: onnxruntime's default is a pool of one thread per core for each session. A node
takes ``intra_op_threads`` (default 1: the calling thread only) and ``inter_op_threads``
(default 1: sequential execution), so several warm models on a server share its cores instead
of each claiming all of them, and a sandboxed worker stays far below its thread cap
(``TENSORLINE_SANDBOX_THREADS``). Spinning is off: idle pool threads would otherwise busy-wait
for the next operator, burning CPU time that counts against a sandboxed call's CPU budget.

A session whose thread pools do not fit under the process's thread limit (RLIMIT_NPROC: in a
sandbox worker of its own uid, ``TENSORLINE_SANDBOX_THREADS`` for the whole worker) is refused
before onnxruntime creates it: onnxruntime does not fail cleanly when a pool thread cannot be
started (measured: the call hung until its deadline), so the node checks the budget itself,
and the sandbox's cap stays what it is for every other node.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from tensorline.server.nodes._model_files import ModelPath, check_unchanged
from tensorline.server.nodes._node import Node, NodeParams, NodeTraits
from tensorline.server.nodes.ecosystem._model_inputs import (
    MODEL_INPUT,
    MODEL_OUTPUT,
    bind_model_inputs,
)

if TYPE_CHECKING:
    import onnxruntime

TENSORLINE_REQUIRES = ("onnxruntime",)

# ONNX tensor element types (as onnxruntime names them) the wire can carry.
ONNX_DTYPES: dict[str, np.dtype[Any]] = {
    f"tensor({name})": np.dtype(dtype) for name, dtype in (
        ("float", "float32"), ("double", "float64"), ("float16", "float16"),
        ("int8", "int8"), ("int16", "int16"), ("int32", "int32"), ("int64", "int64"),
        ("uint8", "uint8"), ("uint16", "uint16"), ("uint32", "uint32"), ("uint64", "uint64"),
        ("bool", "bool"))}


class OnnxModelParams(NodeParams):
    path: ModelPath
    output: str | None = Field(None, min_length=1, max_length=1024,
                               description="the model output port 'out' gives (default: the "
                                           "model's first output)")
    intra_op_threads: int = Field(1, ge=1, le=64, description="threads one operator may use")
    inter_op_threads: int = Field(1, ge=1, le=64,
                                  description="operators run in parallel (1 = sequential)")


class _Signature:
    """A model input's declared element type and shape (None = a free dimension)."""

    def __init__(self, name: str, type_name: str, shape: list[Any]) -> None:
        self.name = name
        self.type_name = type_name
        self.dtype = ONNX_DTYPES.get(type_name)
        self.shape: tuple[int | None, ...] = tuple(
            dim if isinstance(dim, int) and dim >= 0 else None for dim in shape)

    def check(self, array: np.ndarray[Any, Any]) -> None:
        if array.dtype != self.dtype:
            raise ValueError(f"model input {self.name!r} takes {self.dtype}, got {array.dtype}")
        if array.ndim != len(self.shape) or any(
                want is not None and want != got for want, got in zip(self.shape, array.shape,
                                                                      strict=False)):
            declared = "x".join("?" if dim is None else str(dim) for dim in self.shape)
            raise ValueError(f"model input {self.name!r} takes shape [{declared}] "
                             f"(? = any), got {list(array.shape)}")


def _threads_now() -> int:
    """Threads of this process (``/proc/self/status``; a worker may read its own)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 1


def check_thread_budget(intra: int, inter: int) -> None:
    """ValueError when the session's pool threads (``intra - 1``, and ``inter - 1`` when
    operators run in parallel: the calling thread is one of each pool) would not fit under
    RLIMIT_NPROC, which counts every thread of this process's uid."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY:
        return
    needed = (intra - 1) + (inter - 1)
    free = soft - _threads_now()
    if needed > free:
        raise ValueError(f"intra_op_threads={intra} and inter_op_threads={inter} need {needed} "
                         f"more threads, but this process may start only {max(free, 0)} more "
                         f"(its thread limit is {soft}: in the sandbox, "
                         "TENSORLINE_SANDBOX_THREADS); use fewer threads")


class OnnxModel(Node):
    """An ONNX model file run by onnxruntime on the CPU: tensors in, the selected output out.

    Port ``in`` takes one tensor per model input (a one-input model: one plain tensor; several
    inputs: each tagged ``{"input": name}``, or untagged in the model's input order); dtype and
    shape must match the model's signature. Port ``out`` gives the output named by ``output``
    (default: the first). ``path`` names the file below the server's model roots; the session
    is created once per warm instance with ``intra_op_threads``/``inter_op_threads`` threads.
    """

    Params = OnnxModelParams
    params: OnnxModelParams
    inputs = (MODEL_INPUT,)
    outputs = (MODEL_OUTPUT,)
    traits = NodeTraits(libraries=("onnxruntime",))
    reusable = True

    def initialize(self) -> None:
        import onnxruntime

        params = self.params
        check_thread_budget(params.intra_op_threads, params.inter_op_threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = params.intra_op_threads
        options.inter_op_num_threads = params.inter_op_threads
        options.execution_mode = (onnxruntime.ExecutionMode.ORT_SEQUENTIAL
                                  if params.inter_op_threads == 1
                                  else onnxruntime.ExecutionMode.ORT_PARALLEL)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: warnings would go to the server's log
        name = os.path.basename(params.path)
        try:
            self.session = onnxruntime.InferenceSession(
                check_unchanged(params.path), sess_options=options,
                providers=["CPUExecutionProvider"])
        except Exception as exc:
            # onnxruntime's messages repeat the full path: name the file only.
            reason = str(exc).replace(params.path, name).strip()
            raise ValueError(f"cannot load the ONNX model {name!r}: {reason}") from None
        self.signature = [_Signature(arg.name, arg.type, list(arg.shape))
                          for arg in self.session.get_inputs()]
        for arg in self.signature:
            if arg.dtype is None:
                raise ValueError(f"ONNX model {name!r}: input {arg.name!r} is {arg.type_name}, "
                                 "which tensorline cannot send (numeric and bool tensors only)")
        outputs = [arg.name for arg in self.session.get_outputs()]
        self.output = params.output if params.output is not None else outputs[0]
        if self.output not in outputs:
            raise ValueError(f"ONNX model {name!r} has no output {self.output!r} "
                             f"(outputs: {', '.join(outputs)})")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        feeds = bind_model_inputs(inputs["in"], [arg.name for arg in self.signature])
        for arg in self.signature:
            arg.check(feeds[arg.name])
        session: onnxruntime.InferenceSession = self.session
        (result,) = session.run([self.output], feeds)
        if not isinstance(result, np.ndarray):
            raise ValueError(f"model output {self.output!r} is a {type(result).__name__}, "
                             "not a tensor")
        return result

    def cleanup(self) -> None:
        self.session = None


TENSORLINE_NODES = (OnnxModel,)
