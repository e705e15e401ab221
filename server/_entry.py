"""What the ``tensorline`` command line runs of the server: the only server names the client
package imports (import-linter holds it to ``tensorline.server``'s top level).

- ``run_server``: ``serve`` and ``demo``. Loads the settings from the command's options, starts
  the server and serves until SIGTERM/SIGINT (then drains), or while a coroutine of the
  caller's runs against it.
- ``check_manifest`` and ``local_catalogue``: ``validate`` and ``nodes`` without ``--server``.
  They start no server: they run the server's compiler and catalogue here.

Each raises ``SetupError`` (and nothing else of its own) when the server's code cannot be set
up: invalid settings, a node or preload module that cannot be imported, an address that cannot
be bound, a TLS file that cannot be read.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import ValidationError

from tensorline.server._errors import RequestInvalid, TensorlineServerError
from tensorline.server._eventloop import run as run_on_event_loop
from tensorline.server._logging import JsonFormatter, configure_logging
from tensorline.server._preload import PreloadError
from tensorline.server._settings import Settings
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import compile_manifest
from tensorline.server.nodes import NodeEntry, NodeModuleError, NodeRegistry, NodeTraits, Port
from tensorline.server.runtime import NODE_THREAD_PREFIX
from tensorline.server.selector import Selector
from tensorline.server.service import TensorlineServer, catalogue, create_server, serve
from tensorline.v1 import tensorline_pb2 as pb
from tensorline.wire import Violation

T = TypeVar("T")



class SetupError(Exception):
    """The server's code could not be set up here. ``message`` is one line naming the cause;
    ``exit_code`` is 2 for invalid settings, 1 otherwise; ``log_line`` is the failure as a JSON
    log entry when the settings ask for JSON logs (every line the server prints is JSON then),
    else None."""

    def __init__(self, message: str, exit_code: int = 1, log_line: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.log_line = log_line


@overload
def run_server(options: Mapping[str, Any] | None = None, *, config: Path | None = None,
               environment: bool = True, modules_dir: str | None = None) -> int: ...


@overload
def run_server(options: Mapping[str, Any] | None = None, *, config: Path | None = None,
               environment: bool = True, modules_dir: str | None = None,
               while_serving: Callable[[TensorlineServer], Awaitable[T]]) -> T: ...


def run_server(options: Mapping[str, Any] | None = None, *, config: Path | None = None,
               environment: bool = True, modules_dir: str | None = None,
               while_serving: Callable[[TensorlineServer], Awaitable[T]] | None = None
               ) -> int | T:
    """Run a server on the event loop its settings choose.

    ``options`` are settings by name (``Settings``' fields; None = not given) over ``config``
    (a YAML/JSON settings file, else ``TENSORLINE_CONFIG``) and the ``TENSORLINE_*``
    environment; ``environment=False`` reads neither and takes the defaults instead (a
    self-contained run that the operator's settings must not change). ``modules_dir`` is made
    importable first when the settings name node, untrusted or preload modules (the command
    line passes the current directory, as ``python -m`` does).

    Without ``while_serving``: configure logging as the settings say, serve until SIGTERM or
    SIGINT, drain, and return the exit code 0. With it: start the server, await
    ``while_serving(server)``, stop the server (drain within ``grace_s``) and return its
    result; logging is left as the caller set it up, and the caller's exceptions propagate.
    """
    settings = _load_settings(options or {}, config, environment)
    if modules_dir is not None and (settings.node_modules or settings.untrusted_modules
                                    or settings.preload_modules):
        _make_importable(modules_dir)
    if while_serving is None:
        configure_logging(settings.log_level, settings.log_format)
    try:
        if while_serving is None:
            run_on_event_loop(serve(settings), settings.event_loop)
        else:
            return run_on_event_loop(_serving(settings, while_serving), settings.event_loop)
    except (PreloadError, NodeModuleError) as exc:
        raise _start_failure(str(exc), settings) from None
    except ModuleNotFoundError as exc:
        raise _start_failure(_module_not_found(
            exc, [*settings.node_modules, *settings.untrusted_modules]), settings) from None
    except OSError as exc:  # the address cannot be bound, a TLS file cannot be read, ...
        raise _start_failure(str(exc), settings) from None
    _exit_past_stuck_node_threads()
    return 0


async def _serving(settings: Settings,
                   while_serving: Callable[[TensorlineServer], Awaitable[T]]) -> T:
    server, _port = await create_server(settings)
    await server.start()
    try:
        return await while_serving(server)
    finally:
        await server.stop()


def _load_settings(options: Mapping[str, Any], config: Path | None, environment: bool) -> Settings:
    try:
        if environment:
            return Settings.load(config, **options)
        return Settings.from_values(**{k: v for k, v in options.items() if v is not None})
    except (ValidationError, OSError, ValueError) as exc:
        raise SetupError(f"invalid settings: {exc}", exit_code=2) from None


def _start_failure(message: str, settings: Settings) -> SetupError:
    log_line = None
    if settings.log_format == "json":
        record = logging.LogRecord("tensorline.server", logging.ERROR, __file__, 0,
                                   f"cannot start: {message}", None, None)
        log_line = JsonFormatter().format(record)
    return SetupError(message, log_line=log_line)


def _make_importable(directory: str) -> None:
    """Put ``directory`` first on sys.path unless it (or "", the current directory) is there
    already. The sandbox's workers inherit the server's sys.path, so they import from it too."""
    if directory not in sys.path and "" not in sys.path:
        sys.path.insert(0, directory)


def _module_not_found(exc: ModuleNotFoundError, modules: Sequence[str]) -> str:
    missing = exc.name or ""
    named = [m for m in modules if m == missing or m.startswith(missing + ".")]
    if not named:  # one of the node module's own imports
        return f"a node module needs a module that is not installed: {exc}"
    return (f"node module '{named[0]}' not found: {exc} (looked in the current directory "
            f"{os.getcwd()} and the installed packages; run from the folder holding "
            f"'{missing.partition('.')[0]}', or set PYTHONPATH)")


def _exit_past_stuck_node_threads() -> None:
    """A sync node that ignores cancellation keeps its pool thread alive, and the interpreter
    joins pool threads at exit: after the drain, leave without waiting for such threads."""
    stuck = [t for t in threading.enumerate() if t.name.startswith(NODE_THREAD_PREFIX)]
    for thread in stuck:
        thread.join(timeout=0.2)
    if any(t.is_alive() for t in stuck):
        logging.getLogger(__name__).warning("exiting with node threads still running")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# --- without a server: validate, nodes ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestCheck:
    """What ``check_manifest`` found: every problem (``violations``; or ``error``, a refusal
    that is not a list of problems), else the compiled pipeline's shape."""

    violations: tuple[Violation, ...] = ()
    error: str = ""
    nodes: int = 0
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()

    @property
    def valid(self) -> bool:
        return not self.violations and not self.error


def check_manifest(data: Mapping[str, Any], *, node_modules: Sequence[str] = (),
                   catalogue: pb.ListNodesResponse | None = None,
                   modules_dir: str | None = None) -> ManifestCheck:
    """Check a manifest with the server's own compiler, without running anything.

    Against the local catalogue (built-ins, entry points, ``node_modules``; ``modules_dir`` as
    in ``run_server``), or against ``catalogue``, a server's ListNodes answer: its node types
    become registry entries without a class (as the server does for an untrusted module, whose
    class it never imports), so the check uses exactly the types, ports and params schemas that
    server would run the manifest with. Node types it knows but cannot run (a missing optional
    dependency) are reported as such."""
    if catalogue is not None:
        registry = _registry_of(catalogue)
    else:
        if node_modules and modules_dir is not None:
            _make_importable(modules_dir)
        try:
            registry = NodeRegistry.default(modules=node_modules)
        except ModuleNotFoundError as exc:
            raise SetupError(_module_not_found(exc, node_modules)) from None
        except NodeModuleError as exc:
            raise SetupError(str(exc)) from None
    # Model files (``ModelPath`` params) resolve against the roots a server started here would
    # have (TENSORLINE_PIPELINES_DIR, TENSORLINE_MODEL_DIRS, the config file). A server's
    # catalogue describes params by their JSON schema: its roots are its own.
    try:
        model_roots = () if catalogue is not None else Settings.load().model_roots
    except ValueError as exc:
        raise SetupError(f"the server settings of this environment are invalid: {exc}") from None
    try:
        plan = compile_manifest(data, registry, Selector(sandbox_available=True),
                                model_roots=model_roots)
    except RequestInvalid as exc:
        return ManifestCheck(violations=tuple(exc.violations))
    except TensorlineServerError as exc:
        return ManifestCheck(error=exc.message)
    return ManifestCheck(nodes=len(plan.nodes), inputs=tuple(plan.external_inputs),
                         outputs=tuple(plan.sinks))


def local_catalogue() -> pb.ListNodesResponse:
    """The node catalogue a server started here with default settings would list (built-ins
    and entry points), as its ListNodes answer."""
    return catalogue(PipelineEngine.local())


def _entry_of_info(info: pb.NodeInfo) -> NodeEntry:
    """A registry entry (without a class) for a node type a server listed."""
    return NodeEntry(
        node_type=info.node_type, module=info.module or "(server)", trusted=info.trusted,
        class_ref=(info.module or "server", info.node_type), description=info.description,
        inputs=tuple(Port(p.name, p.kind, p.description, p.required, p.many)  # type: ignore[arg-type]
                     for p in info.inputs),
        outputs=tuple(Port(p.name, p.kind, p.description)  # type: ignore[arg-type]
                      for p in info.outputs),
        traits=NodeTraits(), reusable=info.reusable, streaming=info.streaming,
        async_process=False, async_initialize=False, async_cleanup=False, has_initialize=False,
        has_cleanup=False, cls=None, schema_json=info.params_schema_json or "{}",
    )


def _registry_of(listing: pb.ListNodesResponse) -> NodeRegistry:
    """The registry a server's ListNodes answer describes."""
    registry = NodeRegistry()
    for info in listing.nodes:
        registry.add(_entry_of_info(info))
    for unavailable in listing.unavailable:
        registry.optional[unavailable.node_type] = tuple(unavailable.missing_dependencies)
    return registry
