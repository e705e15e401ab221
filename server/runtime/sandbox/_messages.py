"""The control protocol between the server and a sandbox worker, shared by both sides.

Messages are plain tuples, pickled by ``_shm``: the op (or status) first, its fields after. A
tuple costs nothing to build and unpickles without resolving a global, which the worker's and
the server's restricted unpicklers would otherwise have to allow-list (and which would cost
unpickle time on the per-request path). So the shapes stay tuples, and this module names them:
op and status constants, a builder per request and reply, and readers for what the other side
sent, so that neither side spells a position by hand. The hottest spots (the one-shot ``run``
request, the ``("ok", value, cpu)`` reply and its check) build and test the tuple inline with
these constants, without a function call.

Requests (server -> worker), one at a time; the worker answers each with one reply (a batch
with several, see below):

    ("init", iid, module, qualname, params_json, node_id, execution_id)   warm instances
    ("call", iid, inputs, init, releases)
    ("calls", iid, batch, init, releases)                                  several in order
    ("run", class_id, inputs, node_id, execution_id, define, releases)    one-shot nodes
    ("runs", class_id, batch, node_id, execution_id, define, releases)    several in order
    ("stream", iid, init, releases)                                        streaming session
    ("release", iids)
    ("describe", module)                                                   untrusted catalogue
    ("probe",)                                                             health check
    ("exit",)

``init`` is ``(module, qualname, params_json, node_id, execution_id)`` or None; ``define`` is
``(module, qualname, params_json)`` or None; ``releases`` (always the last field of ``call``,
``calls``, ``run``, ``runs`` and ``release``) lists instances whose cleanup runs first, None
when there are none.

``batch`` is a list of input sets: ``runs`` (``calls``) is that many ``run`` (``call``) requests
in one message. In ``runs``, ``node_id`` and ``execution_id`` are either one string for every
input set (a stream's queued chunks) or lists of one string per input set (calls of several
executions gathered into one request). Its replies are ``("ok", values, cpu_used)``, ``values``
those of the input sets that ran since the last reply, in order: one when the batch ends, and
one whenever ``BATCH_FLUSH_S`` has passed since the last, so that the server can give the next
input set a deadline of its own. The first failure ends the batch: the values before it, then
its ``error`` reply; a cancellation ends it before the next input set. A batch holds the worker
for ``BATCH_TURN_S`` at most (or one input set): past it no input set starts, and an empty
report ``("ok", [], cpu_used)`` ends the batch, handing the rest back to the server, which sends
it again when the worker's next turn comes.

Replies (worker -> server):

    ("ok", value, cpu_used)
    ("error", kind, exc_type, message, cpu_used, during)

``during`` is ``initialize`` or ``process``; ``kind`` is one of ``ERROR_KINDS``.

Before it runs anything of a node class it has just loaded, the worker says so: ``("loaded",)``.
The server then takes no ``import`` error for that request (the class loaded; its code ran), and
takes one at all only from a worker in which no node code has run yet (see
``_Calls._check_reply``): only such a failure may send a trusted node back to the server.

A stream session is a conversation inside one ``stream`` request, ending with the usual reply:

    worker -> server   ("need", cpu_used)                  the generator pulls
                       ("out", value, emit_sequence, cpu_used)
    server -> worker   ("chunk", sequence, inputs) or ("end",)   answers "need"
                       ("next",)                           answers "out"
                       ("cancel",)                         in place of either answer

At any time, worker -> server: ``("ready", layer_reports, cpu_used)`` once after start,
``("unhealthy", reason)``, ``("segment", size)`` (answered by the raw bytes
``SEGMENT_GRANTED`` and the size granted, with the segment's fd, or ``SEGMENT_REFUSED``) and,
during a stream, ``("event", kind, message, progress)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# --- requests (server -> worker) ------------------------------------------------------------

INIT = "init"
CALL = "call"
CALLS = "calls"
RUN = "run"
RUNS = "runs"
STREAM = "stream"
RELEASE = "release"
DESCRIBE = "describe"
PROBE = "probe"
EXIT = "exit"

# In a stream session.
CHUNK = "chunk"
END = "end"
NEXT = "next"
CANCEL = "cancel"

# --- worker -> server -----------------------------------------------------------------------

OK = "ok"
ERROR = "error"
READY = "ready"
UNHEALTHY = "unhealthy"
SEGMENT = "segment"
EVENT = "event"
LOADED = "loaded"
LOADED_MESSAGE: tuple[str] = (LOADED,)
NEED = "need"
OUT = "out"

# Error kinds: ``node`` (the node's own exception), ``memory`` (MemoryError under the cap),
# ``permission`` (a blocked syscall surfaced as EPERM/EACCES), ``limit`` (a cap of the sandbox:
# quota, file size, descriptors, threads), ``import`` (the node class cannot be loaded in the
# worker), ``gone`` (no such instance or class id: re-create it).
NODE = "node"
MEMORY = "memory"
PERMISSION = "permission"
LIMIT = "limit"
IMPORT = "import"
GONE = "gone"
ERROR_KINDS = frozenset({NODE, MEMORY, PERMISSION, LIMIT, IMPORT, GONE})

# Where an error happened (``during``).
INITIALIZE = "initialize"
PROCESS = "process"

# The server's answers to a worker's ``("segment", size)`` (raw bytes, not pickled): granted,
# followed by the segment's size (8 bytes, little-endian; at least what was asked), with its
# fd; or refused.
SEGMENT_GRANTED = b"segment"
SEGMENT_REFUSED = b"refused"

# What a worker may send beyond its replies (a stream's events, requests for a larger reply
# segment) costs the server's event loop a read and a check each: a token bucket per worker, a
# burst of CHATTER_BURST then CHATTER_RATE a second. Past it the worker's socket goes unread
# for CHATTER_PAUSE_S, so that only the worker waits, on its full socket.
CHATTER_BURST = 1000
CHATTER_RATE = 1000.0
CHATTER_PAUSE_S = 0.1

# A batch (``runs``) reports the values of the input sets that ran at least this often (seconds);
# the server allows each input set this much more than its deadline.
BATCH_FLUSH_S = 0.001
# How long a batch may hold its worker (beyond its first input set), so that other callers of
# the worker's pool get their turn as they would between single calls.
BATCH_TURN_S = 0.005

# Class ids (``run`` requests) a worker keeps; past this it forgets them all, and answers
# ``gone`` for an id it no longer knows (the server then starts over for that node).
MAX_CLASS_IDS = 1024

# Requests whose last field is the list of released instances (see ``with_releases``).
CARRIES_RELEASES = frozenset({RUN, RUNS, CALL, CALLS, RELEASE})
# Requests that run node code: create or run an instance, or import an untrusted module.
RUNS_NODE_CODE = frozenset({INIT, CALL, CALLS, RUN, RUNS, STREAM, DESCRIBE})
# Requests that are one call of a node: their duration is the node's (see ``_placement``).
TIMED = frozenset({CALL, RUN})

PROBE_REQUEST: tuple[str] = (PROBE,)
EXIT_REQUEST: tuple[str] = (EXIT,)
END_MESSAGE: tuple[str] = (END,)
NEXT_MESSAGE: tuple[str] = (NEXT,)
CANCEL_MESSAGE: tuple[str] = (CANCEL,)

# An instance's definition, sent with its first request: (module, qualname, params_json,
# node_id, execution_id); a one-shot class's: (module, qualname, params_json).
Init = tuple[str, str, str, str, str]
Define = tuple[str, str, str]


# --- building requests (server) ---------------------------------------------------------------

def init_request(iid: int, module: str, qualname: str, params_json: str, node_id: str,
                 execution_id: str) -> tuple[Any, ...]:
    return (INIT, iid, module, qualname, params_json, node_id, execution_id)


def call_request(iid: int, inputs: Mapping[str, Any], init: Init | None,
                 releases: list[int] | None) -> tuple[Any, ...]:
    return (CALL, iid, inputs if type(inputs) is dict else dict(inputs), init, releases)


def stream_request(iid: int, init: Init | None, releases: list[int] | None) -> tuple[Any, ...]:
    return (STREAM, iid, init, releases)


def release_request(iids: list[int] | None) -> tuple[Any, ...]:
    return (RELEASE, iids)


def describe_request(module: str) -> tuple[Any, ...]:
    return (DESCRIBE, module)


def chunk_message(sequence: int, inputs: Mapping[str, Any]) -> tuple[Any, ...]:
    return (CHUNK, sequence, dict(inputs))


def with_releases(request: tuple[Any, ...], releases: list[int]) -> tuple[Any, ...]:
    """``request`` (one of ``CARRIES_RELEASES``) with ``releases`` as its last field."""
    return (*request[:-1], releases)


# --- building replies and messages (worker) --------------------------------------------------

def ok(value: Any, cpu_used: float) -> tuple[Any, ...]:
    return (OK, value, cpu_used)


def error(kind: str, exc_type: str, message: str, cpu_used: float,
          during: str) -> tuple[Any, ...]:
    return (ERROR, kind, exc_type, message, cpu_used, during)


def ready_message(layer_reports: list[tuple[str, bool, str]],
                  cpu_used: float) -> tuple[Any, ...]:
    return (READY, layer_reports, cpu_used)


def unhealthy_message(reason: str) -> tuple[Any, ...]:
    return (UNHEALTHY, reason)


def segment_message(size: int) -> tuple[Any, ...]:
    return (SEGMENT, size)


def granted_message(size: int) -> bytes:
    """``SEGMENT_GRANTED`` for a segment of ``size`` bytes (its fd travels with it)."""
    return SEGMENT_GRANTED + size.to_bytes(8, "little")


def granted_size(data: bytes) -> int | None:
    """The size in a ``granted_message``, or None when ``data`` is not one."""
    if len(data) != len(SEGMENT_GRANTED) + 8 or not data.startswith(SEGMENT_GRANTED):
        return None
    return int.from_bytes(data[len(SEGMENT_GRANTED):], "little")


def need_message(cpu_used: float) -> tuple[Any, ...]:
    return (NEED, cpu_used)


def out_message(value: Any, emit_sequence: int | None, cpu_used: float) -> tuple[Any, ...]:
    return (OUT, value, emit_sequence, cpu_used)


def event_message(kind: str, message: str, progress: float) -> tuple[Any, ...]:
    return (EVENT, kind, message, progress)


# --- reading (worker) -----------------------------------------------------------------------

# Requests that name a hosted instance by its iid (their second field).
PER_INSTANCE = frozenset({CALL, CALLS, STREAM})


def chunk_fields(message: tuple[Any, ...]) -> tuple[int, Any]:
    """``(sequence, inputs)`` of a ``chunk`` message."""
    return int(message[1]), message[2]


# --- reading (server) -----------------------------------------------------------------------

def is_ok(reply: tuple[Any, ...]) -> bool:
    return reply[0] == OK and len(reply) == 3


def is_error(reply: tuple[Any, ...]) -> bool:
    return reply[0] == ERROR and len(reply) == 6


def is_gone(reply: tuple[Any, ...]) -> bool:
    """The worker does not know the instance or class id the request named."""
    return bool(reply[0] == ERROR and reply[1] == GONE)


def reached_process(reply: tuple[Any, ...]) -> bool:
    """The worker got as far as ``process`` (so it created the instance the request defined):
    an ``ok`` reply, or an error during ``process``."""
    return bool(reply[0] == OK or reply[-1] == PROCESS)


def error_fields(reply: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
    """``(kind, exc_type, message, during)`` of an ``error`` reply (``is_error``), unchecked:
    whatever the worker said."""
    _, kind, exc_type, message, _, during = reply
    return kind, exc_type, message, during
