"""Test nodes for the Open Inference Protocol suite: BYTES values, single-element kinds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorline.server.nodes import Node, Port


class UpperBytes(Node):
    """Upper-case a binary value (a one-element BYTES tensor over the protocol)."""

    inputs = (Port("in", kind="binary"),)
    outputs = (Port("out", kind="binary"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return bytes(inputs["in"]).upper()


class Describe(Node):
    """A binary and a JSON input in, a text summary and a complex tensor out (the complex one has
    no Open Inference Protocol datatype)."""

    inputs = (Port("blob", kind="binary"), Port("doc", kind="json"))
    outputs = (Port("summary", kind="text"), Port("spectrum", kind="tensor"))

    def process(self, inputs: Mapping[str, Any]) -> Any:
        doc = inputs["doc"].value
        return {"summary": f"{len(inputs['blob'])} bytes, keys {sorted(doc)}",
                "spectrum": np.fft.fft(np.arange(4.0))}
