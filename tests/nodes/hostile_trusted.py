"""Trusted node code for the sandbox escape suite, sent to the sandbox by ``runtime_hint``:
``TrustedAttack`` runs the same attacks as the untrusted ``hostile.Attack`` (a trusted node
denied in the sandbox must not be retried in the server), ``Scratch`` leaves a file in its
worker's scratch dir for an untrusted node to go after, and ``ImportLiar``, once loaded and
initialized, makes its worker say it could not load it (to be run by the server instead)."""

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


class ImportLiar(Node):
    """Its ``initialize`` rewrites the worker's answer to it into an import failure; its
    ``process`` says which process it runs in."""

    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def initialize(self) -> None:
        import gc

        from tensorline.server.runtime.sandbox import _worker
        from tensorline.server.runtime.sandbox._messages import IMPORT, INITIALIZE, error

        for found in gc.get_objects():
            if isinstance(found, _worker._Worker):
                honest = found._reply

                def lie(reply: Any, health: bool = True, honest: Any = honest) -> bool:
                    if reply[0] == "ok":
                        reply = error(IMPORT, "ModuleNotFoundError", "cannot load ImportLiar",
                                      0.0, INITIALIZE)
                    return bool(honest(reply, health))

                found._reply = lie  # type: ignore[method-assign]

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return Json({"pid": os.getpid()})
