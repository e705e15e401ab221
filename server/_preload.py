"""Preloading: import operator-named modules once at start, so that no request pays for them.

The same list (``Settings.preload_modules``) is imported in two places: in the server process by
``TensorlineServer.start`` (``preload``: a module that fails to import stops the start, naming
it), and in the sandbox launcher before it forks any worker (``import_modules``: a failure there
is reported and logged, and the workers then import the module on demand as before; see
``runtime.sandbox._zygote``). Only trusted modules belong here: ``Settings`` refuses an untrusted
module, whose code must only ever run inside a sandboxed worker.

This module imports nothing of tensorline's, so the launcher can use it without pulling in the
server.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)


class PreloadError(RuntimeError):
    """A module named in ``preload_modules`` could not be imported in the server."""

    def __init__(self, module: str, cause: str) -> None:
        super().__init__(f"preload module {module!r} could not be imported: {cause}")
        self.module = module
        self.cause = cause


def import_modules(names: Iterable[str]) -> list[tuple[str, str]]:
    """Import each module in ``names``, in order; returns ``(module, error)`` for the ones that
    failed (the others stay imported)."""
    failures: list[tuple[str, str]] = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # an import may raise anything
            failures.append((name, f"{type(exc).__name__}: {exc}"))
    return failures


def preload(names: Iterable[str]) -> None:
    """Import ``names`` in this (the server) process; PreloadError names the first that fails."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    started = time.perf_counter()
    failures = import_modules(names)
    if failures:
        raise PreloadError(*failures[0])
    log.info("preloaded %d module(s) in %.0f ms: %s", len(names),
             (time.perf_counter() - started) * 1000, ", ".join(names))
