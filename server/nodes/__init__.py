"""Node SDK and registry: write a node by subclassing ``Node``.

    from tensorline.server.nodes import Node, NodeParams, Port

    class Gain(Node):
        \"\"\"Multiply by a gain.\"\"\"

        class Params(NodeParams):
            gain: float = 1.0

        inputs = (Port("in", kind="tensor"),)
        outputs = (Port("out", kind="tensor"),)

        def process(self, inputs):
            return inputs["in"] * self.params.gain

Port values: ``tensor`` numpy arrays, ``audio`` ``Audio``, ``text`` str, ``binary`` bytes,
``json`` ``Json`` (a node may return a plain dict, list, str, number or bool for a json output:
the executor wraps it), any of them wrapped in ``Tagged`` to carry metadata.
"""

from tensorline.server.nodes._node import (
    Isolation,
    Node,
    NodeContext,
    NodeParams,
    NodeTraits,
    NoParams,
    Port,
    PortKind,
    WarmUp,
)
from tensorline.server.nodes._registry import (
    ENTRY_POINT_GROUP,
    MissingDependency,
    NodeEntry,
    NodeModuleError,
    NodeRegistry,
    UnknownNodeType,
)
from tensorline.server.nodes._streaming import END_OF_STREAM, Chunk, Emit, StreamingNode
from tensorline.wire import Audio, Json, Tagged

__all__ = [
    "END_OF_STREAM",
    "ENTRY_POINT_GROUP",
    "Audio",
    "Chunk",
    "Emit",
    "Isolation",
    "Json",
    "MissingDependency",
    "NoParams",
    "Node",
    "NodeContext",
    "NodeEntry",
    "NodeModuleError",
    "NodeParams",
    "NodeRegistry",
    "NodeTraits",
    "Port",
    "PortKind",
    "StreamingNode",
    "Tagged",
    "UnknownNodeType",
    "WarmUp",
]
