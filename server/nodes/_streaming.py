"""The streaming node SDK: nodes that are generators over their input stream.

A ``StreamingNode`` implements ``stream(chunks)`` as an async generator (``async def`` +
``yield``) over an async iterator of ``Chunk``, or as a sync generator over a sync iterator (it
then runs in a thread of its own, never on the event loop). The generator sees every input set of
the session in order, so one class covers every cardinality:

    class Batch(StreamingNode):
        async def stream(self, chunks):
            held = []
            async for chunk in chunks:          # N -> 1
                held.append(chunk.value)
                if len(held) == 4:
                    yield np.concatenate(held)
                    held = []
            if held:                             # flush at end of stream
                yield np.concatenate(held)

What it yields is what ``process`` would return: a bare value for a node with one output port,
or a mapping of port -> value; unlike ``process`` the mapping may name only some ports. Each
output is tagged with the sequence of the chunk pulled last (``-1`` once the input has ended);
yield ``Emit(value, sequence=...)`` to choose another.

State lives in the generator (locals) or in ``self``: a streaming session acquires its own
instance and its own generator, so nothing is shared across sessions. Only a ``reusable`` node's
instance is shared, so a reusable streaming node keeps its per-session state in locals.

In a unary ``ExecutePipeline`` call a streaming node runs over a one-chunk stream.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tensorline.server.nodes._node import Node

# Sequence of outputs produced after the input stream ended (flushes).
END_OF_STREAM = -1


@dataclass(frozen=True, slots=True)
class Chunk:
    """One input set of a streaming session: the input port values sharing ``sequence``."""

    sequence: int
    inputs: Mapping[str, Any]

    @property
    def value(self) -> Any:
        """The value of the node's only input port (ValueError when it has several)."""
        if len(self.inputs) != 1:
            raise ValueError(f"chunk {self.sequence} has inputs {sorted(self.inputs)}; "
                             "use chunk.inputs[port]")
        return next(iter(self.inputs.values()))


@dataclass(frozen=True, slots=True)
class Emit:
    """An output with an explicit sequence (instead of the last pulled chunk's)."""

    value: Any
    sequence: int


class StreamingNode(Node):
    """Base of nodes whose ``stream`` is a generator over the session's input chunks."""

    streaming: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Unary calls use process(): give the subclass one of the matching flavour, so a sync
        # generator runs in a thread and an async one on the loop, as the runtime expects.
        if "process" not in cls.__dict__ and "stream" in cls.__dict__:
            sync = inspect.isgeneratorfunction(cls.stream)
            cls.process = _process_sync if sync else _process_async  # type: ignore[assignment,method-assign]

    def stream(self, chunks: Any) -> Any:
        """An async generator over ``AsyncIterator[Chunk]`` or a sync one over
        ``Iterator[Chunk]``, yielding outputs (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__}.stream is not implemented")


def _single(node: Node, outputs: list[Any]) -> Any:
    values = [o.value if isinstance(o, Emit) else o for o in outputs]
    if len(values) != 1:
        raise ValueError(f"streaming node {type(node).__name__} produced {len(values)} outputs "
                         "for a single chunk; run it with StreamPipeline")
    return values[0]


def _process_sync(self: StreamingNode, inputs: Mapping[str, Any]) -> Any:
    one: Iterator[Chunk] = iter((Chunk(0, inputs),))
    return _single(self, list(self.stream(one)))


async def _process_async(self: StreamingNode, inputs: Mapping[str, Any]) -> Any:
    async def one() -> AsyncIterator[Chunk]:
        yield Chunk(0, inputs)

    return _single(self, [out async for out in self.stream(one())])
