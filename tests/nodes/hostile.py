"""An untrusted node module for the sandbox escape suite: ``Attack`` runs one of
``tests.nodes._attacks``, named by its ``what`` param; ``EventFlood`` floods a stream with
progress events."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tensorline.client import Json
from tensorline.server.nodes import Chunk, Node, Port, StreamingNode
from tests.nodes._attacks import ATTACKS, AttackParams


class Attack(Node):
    """Try the attack named by ``what``; output what it returned."""

    Params = AttackParams
    params: AttackParams
    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return ATTACKS[self.params.what](self)


class EventFlood(StreamingNode):
    """For each chunk: report progress for ``count`` ms, as fast as it can; output how many
    reports returned, and in how long (a report waits while the server does not read). With
    ``what="steps"``, send stream outputs of its own on the control socket instead, without
    waiting for the server's turn."""

    Params = AttackParams
    params: AttackParams
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for _ in chunks:
            if self.params.what == "steps":
                yield Json({"sent": _steps_out_of_turn(self.params.count / 1000)})
                continue
            sent = 0
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < self.params.count / 1000:
                self.context.report("x", 0.5)
                sent += 1
            yield Json({"sent": sent, "seconds": elapsed})


def _steps_out_of_turn(seconds: float) -> int:
    from tensorline.server.runtime.sandbox import _shm
    from tensorline.server.runtime.sandbox._messages import out_message

    control = socket.socket(fileno=os.dup(3))
    message, fresh = _shm.pack(out_message("x", None, 0.0), _shm.Outbox(name="steps"))
    sent = 0
    start = time.monotonic()
    with contextlib.suppress(OSError):
        while time.monotonic() - start < seconds:
            _shm.send(control, message, fresh)
            sent += 1
    return sent
