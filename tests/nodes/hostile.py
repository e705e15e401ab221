"""An untrusted node module for the sandbox escape suite: ``Attack`` runs one of
``tests.nodes._attacks``, named by its ``what`` param."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tensorline.server.nodes import Node, Port
from tests.nodes._attacks import ATTACKS, AttackParams


class Attack(Node):
    """Try the attack named by ``what``; output what it returned."""

    Params = AttackParams
    params: AttackParams
    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return ATTACKS[self.params.what](self)
