"""Trusted node code for the sandbox escape suite, sent to the sandbox by ``runtime_hint``:
``TrustedAttack`` runs the same attacks as the untrusted ``hostile.Attack`` (a trusted node
denied in the sandbox must not be retried in the server), ``Scratch`` leaves a file in its
worker's scratch dir for an untrusted node to go after."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tensorline.client import Json
from tensorline.server.nodes import Node, Port
from tests.nodes._attacks import ATTACKS, AttackParams


class TrustedAttack(Node):
    """Try the attack named by ``what``; output what it returned."""

    Params = AttackParams
    params: AttackParams
    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return ATTACKS[self.params.what](self)


class Scratch(Node):
    """Write a secret into the scratch dir; output the dir and this worker's pid."""

    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        scratch = self.context.scratch_dir
        assert scratch is not None
        with open(os.path.join(scratch, "secret.txt"), "w") as f:
            f.write("trusted-scratch-secret")
        return Json({"dir": scratch, "pid": os.getpid()})
