"""Loading a directory of manifests into named, versioned pipelines, and leasing them to calls.

Each manifest file (``MANIFEST_SUFFIXES``, not recursive) defines one name: ``metadata.name``,
else the file name without its suffix. A name's file is read, validated and compiled, its
signature checked (``_signature``) and its nodes' instances created in the runtimes that will
run them (``PipelineEngine.warm_plan``); only then does that version take calls. Versions count
up per name from 1, one per load of a changed file (a load that fails uses its number too, so
the reason "version 3: ..." names exactly that attempt).

Calls hold a version through ``lease``: a replaced version keeps serving the calls that hold it
and is dropped when the last one ends; a new call gets the newest ready version (or the one it
names, while it is the newest). A version that fails to load leaves the one before it serving.
Two files defining one name are both reported and neither is served, however they came to be,
so the outcome never depends on the order of events. ``refresh`` reconciles the whole directory
with what is loaded, which the file watcher (``_watch``) calls after each batch of changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorline.server._errors import DeadlineExceeded, PipelineNotFound, RequestInvalid, clip
from tensorline.server.executor import PipelineEngine
from tensorline.server.repository._model import LoadedPipeline, PipelineState, State
from tensorline.server.repository._signature import signature
from tensorline.server.repository._watch import DirectoryWatcher
from tensorline.wire import Violation, load_yaml

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# Longest a version's warm-up (creating its nodes' instances) may take before it is given up.
WARM_TIMEOUT_S = 120.0


@dataclass(slots=True)
class _File:
    """One manifest file as last read: the name it defines and its content (or why not)."""

    path: Path
    name: str
    text: str
    data: dict[str, Any] | None
    error: str = ""


@dataclass(slots=True)
class _Version:
    pipeline: LoadedPipeline
    leases: int = 0
    # Replaced or unloaded: serves the calls that hold it, none new; dropped at zero leases.
    retired: bool = False


@dataclass(slots=True)
class _Name:
    """Everything the repository knows of one name."""

    # The version new calls get (None: not served).
    current: int | None = None
    # The current version and the retired ones still draining.
    versions: dict[int, _Version] = field(default_factory=dict)
    # Whether a file defines it now (listed by ``states`` even when not served).
    listed: bool = True
    # The manifest text last loaded or tried: an unchanged file is not loaded again.
    text: str | None = None
    source: Path | None = None
    loading: int | None = None
    # Why it is not served, or why its latest version failed while an older one serves.
    reason: str = ""


def _read(path: Path, previous: str | None) -> _File:
    """Read and parse one manifest. A file that cannot be parsed is attributed to the name it
    defined before (``previous``), so a bad edit of a served pipeline fails that pipeline's new
    version instead of unloading it under another name."""
    name = previous or path.stem
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        return _File(path, name, "", None, f"cannot read {path.name}: {exc}")
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except ValueError as exc:
        return _File(path, name, text, None, f"{path.name} is not valid "
                                             f"{'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(data, dict):
        return _File(path, name, text, None, f"{path.name}: a manifest must be a mapping, got "
                                             f"{type(data).__name__}")
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str) and metadata["name"]:
        name = metadata["name"]
    else:
        name = path.stem
    return _File(path, name, text, data)


def _why(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


class PipelineRepository:
    """Named pipelines compiled from the manifests in ``directory`` (not recursive; OSError
    if it is not a directory).

    ``on_change`` is awaited after every change of what ``states`` reports (the server keeps
    the per-pipeline health in step with it)."""

    def __init__(self, engine: PipelineEngine, directory: Path, *,
                 warm_timeout_s: float = WARM_TIMEOUT_S,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        if not directory.is_dir():
            # Raised while the server is assembled, before anything starts: a typo in
            # ``--pipelines`` stops ``serve`` with one line naming the path.
            raise OSError(f"the pipeline directory {directory} does not exist or is not a "
                          "directory (--pipelines, TENSORLINE_PIPELINES_DIR)")
        self.engine = engine
        self.directory = directory
        self.warm_timeout_s = warm_timeout_s
        self.on_change = on_change
        self._names: dict[str, _Name] = {}
        # The name each file defined when last read.
        self._file_names: dict[Path, str] = {}
        self._numbers: dict[str, int] = {}
        # One change at a time (the watcher, ``load``, ``unload``): each sees the result of the
        # one before.
        self._lock = asyncio.Lock()
        self._watcher: DirectoryWatcher | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every manifest of the directory (a bad one is reported, the others load)."""
        await self.refresh()

    async def watch(self, debounce_ms: int = 1600, step_ms: int = 100) -> None:
        """Pick up changes on disk from now on (``refresh`` after each batch of changes)."""
        if self._watcher is None and not self._closed:
            self._watcher = DirectoryWatcher(self.directory, self.refresh, MANIFEST_SUFFIXES,
                                             debounce_ms=debounce_ms, step_ms=step_ms)
            await self._watcher.start()

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()

    async def close(self) -> None:
        """Stop watching; later lookups find nothing. Idempotent."""
        self._closed = True
        await self.stop_watching()
        self._names.clear()

    # --- lookups -----------------------------------------------------------------------------

    def _resolve(self, name: str, version: int | None) -> _Version:
        entry = self._names.get(name)
        if entry is None or entry.current is None:
            why = f": {entry.reason}" if entry is not None and entry.reason else ""
            raise PipelineNotFound(f"no pipeline named {clip(name)!r} is ready{why}")
        if version is None:
            return entry.versions[entry.current]
        held = entry.versions.get(version)
        if held is None or held.retired:
            if version < entry.current:
                raise PipelineNotFound(f"pipeline {clip(name)!r} version {version} was replaced "
                                       f"by version {entry.current}")
            raise PipelineNotFound(f"pipeline {clip(name)!r} has no version {version} (it has "
                                   f"{entry.current})")
        return held

    def get(self, name: str, version: int | None = None) -> LoadedPipeline:
        """The named pipeline (its newest ready version when ``version`` is None);
        PipelineNotFound (NOT_FOUND) names what is missing, and why when the name failed to
        load."""
        return self._resolve(name, version).pipeline

    def lease(self, name: str, version: int | None = None) -> Lease:
        """Resolve like ``get`` (raising PipelineNotFound now, not on entry) and hold that
        version for the ``with`` block: a version replaced or unloaded meanwhile keeps serving
        this call and is dropped after the last one."""
        return Lease(self, name, self._resolve(name, version))

    def _released(self, name: str, held: _Version) -> None:
        held.leases -= 1
        if held.retired and held.leases == 0:
            self._drop(name, held)

    def ready(self, name: str, version: int | None = None) -> bool:
        """Whether a call naming ``name`` (and ``version``) would get a compiled, warmed
        pipeline now."""
        try:
            self._resolve(name, version)
        except PipelineNotFound:
            return False
        return True

    def states(self) -> list[PipelineState]:
        """Every name a file defines (or still served), ready or not, by name."""
        states = []
        for name in sorted(self._names):
            entry = self._names[name]
            if not entry.listed and entry.current is None:
                continue
            state: State
            versions: tuple[int, ...]
            if entry.current is not None:
                state, versions = "READY", (entry.current,)
            else:
                state = "LOADING" if entry.loading is not None else "UNAVAILABLE"
                versions = ()
            states.append(PipelineState(name, state, versions, entry.reason, entry.source))
        return states

    def pipelines(self) -> list[LoadedPipeline]:
        """The version each ready name serves, by name."""
        return [entry.versions[entry.current].pipeline
                for _, entry in sorted(self._names.items()) if entry.current is not None]

    # --- changes -----------------------------------------------------------------------------

    def _scan(self) -> dict[str, list[_File]]:
        files: dict[str, list[_File]] = {}
        paths = sorted(p for p in self.directory.iterdir()
                       if p.suffix in MANIFEST_SUFFIXES and p.is_file())
        for path in paths:
            read = _read(path, self._file_names.get(path))
            files.setdefault(read.name, []).append(read)
        self._file_names = {read.path: name for name, reads in files.items() for read in reads}
        return files

    async def refresh(self) -> None:
        """Make what is loaded match the directory: load new and changed manifests, unload
        the names no file defines any more; report names defined by several files."""
        async with self._lock:
            if self._closed:
                return
            try:
                files = self._scan()
            except OSError as exc:
                log.error("pipeline directory %s cannot be read: %s", self.directory, exc)
                return
            for name in sorted(set(self._names) - set(files)):
                if self._names[name].listed:
                    self._unload(name, "its manifest was removed", listed=False)
            for name, reads in sorted(files.items()):
                if len(reads) > 1:
                    self._conflict(name, reads)
                    continue
                entry = self._names.get(name)
                if entry is not None and entry.listed and entry.text == reads[0].text:
                    continue  # unchanged (or a touch without an edit)
                await self._load(name, reads[0])
            await self._changed()

    async def load(self, name: str) -> None:
        """Re-read the file that defines ``name``, compile and warm it: it becomes the newest
        version. PipelineNotFound if no file defines it; RequestInvalid if it fails validation
        (or its name is defined by several files); a warm-up failure is raised as the first call
        would have got it (DeadlineExceeded past ``warm_timeout_s``). The version before keeps
        serving whenever the new one fails."""
        async with self._lock:
            files = self._scan().get(name)
            if not files:
                raise PipelineNotFound(f"no manifest in {self.directory} defines a pipeline "
                                       f"named {clip(name)!r}")
            if len(files) > 1:
                self._conflict(name, files)
                await self._changed()
                raise RequestInvalid([Violation("pipeline", self._names[name].reason)],
                                     "pipeline not loaded")
            error = await self._load(name, files[0])
            await self._changed()
            if error is not None:
                raise error

    async def unload(self, name: str) -> None:
        """Stop giving ``name`` to new calls; calls in flight finish on their version. Its file
        (if any) is loaded again only once it changes (or by ``load``)."""
        async with self._lock:
            entry = self._names.get(name)
            if entry is None or (entry.current is None and not entry.listed):
                raise PipelineNotFound(f"no pipeline named {clip(name)!r}")
            self._unload(name, "unloaded", listed=entry.listed)
            await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            try:
                await self.on_change()
            except Exception:
                log.exception("pipeline repository: the change listener failed")

    def _conflict(self, name: str, reads: list[_File]) -> None:
        files = ", ".join(read.path.name for read in reads)
        why = (f"defined by several manifests ({files}): none is served until one of them is "
               "renamed (metadata.name, or the file name) or removed")
        log.error("pipeline %s NOT served: %s", clip(name, 80), why)
        self._unload(name, why, listed=True)
        entry = self._names[name]
        entry.source = None
        # Loaded afresh once the conflict ends, even if the remaining file did not change.
        entry.text = None

    def _unload(self, name: str, why: str, *, listed: bool) -> None:
        entry = self._names.setdefault(name, _Name())
        if entry.current is not None:
            log.info("pipeline %s version %d unloaded (%s); calls in flight finish on it",
                     clip(name, 80), entry.current, why)
            self._retire(name, entry, entry.current)
            entry.current = None
        entry.listed = listed
        entry.reason = why
        if not listed:
            entry.text = None
        self._forget_if_done(name)

    async def _load(self, name: str, read: _File) -> BaseException | None:
        """Load ``read`` as the next version of ``name``; returns the failure, if any (the
        version before keeps serving)."""
        entry = self._names.setdefault(name, _Name())
        number = self._numbers[name] = self._numbers.get(name, 0) + 1
        entry.listed, entry.text, entry.source, entry.loading = True, read.text, read.path, number
        if entry.current is None:
            entry.reason = ""
        await self._changed()
        try:
            if read.data is None:
                raise RequestInvalid([Violation("manifest", read.error)], "manifest not loaded")
            plan = self.engine.compile(read.data)
            inputs, outputs = signature(plan)
            async with asyncio.timeout(self.warm_timeout_s):
                await self.engine.warm_plan(plan)
        except TimeoutError:
            return self._failed(name, entry, number, read, DeadlineExceeded(
                f"warm-up not finished within {self.warm_timeout_s:g} s (warmup_timeout_s)"))
        except Exception as exc:
            return self._failed(name, entry, number, read, exc)
        finally:
            entry.loading = None
        loaded = LoadedPipeline(name, number, plan, inputs, outputs, read.path)
        previous = entry.current
        entry.versions[number] = _Version(loaded)
        entry.current = number
        entry.reason = ""
        if previous is not None:
            self._retire(name, entry, previous)
        log.info("pipeline %s version %d ready (from %s)%s", clip(name, 80), number,
                 read.path.name, f"; version {previous} drains" if previous is not None else "")
        return None

    def _failed(self, name: str, entry: _Name, number: int, read: _File,
                exc: BaseException) -> BaseException:
        why = _why(exc)
        serving = entry.current
        entry.reason = f"version {number} ({read.path.name}) UNAVAILABLE: {why}"
        log.error("pipeline %s version %d (%s) NOT loaded: %s%s", clip(name, 80), number,
                  read.path, why, f" (version {serving} keeps serving)" if serving else "")
        return exc

    def _retire(self, name: str, entry: _Name, number: int) -> None:
        held = entry.versions[number]
        held.retired = True
        if held.leases == 0:
            self._drop(name, held)

    def _drop(self, name: str, held: _Version) -> None:
        entry = self._names.get(name)
        version = held.pipeline.version
        if entry is None or entry.versions.get(version) is not held:
            return
        del entry.versions[version]
        log.info("pipeline %s version %d drained and dropped", clip(name, 80), version)
        self._forget_if_done(name)

    def _forget_if_done(self, name: str) -> None:
        entry = self._names.get(name)
        if entry is not None and not entry.listed and not entry.versions:
            del self._names[name]


class Lease:
    """One call's hold on a resolved version (``PipelineRepository.lease``). A class rather
    than a generator context manager: it is taken on every call of a named pipeline."""

    __slots__ = ("_held", "_name", "_repository")

    def __init__(self, repository: PipelineRepository, name: str, held: _Version) -> None:
        self._repository, self._name, self._held = repository, name, held

    def __enter__(self) -> LoadedPipeline:
        self._held.leases += 1
        return self._held.pipeline

    def __exit__(self, *exc: object) -> None:
        self._repository._released(self._name, self._held)
