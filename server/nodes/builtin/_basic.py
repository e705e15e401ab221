"""Basic tensor nodes: identity, arithmetic, dtype and shape changes, normalization."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from functools import reduce
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from tensorline.server.nodes import Json
from tensorline.server.nodes._node import Node, NodeParams, NodeTraits, Port
from tensorline.wire import SUPPORTED_DTYPES


class PassThrough(Node):
    """Return the input unchanged (any kind of value)."""

    inputs = (Port("in", description="any value"),)
    outputs = (Port("out", description="the same value"),)
    traits = NodeTraits(isolation="any")

    # Async on purpose: an identity must not pay a thread-pool hop.
    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]


class ScaleParams(NodeParams):
    factor: float = Field(1.0, description="multiplier")


class Scale(Node):
    """Multiply a tensor by a factor (integer tensors become float64 unless the factor is whole)."""

    Params = ScaleParams
    params: ScaleParams
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        array = inputs["in"]
        factor = self.params.factor
        # dtype.kind rather than np.issubdtype: the same test ("iu": integer, "fc": inexact) at
        # a fraction of the cost, which matters for a node this short.
        kind = array.dtype.kind
        if kind in "iu" and float(factor).is_integer():
            info = np.iinfo(array.dtype)
            if info.min <= int(factor) <= info.max:
                return array * array.dtype.type(int(factor))
            return array * factor  # a whole factor the dtype cannot hold (-1 for uint8): float64
        if kind in "fc":
            return array * array.dtype.type(factor)
        return array * factor


class Add(Node):
    """Element-wise sum of every tensor connected to (or sent to) the 'in' port (fan-in)."""

    inputs = (Port("in", kind="tensor", many=True, description="two or more tensors"),)
    outputs = (Port("out", kind="tensor"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        arrays = inputs["in"]
        if not arrays:
            raise ValueError("Add needs at least one input")
        return reduce(operator.add, arrays)


_OPS: dict[str, Callable[[float, float], float]] = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.truediv,
}


class CalculatorParams(NodeParams):
    operation: Literal["add", "subtract", "multiply", "divide"] | None = Field(
        None, description="default operation when the request does not name one")


class Calculator(Node):
    """The reference JSON calculator: {"operation": "add", "operands": [1, 2]} -> {"result": 3}.

    Operations: add, subtract, multiply, divide, applied left to right over the operands.
    """

    Params = CalculatorParams
    params: CalculatorParams
    inputs = (Port("in", kind="json"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        request = inputs["in"].value
        if not isinstance(request, dict):
            raise ValueError("expected a JSON object with 'operation' and 'operands'")
        operation = request.get("operation", self.params.operation)
        if operation not in _OPS:
            raise ValueError(f"unknown operation {operation!r}; use one of {sorted(_OPS)}")
        operands = request.get("operands")
        if not isinstance(operands, list) or len(operands) < 2 or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in operands
        ):
            raise ValueError("'operands' must be a list of at least two numbers")
        if operation == "divide" and any(x == 0 for x in operands[1:]):
            raise ZeroDivisionError("division by zero")
        result = reduce(_OPS[operation], operands)
        if operation != "divide" and all(isinstance(x, int) for x in operands):
            result = int(result)
        return Json({"operation": operation, "operands": operands, "result": result})


class CastParams(NodeParams):
    dtype: str = Field(description="target numpy dtype, e.g. float32, int16")

    @field_validator("dtype")
    @classmethod
    def _supported(cls, value: str) -> str:
        try:
            name = str(np.dtype(value))
        except TypeError:
            raise ValueError(f"not a dtype: {value!r}") from None
        if name not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {name} is not supported; use one of "
                             f"{', '.join(SUPPORTED_DTYPES)}")
        return name


class Cast(Node):
    """Convert a tensor to another dtype (numpy casting rules, unsafe casts allowed)."""

    Params = CastParams
    params: CastParams
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        array = inputs["in"]
        if array.dtype == np.dtype(self.params.dtype):
            return array
        return array.astype(self.params.dtype)


class ReshapeParams(NodeParams):
    shape: list[int] = Field(description="new shape; one dimension may be -1")

    @field_validator("shape")
    @classmethod
    def _one_unknown(cls, value: list[int]) -> list[int]:
        if sum(1 for d in value if d == -1) > 1 or any(d < -1 for d in value):
            raise ValueError("dimensions must be >= 0, with at most one -1")
        return value


class Reshape(Node):
    """Give a tensor a new shape with the same number of elements (a view, no copy)."""

    Params = ReshapeParams
    params: ReshapeParams
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"].reshape(self.params.shape)


class NormalizeParams(NodeParams):
    mean: float | None = Field(None, description="subtracted; default: the tensor's own mean")
    std: float | None = Field(None, gt=0, description="divisor; default: the tensor's own std")
    epsilon: float = Field(1e-8, ge=0, description="added to a computed std")


class Normalize(Node):
    """(x - mean) / std, with mean/std given or computed from the tensor; float output."""

    Params = NormalizeParams
    params: NormalizeParams
    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        array = inputs["in"]
        # Floating and complex tensors keep their dtype (complex must not lose its imaginary part).
        out_dtype = array.dtype if np.issubdtype(array.dtype, np.inexact) else np.float64
        data = array.astype(out_dtype, copy=False)
        mean = self.params.mean if self.params.mean is not None else data.mean()
        std = self.params.std if self.params.std is not None else data.std() + self.params.epsilon
        return ((data - mean) / std).astype(out_dtype, copy=False)
