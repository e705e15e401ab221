"""How the model nodes (``OnnxModel``, ``TorchScriptModel``) take their inputs.

A model node has one input port, ``in``, that accepts several values (``many``): a model with
one input takes one plain tensor; a model with several takes one value per model input, each
either tagged with the input's name (``Tagged(array, {"input": "x"})``, in any order) or untagged,
in which case the untagged values fill the remaining inputs in the model's signature order (the
order of the connections in the manifest, or of the request's inputs). Every failure names the
model input concerned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorline.server.nodes._node import Port
from tensorline.wire import Tagged

# The metadata key naming the model input a tagged value is for.
INPUT_TAG = "input"

MODEL_INPUT = Port(
    "in", kind="any", many=True,
    description="tensor(s): one per model input, tagged {'input': name} or in signature order")
MODEL_OUTPUT = Port("out", kind="tensor", description="the selected model output")


def bind_model_inputs(values: Any, names: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The model inputs (name -> array, in signature order) the values on port ``in`` give."""
    if not isinstance(values, list):  # a direct caller's single value
        values = [values]
    named: dict[str, npt.NDArray[Any]] = {}
    positional: list[npt.NDArray[Any]] = []
    for index, value in enumerate(values):
        bare = value.value if isinstance(value, Tagged) else value
        name = value.metadata.get(INPUT_TAG) if isinstance(value, Tagged) else None
        what = f"model input {name!r}" if name is not None else f"value {index} on port 'in'"
        if not isinstance(bare, np.ndarray):
            raise ValueError(f"{what} must be a tensor, got {type(bare).__name__}")
        if name is None:
            positional.append(bare)
            continue
        if name not in names:
            raise ValueError(f"value {index} on port 'in' is tagged for model input {name!r}, "
                             f"which the model does not have (inputs: {', '.join(names)})")
        if name in named:
            raise ValueError(f"model input {name!r} was given twice")
        named[name] = bare
    rest = [name for name in names if name not in named]
    if len(positional) != len(rest):
        raise ValueError(f"the model takes {len(names)} input(s) ({', '.join(names)}); port "
                         f"'in' got {len(values)} value(s), {len(named)} tagged by name, so "
                         f"{len(rest)} untagged value(s) were expected, got {len(positional)}")
    named.update(zip(rest, positional, strict=True))
    return {name: named[name] for name in names}
