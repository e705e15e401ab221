"""A test node whose class the sandbox cannot load: the fallback case that remains.

``ServerOnlyScale`` claims to live in ``SERVER_ONLY_MODULE``, a module no interpreter can import
(``_nodes_of`` skips it here too, so loading this file as a node module registers nothing).
A test registers the class by hand; the server then holds it, while a sandbox worker, which
imports node classes by module and qualified name, fails with ModuleNotFoundError: an ``import``
failure, the one kind of trusted-node failure the in-process fallback is for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorline.server.nodes import Node, NodeParams

SERVER_ONLY_MODULE = "tensorline_tests_server_only"


class ScaleParams(NodeParams):
    factor: float = 2.0


class ServerOnlyScale(Node):
    """Multiplies its input by ``factor``; importable only through this file."""

    __module__ = SERVER_ONLY_MODULE
    Params = ScaleParams
    params: ScaleParams

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"] * self.params.factor
