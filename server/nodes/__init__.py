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

A param naming a model file is a ``ModelPath``: the server resolves it against its model roots
and refuses a path that leads out of them (see ``_model_files``).
"""

from tensorline.server.nodes._catalogue import (
    CatalogueInvalid,
    NodeDescription,
    describe_module,
    entry_of,
    parse_catalogue,
)
from tensorline.server.nodes._model_files import (
    MODEL_ROOTS,
    ModelFileChanged,
    ModelPath,
    check_unchanged,
    model_roots_context,
    resolve_model_path,
)
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
from tensorline.server.nodes._params_schema import SchemaViolation, schema_violations
from tensorline.server.nodes._registry import (
    ENTRY_POINT_GROUP,
    MissingDependency,
    NodeEntry,
    NodeModuleError,
    NodeRegistry,
    UnknownNodeType,
    needs_message,
)
from tensorline.server.nodes._streaming import END_OF_STREAM, Chunk, Emit, StreamingNode
from tensorline.wire import Audio, Json, Tagged

__all__ = [
    "END_OF_STREAM",
    "ENTRY_POINT_GROUP",
    "MODEL_ROOTS",
    "Audio",
    "CatalogueInvalid",
    "Chunk",
    "Emit",
    "Isolation",
    "Json",
    "MissingDependency",
    "ModelFileChanged",
    "ModelPath",
    "NoParams",
    "Node",
    "NodeContext",
    "NodeDescription",
    "NodeEntry",
    "NodeModuleError",
    "NodeParams",
    "NodeRegistry",
    "NodeTraits",
    "Port",
    "PortKind",
    "SchemaViolation",
    "StreamingNode",
    "Tagged",
    "UnknownNodeType",
    "WarmUp",
    "check_unchanged",
    "describe_module",
    "entry_of",
    "model_roots_context",
    "needs_message",
    "parse_catalogue",
    "resolve_model_path",
    "schema_violations",
]
