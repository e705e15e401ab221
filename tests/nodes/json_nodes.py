"""Test nodes whose json output ports get plain Python values (dicts, lists, scalars)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np

from tensorline.server.nodes import Chunk, Json, Node, Port, StreamingNode


class Summary(Node):
    """A dict for the one json port."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        x = inputs["in"]
        return {"mean": float(x.mean()), "shape": list(x.shape)}


class Listing(Node):
    """A list for the one json port."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return [int(v) for v in inputs["in"]]


class NamedLikeItsPort(Node):
    """A document whose only key is the port's name: still the document."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return {"out": len(inputs["in"])}


class ExplicitPort(Node):
    """{port: Json(...)}: the port mapping form, still accepted."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return {"out": Json({"n": len(inputs["in"])})}


class StatsAndDouble(Node):
    """Several ports: a plain dict on the json one, an array on the tensor one."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("stats", kind="json"), Port("doubled", kind="tensor"))

    def process(self, inputs: Mapping[str, Any]) -> Any:
        x = inputs["in"]
        return {"stats": {"n": len(x), "ok": True}, "doubled": x * 2}


class NotJson(Node):
    """A dict that JSON cannot carry: the node's own error."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return {"array": inputs["in"]}


class Counts(StreamingNode):
    """A streaming node yielding a dict per chunk on its json port."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="json"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        total = 0
        async for chunk in chunks:
            total += int(np.asarray(chunk.value).size)
            yield {"sequence": chunk.sequence, "total": total}
