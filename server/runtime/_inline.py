"""When a sync in-process node runs on the event loop instead of the thread pool.

Handing a sync ``process`` to a pool thread and waking the loop with its result costs about
0.3 ms on a 2-core machine, more than all of tensorline's own work on a small request, while
most sync nodes are short numpy code. A node type earns running inline (on the loop, no hop) by
measurement, and loses it the moment one call is slow:

* a type starts in the pool (the first call's duration is unknown), unless it declares
  ``NodeTraits(blocking=False)`` (short: inline from its first call);
* it moves to the loop after ``streak`` pooled calls in a row each took less than ``bound_s``
  (timed inside the pool thread, so queueing for a thread does not count);
* one call that takes ``bound_s`` or more, inline or pooled, sends it back to the pool and
  doubles the streak it needs to come back (up to ``MAX_STREAK``), so a node that is fast, then
  slow, then fast again spends ever longer in the pool;
* ``NodeTraits(blocking=True)`` (waits on I/O, other requests, locks, or simply runs long), a
  per-call timeout (``timeout_s``, enforced only while a call runs in a thread) and
  ``bound_s == 0`` keep a type in the pool for good.

The cost of being wrong is bounded by one call: a type that ran inline 1,000 times and then
blocks for 5 s stalls the loop (every other request of the server) for those 5 s once, and its
next call goes to the pool. A call that waits for another request to make progress (a barrier)
would never return inline: such nodes must declare ``blocking=True``.

Counters are updated from pool threads without a lock: a lost update only delays a promotion by
a call, and a demotion is a plain assignment that nothing can undo but a full new streak.
"""

from __future__ import annotations

from tensorline.server.nodes import NodeEntry

# Fast pooled calls in a row a type needs before its first inline call.
FIRST_STREAK = 16
# The longest streak a repeatedly demoted type needs to come back.
MAX_STREAK = 4096


class InlinePace:
    """The running decision for one node type: inline or in the pool."""

    __slots__ = ("bound_s", "demotions", "inline", "needed", "never", "streak")

    def __init__(self, bound_s: float, *, never: bool, short: bool) -> None:
        self.bound_s = bound_s
        self.never = never or bound_s <= 0
        self.inline = short and not self.never
        self.needed = FIRST_STREAK
        self.streak = 0
        self.demotions = 0

    def ran(self, seconds: float) -> None:
        """Record one call's duration (on the loop for inline calls, in the pool thread
        otherwise)."""
        if seconds >= self.bound_s:
            if self.inline or self.streak:
                self._demote()
            return
        if not self.inline and not self.never:
            self.streak += 1
            if self.streak >= self.needed:
                self.inline = True

    def _demote(self) -> None:
        if self.inline:
            self.demotions += 1
            self.needed = min(self.needed * 2, MAX_STREAK)
        self.inline = False
        self.streak = 0


class InlinePolicy:
    """One ``InlinePace`` per node type (made on first use)."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self._paces: dict[str, InlinePace] = {}

    def pace(self, entry: NodeEntry, timeout_s: float | None) -> InlinePace:
        key = entry.node_type
        pace = self._paces.get(key)
        if pace is None:
            blocking = entry.traits.blocking
            pace = self._paces[key] = InlinePace(
                self.bound_s, never=bool(blocking) or entry.async_process,
                short=blocking is False)
        if timeout_s is not None and not pace.never:
            # Only a call in a thread can be abandoned at its timeout; the loop cannot be.
            return _POOLED
        return pace

    def stats(self) -> dict[str, float]:
        paces = self._paces.values()
        return {"inline_node_types": float(sum(1 for p in paces if p.inline)),
                "inline_demotions": float(sum(p.demotions for p in paces))}


# The shared decision of calls that must run in the pool (a per-call timeout).
_POOLED = InlinePace(0.0, never=True, short=False)
