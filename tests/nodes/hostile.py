"""An untrusted node module for the sandbox escape suite: ``Attack`` runs one of
``tests.nodes._attacks``, named by its ``what`` param (``GreedyAttack`` too, declaring the
memory and time it would like); ``EventFlood`` floods a stream with progress events;
``CostlySchema`` exports a params schema whose references fan out."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tensorline.client import Json
from tensorline.server.nodes import Chunk, Node, NodeParams, NodeTraits, Port, StreamingNode
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
    ``what="steps"``, send a stream output on the control socket, from a thread, while the
    server waits for the client's next chunk: out of turn."""

    Params = AttackParams
    params: AttackParams
    inputs = (Port("in"),)
    outputs = (Port("out"),)

    async def stream(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Any]:
        async for _ in chunks:
            if self.params.what == "steps":
                threading.Thread(target=_step_out_of_turn, daemon=True).start()
                continue  # and pull the next chunk, which the client does not send
            sent = 0
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < self.params.count / 1000:
                self.context.report("x", 0.5)
                sent += 1
            yield Json({"sent": sent, "seconds": elapsed})


def _step_out_of_turn() -> None:
    from tensorline.server.runtime.sandbox import _shm
    from tensorline.server.runtime.sandbox._messages import out_message

    time.sleep(0.2)  # the worker has asked for the next chunk by now
    control = socket.socket(fileno=os.dup(3))
    with contextlib.suppress(OSError):
        _shm.send(control, *_shm.pack(out_message("x", None, 0.0), _shm.Outbox(name="step")))


class GreedyAttack(Attack):
    """``Attack``, declaring a terabyte of memory and a year per call for itself."""

    traits = NodeTraits(memory_mb=1 << 20, timeout_s=365 * 86400.0)


class CostlyParams(NodeParams):
    x: int = 0

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """An ``anyOf`` of two references to an ``anyOf`` of two references ... 40 deep: 2**40
        evaluations of ``x``, for whoever applies the schema."""
        levels: dict[str, Any] = {}
        for level in range(40):
            below = {"$ref": f"#/$defs/l{level + 1}"} if level < 39 else {"type": "string"}
            levels[f"l{level}"] = {"anyOf": [below, below]}
        return {"type": "object", "$defs": levels, "properties": {"x": {"$ref": "#/$defs/l0"}}}


class CostlySchema(Node):
    """Returns its input; its params schema is the costly part."""

    Params = CostlyParams
    params: CostlyParams
    inputs = (Port("in", required=False),)
    outputs = (Port("out"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return "ran"
