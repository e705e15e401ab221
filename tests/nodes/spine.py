"""Test nodes for the spine suite: rendezvous (concurrency), probes (sharing), odd failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from tensorline.server.nodes import Node, NodeParams, NodeTraits, Port

# Rendezvous name -> event, created on the loop that first asks for it.
_EVENTS: dict[str, asyncio.Event] = {}
# Probe node id -> the object it received.
SEEN: dict[str, Any] = {}
SEEN_LOCK = threading.Lock()


def rendezvous_event(name: str) -> asyncio.Event:
    return _EVENTS.setdefault(name, asyncio.Event())


def reset() -> None:
    _EVENTS.clear()
    with SEEN_LOCK:
        SEEN.clear()


class RendezvousParams(NodeParams):
    name: str
    wait_for: str


class Rendezvous(Node):
    """Set this node's event, then wait for another node's: finishes only if both run at once."""

    Params = RendezvousParams
    params: RendezvousParams

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        rendezvous_event(self.params.name).set()
        await rendezvous_event(self.params.wait_for).wait()
        return inputs["in"]


class Probe(Node):
    """Record the object received (by node id) and return it unchanged."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        with SEEN_LOCK:
            SEEN[self.context.node_id] = inputs["in"]
        return inputs["in"]


class SyncProbe(Node):
    """Record the thread that ran process (sync nodes must not run on the event loop)."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        with SEEN_LOCK:
            SEEN[self.context.node_id] = threading.current_thread().name
        return inputs["in"]


class Triple(Node):
    """Three outputs from one input: x, 2x, 3x."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("x", kind="tensor"), Port("twice", kind="tensor"), Port("thrice", kind="tensor"))

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        x = inputs["in"]
        return {"x": x, "twice": x * 2, "thrice": x * 3}


class OptionalBias(Node):
    """x + bias, where the 'bias' input is optional."""

    inputs = (Port("x", kind="tensor"), Port("bias", kind="tensor", required=False))
    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["x"] + inputs.get("bias", 0)


class TextOnly(Node):
    """Upper-case text."""

    inputs = (Port("in", kind="text"),)
    outputs = (Port("out", kind="text"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return str(inputs["in"]).upper()


class FailInit(Node):
    """Raise from initialize (RuntimeError); cleanup is recorded (basic.EVENTS by node id)."""

    def initialize(self) -> None:
        raise RuntimeError("cannot load the model")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]

    def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(self.context.node_id, "cleanup")


class FailProcess(Node):
    """Raise from a sync process; initialize and cleanup are recorded (basic.EVENTS)."""

    async def initialize(self) -> None:
        from tests.nodes.basic import record

        record(self.context.node_id, "initialize")

    def process(self, inputs: Mapping[str, Any]) -> Any:
        raise OSError("disk on fire")

    async def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(self.context.node_id, "cleanup")


class WrongOutput(Node):
    """Return a Python set, which no wire kind can carry."""

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return {1, 2, 3}


class KeyFail(Node):
    """Raise KeyError from a sync process."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        raise KeyError("missing-thing")


class FloatOut(Node):
    """Return a Python float on a tensor port (becomes a 0-d array)."""

    outputs = (Port("out", kind="tensor"),)

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return float(np.asarray(inputs["in"]).sum())


class WarmParams(NodeParams):
    name: str = "model"


class WarmModel(Node):
    """A reusable node that records initialize/cleanup under 'warm:<name>' (see basic.EVENTS)."""

    Params = WarmParams
    params: WarmParams
    reusable = True

    async def initialize(self) -> None:
        from tests.nodes.basic import record

        record(f"warm:{self.params.name}", "initialize")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]

    def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(f"warm:{self.params.name}", "cleanup")


class BadOutputParams(NodeParams):
    what: str


class BadOutput(Node):
    """Return a value of a known kind that cannot travel on the wire (chosen by 'what')."""

    Params = BadOutputParams
    params: BadOutputParams

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        from tensorline.server.nodes import Audio, Json, Tagged

        return {
            "strings": np.array(["a", "b"]),
            "float128": np.zeros(2, dtype=np.longdouble),
            "audio_rate": Audio(np.zeros(4, dtype=np.int16), 0),
            "audio_shape": Audio(np.zeros((2, 2, 2), dtype=np.int16), 8000),
            "json_nan": Json({"x": float("nan")}),
            "json_object": Json({"x": object()}),
            "surrogate": "\ud800",
            "metadata": Tagged(np.zeros(1), {"k": 1}),  # type: ignore[dict-item]
            "metadata_none": Tagged(np.zeros(1), None),  # type: ignore[arg-type]
            "metadata_pairs": Tagged(np.zeros(1), [("k", "v")]),  # type: ignore[arg-type]
            "nested_tagged": Tagged(Tagged(np.zeros(1), {}), {}),
        }[self.params.what]


class WarmSlowSync(Node):
    """Reusable; busy-waits (cooperatively) for the number of seconds given as its input and
    returns whether its context said "cancelled" when it finished."""

    reusable = True
    outputs = (Port("out", kind="tensor"),)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        import time

        end = time.monotonic() + float(inputs["in"])
        while time.monotonic() < end and not self.context.cancelled.is_set():
            time.sleep(0.01)
        return np.asarray(self.context.cancelled.is_set())


_BARRIERS: dict[str, threading.Barrier] = {}


class BarrierParams(NodeParams):
    name: str
    parties: int = 2


class SyncRendezvous(Node):
    """Sync: wait (in its thread) until `parties` nodes reach the named barrier (10 s at most)."""

    Params = BarrierParams
    params: BarrierParams
    # It waits for other requests: on the event loop it would wait for them forever.
    traits = NodeTraits(blocking=True)

    def process(self, inputs: Mapping[str, Any]) -> Any:
        with SEEN_LOCK:
            barrier = _BARRIERS.setdefault(self.params.name, threading.Barrier(self.params.parties))
        barrier.wait(timeout=10)
        return inputs["in"]


class ContractParams(NodeParams):
    how: str


class ContractBreaker(Node):
    """Two outputs ('a' tensor, 'b' text); breaks the output contract as 'how' says."""

    Params = ContractParams
    params: ContractParams
    outputs = (Port("a", kind="tensor"), Port("b", kind="text"))

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        x = inputs["in"]
        return {
            "bare": x,
            "unknown": {"a": x, "b": "ok", "c": x},
            "missing": {"a": x},
            "none": {"a": x, "b": None},
            "kind": {"a": "not a tensor", "b": "ok"},
            "fine": {"a": x, "b": "ok"},
        }[self.params.how]


class BadConstructor(Node):
    """Raise from __init__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise LookupError("no such device")


_FLAKY_FAILURES: dict[str, int] = {}


class FlakyWarmParams(NodeParams):
    name: str
    failures: int = 1


class FlakyWarm(Node):
    """Reusable; initialize fails the first `failures` times for its name, then succeeds.
    Lifecycle recorded in basic.EVENTS under 'flaky:<name>'."""

    Params = FlakyWarmParams
    params: FlakyWarmParams
    reusable = True

    async def initialize(self) -> None:
        from tests.nodes.basic import record

        key = self.params.name
        record(f"flaky:{key}", "initialize")
        _FLAKY_FAILURES[key] = _FLAKY_FAILURES.get(key, 0) + 1
        if _FLAKY_FAILURES[key] <= self.params.failures:
            raise ConnectionError("model server not ready")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        return inputs["in"]

    async def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(f"flaky:{self.params.name}", "cleanup")


class WarmGate(Node):
    """Reusable; process waits for rendezvous event '<name>:go' after setting '<name>:in'.
    Lifecycle recorded in basic.EVENTS under 'gate:<name>'."""

    Params = WarmParams
    params: WarmParams
    reusable = True

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        rendezvous_event(f"{self.params.name}:in").set()
        await rendezvous_event(f"{self.params.name}:go").wait()
        return inputs["in"]

    async def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(f"gate:{self.params.name}", "cleanup")


class SlowInitWarm(Node):
    """Reusable; initialize waits for rendezvous '<name>:init-go' after setting '<name>:init-in'.
    Lifecycle recorded in basic.EVENTS under 'slowinit:<name>'."""

    Params = WarmParams
    params: WarmParams
    reusable = True

    async def initialize(self) -> None:
        from tests.nodes.basic import record

        rendezvous_event(f"{self.params.name}:init-in").set()
        await rendezvous_event(f"{self.params.name}:init-go").wait()
        record(f"slowinit:{self.params.name}", "initialize")

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        from tests.nodes.basic import record

        record(f"slowinit:{self.params.name}", "process")
        return inputs["in"]

    async def cleanup(self) -> None:
        from tests.nodes.basic import record

        record(f"slowinit:{self.params.name}", "cleanup")


class Views(Node):
    """Strided, transposed and big-endian outputs: the server must encode them correctly."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("strided", kind="tensor"), Port("transposed", kind="tensor"),
               Port("bigendian", kind="tensor"), Port("scalar", kind="tensor"))

    async def process(self, inputs: Mapping[str, Any]) -> Any:
        x = inputs["in"]
        return {"strided": x[:, ::2], "transposed": x.T,
                "bigendian": x.astype(x.dtype.newbyteorder(">")), "scalar": x[0, 0]}
