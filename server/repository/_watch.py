"""Watching the pipeline directory: after each batch of changes to manifest files, the
repository reconciles the whole directory with what it has loaded.

``watchfiles.awatch`` (inotify on Linux) groups the events of a burst: it yields once no new
change came for ``step_ms`` (at most ``debounce_ms`` after the first), so an editor's
write-then-rename or a ``cp`` of several files becomes one reconciliation. What changed is not
used: the repository rescans the directory, so a missed or reordered event cannot leave it out
of step for longer than the next change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import Change, awatch

log = logging.getLogger(__name__)


class DirectoryWatcher:
    """Calls ``on_change`` after each batch of changes to files of ``suffixes`` in
    ``directory`` (not recursive); ``stop`` ends it and waits for it."""

    def __init__(self, directory: Path, on_change: Callable[[], Awaitable[None]],
                 suffixes: tuple[str, ...], *, debounce_ms: int = 1600,
                 step_ms: int = 100) -> None:
        self.directory = directory
        self._on_change = on_change
        self._suffixes = suffixes
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _relevant(self, change: Change, path: str) -> bool:
        return path.endswith(self._suffixes)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        log.info("watching %s for pipeline changes", self.directory)
        async for _ in awatch(self.directory, watch_filter=self._relevant,
                              stop_event=self._stop, debounce=self._debounce_ms,
                              step=self._step_ms, recursive=False):
            try:
                await self._on_change()
            except Exception:
                # The next change is a new chance: the watcher keeps watching.
                log.exception("reloading the pipeline directory %s failed", self.directory)

    async def stop(self) -> None:
        """End the watch (a reload in progress is cancelled) and wait for it; idempotent."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
