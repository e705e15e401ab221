"""Start-up warm-up: run the example calls node types declare (``Node.warmup``) once, so that
lazy imports, JIT compilation and caches are hot before the first request.

Each example runs as a one-node pipeline through the engine, exactly as a request would: the
selector places the node (in-process, or in a sandbox worker) and the runtime runs it, so it is
the runtime the first request of a plain manifest gets that is warmed. A sandbox worker warmed
this way is one worker; what every worker shares is what the launcher preloaded before forking
(``Settings.preload_modules``).

Only trusted node types can be warmed: an untrusted module's classes (and so its examples) exist
only in sandboxed workers. A warm-up that fails is logged with its node type and the server
serves regardless: warm-up only makes a first call faster, it never decides whether calls work.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence

from tensorline.server.executor import PipelineEngine
from tensorline.server.nodes import NodeEntry, WarmUp
from tensorline.server.runtime import ExecutionScope
from tensorline.wire import PortItem

log = logging.getLogger(__name__)

# In ``warmup_nodes``: every registered node type that declares warm-up examples.
ALL = "*"
# The node id of the one-node warm-up pipeline.
NODE_ID = "warmup"


def warmups_of(engine: PipelineEngine, node_types: Sequence[str]) -> list[tuple[str, WarmUp]]:
    """The examples to run for ``node_types`` (``warmup_nodes``), in order; the ones named that
    cannot be warmed are logged (a typo must not pass silently, nor stop a server)."""
    names = list(dict.fromkeys(node_types))
    entries: list[NodeEntry] = []
    if ALL in names:
        entries = [entry for entry in engine.registry if entry.cls is not None and entry.cls.warmup]
    for name in (n for n in names if n != ALL):
        if name not in engine.registry:
            log.warning("warm-up: unknown node type %r (not warmed)", name)
            continue
        entry = engine.registry.get(name)
        if entry.cls is None:
            log.warning("warm-up: node type %s is untrusted, its class exists only in sandboxed "
                        "workers (not warmed)", name)
        elif not entry.cls.warmup:
            log.warning("warm-up: node type %s declares no warm-up inputs (not warmed)", name)
        elif entry not in entries:
            entries.append(entry)
    assert all(entry.cls is not None for entry in entries)
    return [(entry.node_type, example) for entry in entries
            for example in entry.cls.warmup]  # type: ignore[union-attr]


async def warm_up(engine: PipelineEngine, node_types: Sequence[str]) -> list[str]:
    """Run the warm-up examples of ``node_types`` one after the other (they compete for the same
    cores as everything else at start); returns the node types whose warm-up failed."""
    failed: list[str] = []
    for node_type, example in warmups_of(engine, node_types):
        if node_type in failed:
            continue
        started = time.perf_counter()
        manifest = {"version": "v1", "metadata": {"name": f"warm-up {node_type}"},
                    "nodes": [{"id": NODE_ID, "node_type": node_type,
                               "params": dict(example.params)}]}
        try:
            result, _ = await engine.execute(
                json.dumps(manifest),
                [PortItem(NODE_ID, port, value) for port, value in example.inputs.items()],
                scope=ExecutionScope(execution_id=f"warmup-{uuid.uuid4().hex}"))
        except Exception as exc:
            failed.append(node_type)
            log.error("warm-up of node type %s failed (the server serves regardless): %s",
                      node_type, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            continue
        runtime = result.reports[0].runtime if result.reports else "?"
        log.info("warm-up of node type %s: %.0f ms (%s)", node_type,
                 (time.perf_counter() - started) * 1000, runtime)
    return failed
