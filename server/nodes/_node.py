"""The node SDK: what a node author writes.

A node is a class with a pydantic ``Params`` model, named input and output ports, optional
``initialize()``/``cleanup()`` and a ``process()`` that may be sync or async. Sync methods run in
a thread (in-process) or in a worker process (sandboxed); an in-process sync ``process`` that
has proved short (or declares ``NodeTraits(blocking=False)``) runs on the event loop instead,
without the thread hop, until one call of it takes long (``runtime/_inline.py``). Traits
describe the node to the selector (and ``blocking`` to the in-process runtime); they never
decide anything themselves.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

PortKind = Literal["tensor", "audio", "text", "json", "binary", "any"]
Isolation = Literal["any", "inprocess", "sandbox"]


class NodeParams(BaseModel):
    """Base for node parameter models: unknown parameters are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(NodeParams):
    """Parameters of a node that takes none."""


@dataclass(frozen=True, slots=True)
class Port:
    """A named input or output of a node.

    ``many`` input ports accept several connections (fan-in); the node then receives a list of
    values in the order the connections appear in the manifest.
    """

    name: str
    kind: PortKind = "any"
    description: str = ""
    required: bool = True
    many: bool = False


@dataclass(frozen=True, slots=True)
class NodeTraits:
    """What a node needs; the selector reads these, and the in-process runtime ``blocking``."""

    # Where the author wants the node to run ("any" leaves it to the selector).
    isolation: Isolation = "any"
    needs_gpu: bool = False
    # Peak memory the node needs, in MiB; also the sandbox memory cap when set.
    memory_mb: int | None = None
    # Pure-Python CPU-bound work holds the GIL: a worker process gives it a GIL of its own.
    cpu_bound: bool = False
    # Seconds one process() call may take before the node is stopped.
    timeout_s: float | None = None
    # Heavy libraries the node imports (torch, pandas, ...), for auto-detection.
    libraries: tuple[str, ...] = ()
    # How long a sync ``process`` runs in-process: True = it may block or run long (I/O, waits
    # on other requests or locks, runs an event loop of its own): always in a thread, never on
    # the server's event loop; False = always short (well under a millisecond): on the event
    # loop from its first call; None = unknown: the runtime measures (see runtime/_inline.py).
    blocking: bool | None = None


@dataclass(frozen=True, slots=True)
class WarmUp:
    """Example inputs (and params) a server runs a node with once at start, when the operator
    names the node type in ``warmup_nodes``: lazy imports, JIT compilation and caches are then
    hot before the first request (see ``service._warmup``).

    ``inputs`` maps input port name -> value, as ``process`` receives it; ``params`` are the
    node's params as a manifest gives them. Keep them small: they are built when the node's
    module is imported, and the warm-up should cost milliseconds once the imports are done.
    """

    inputs: Mapping[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)


_CONTEXT_LOCK = threading.Lock()


@dataclass(slots=True)
class NodeContext:
    """Per-execution facts a node may consult. ``cancelled`` is set when the call is abandoned
    (deadline, client cancel); long sync loops should check it and return early."""

    node_id: str
    execution_id: str
    runtime: str
    scratch_dir: str | None = None
    # Made on first use: most calls never look at it, and an Event is three allocations.
    _cancelled: threading.Event | None = field(default=None, repr=False)
    # Streaming sessions: where ``report`` goes (kind, message, progress); None = nowhere.
    on_event: Callable[[str, str, float], None] | None = None

    @property
    def cancelled(self) -> threading.Event:
        """Set when the call is abandoned (deadline, client cancel)."""
        if self._cancelled is None:
            with _CONTEXT_LOCK:  # the node's thread and the loop may both get here first
                if self._cancelled is None:
                    self._cancelled = threading.Event()
        return self._cancelled

    def report(self, message: str, progress: float = 0.0, kind: str = "progress") -> None:
        """Tell the client how initialization or work is going (e.g. model loading). In a
        streaming session it arrives as a StreamEvent, never mixed into the data (reports are
        dropped while the client lags far behind); elsewhere it goes nowhere. Safe to call from
        any thread."""
        if self.on_event is not None:
            self.on_event(kind, message, progress)


class Node:
    """Base class of every node.

    Subclasses set ``Params``, ``inputs``, ``outputs`` and optionally ``traits``, ``reusable``
    and ``node_type`` (defaults to the class name), and implement ``process``. ``process``
    receives a mapping of input port name -> value (a list for ``many`` ports) and returns either
    a mapping of output port name -> value or, for a node with one output port, the bare value.

    Inputs are read-only and may be shared with other nodes (fan-out does not copy): never modify
    them in place.

    ``reusable = True`` declares that an instance holds only request-independent state (a loaded
    model), so the runtime keeps it warm and shares it across requests (possibly concurrently).

    ``warmup``: example calls (``WarmUp``) the server may run once at start, so that the first
    request does not pay for lazy imports or first-use setup.
    """

    node_type: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[NodeParams]] = NoParams
    inputs: ClassVar[tuple[Port, ...]] = (Port("in"),)
    outputs: ClassVar[tuple[Port, ...]] = (Port("out"),)
    traits: ClassVar[NodeTraits] = NodeTraits()
    reusable: ClassVar[bool] = False
    # True for ``StreamingNode`` subclasses (generators over a stream; see ``_streaming``).
    streaming: ClassVar[bool] = False
    warmup: ClassVar[tuple[WarmUp, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "node_type" not in cls.__dict__:
            cls.node_type = cls.__name__
        if "description" not in cls.__dict__:
            doc = inspect.getdoc(cls) or ""
            cls.description = doc.split("\n\n", 1)[0].replace("\n", " ")

    def __init__(self, params: NodeParams, context: NodeContext) -> None:
        self.params = params
        self.context = context

    def initialize(self) -> Any:
        """Load models and open resources. May be ``async def``."""

    def process(self, inputs: Mapping[str, Any]) -> Any:
        """Compute the outputs. May be ``async def``."""
        raise NotImplementedError(f"{type(self).__name__}.process is not implemented")

    def cleanup(self) -> Any:
        """Release what initialize() acquired; always called, also after errors. May be async."""


def overrides(cls: type[Node], name: str) -> bool:
    """True when ``cls`` overrides the base ``Node`` method ``name`` (so calling it is needed)."""
    return getattr(cls, name) is not getattr(Node, name)


def is_async(cls: type[Node], name: str) -> bool:
    return inspect.iscoroutinefunction(getattr(cls, name))
