"""An untrusted node module that sends the server garbage in its catalogue: at import it
replaces the worker's class describer (it runs in the same process as the describer, so it can)
and declares classes whose descriptions break the server's bounds. The server must reject
each of those with a log line and still list ``GarbageSurvivor``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorline.server.nodes import Node, Port, _catalogue


class GarbageSurvivor(Node):
    """Well-formed: listed whatever happens to its neighbours."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"] * 2


class Forged(Node):
    """Described as garbage by the replaced describer."""


class Scale(Node):
    """Tries to shadow the trusted built-in ``Scale``."""


class NewlineType(Node):
    node_type = "Evil\nType"


class LongPort(Node):
    inputs = (Port("p" * 5000),)


_honest = _catalogue._describe_class


def _forging(cls: Any) -> dict[str, Any]:
    if cls is Forged:
        return {"node_type": ["not", "a", "string"], "params_schema": 42, "extra": "x" * 10000}
    return _honest(cls)


_catalogue._describe_class = _forging
