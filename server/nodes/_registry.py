"""The node registry: built-in nodes, operator-configured modules and the ``tensorline.nodes``
entry point group, each node with the trust the operator gave its module.

Optional dependencies: a node module may declare ``TENSORLINE_REQUIRES = ("torch", ...)`` (import
names). When one of them is not installed the module's nodes are skipped (logged at debug level:
every client-side command builds a catalogue, and a line on each of them is noise; the server
logs one summary at startup), and remembered as *optional* node types, so a manifest naming one
is told which dependency it needs rather than "unknown node type". Requirements are checked
with ``importlib.util.find_spec`` so that the server process never imports a heavy library just to
list a catalogue (its nodes may well run in sandboxed workers only). Inside a package each
submodule is checked on its own, so a missing torch drops the torch nodes and keeps the rest. An
entry point module whose import fails because a dependency is missing is skipped the same way;
modules the operator names explicitly still fail loudly.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import logging
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from tensorline.server.nodes._node import Node, NodeTraits, Port, is_async, overrides

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tensorline.nodes"
BUILTIN_MODULE = "tensorline.server.nodes.builtin"


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """A registered node type and what the runtimes need to know about it, computed once.

    Everything but ``cls`` is plain data, so an entry can also describe a node of an untrusted
    module, whose class exists only in sandboxed workers (``cls`` is None; see ``_catalogue``):
    the server then knows where the class lives (``class_module``, ``qualname``) without ever
    importing it.
    """

    node_type: str
    module: str
    trusted: bool
    # Where workers import the class from: (module of the class, qualified name).
    class_ref: tuple[str, str]
    description: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    traits: NodeTraits
    reusable: bool
    streaming: bool
    async_process: bool
    async_initialize: bool
    async_cleanup: bool
    has_initialize: bool
    has_cleanup: bool
    # The class, for nodes of trusted modules; None for an untrusted module's node.
    cls: type[Node] | None = None
    # JSON schema of the params as the sandboxed worker exported it (when ``cls`` is None).
    schema_json: str = ""

    @property
    def class_module(self) -> str:
        return self.class_ref[0]

    @property
    def qualname(self) -> str:
        return self.class_ref[1]

    @classmethod
    def of(cls, node_cls: type[Node], module: str, trusted: bool) -> NodeEntry:
        return cls(
            node_type=node_cls.node_type,
            module=module,
            trusted=trusted,
            class_ref=(node_cls.__module__, node_cls.__qualname__),
            description=node_cls.description,
            inputs=tuple(node_cls.inputs),
            outputs=tuple(node_cls.outputs),
            traits=node_cls.traits,
            reusable=bool(node_cls.reusable),
            streaming=bool(node_cls.streaming),
            async_process=is_async(node_cls, "process"),
            async_initialize=is_async(node_cls, "initialize"),
            async_cleanup=is_async(node_cls, "cleanup"),
            has_initialize=overrides(node_cls, "initialize"),
            has_cleanup=overrides(node_cls, "cleanup"),
            cls=node_cls,
        )

    def params_schema_json(self) -> str:
        if self.cls is None:
            return self.schema_json
        return json.dumps(self.cls.Params.model_json_schema(), sort_keys=True)


# Import names whose pip distribution is named differently, for the "pip install" hint.
_PIP_NAMES = {"sklearn": "scikit-learn", "cv2": "opencv-python", "PIL": "pillow",
              "yaml": "pyyaml", "skimage": "scikit-image"}


def needs_message(node_type: str, missing: Iterable[str]) -> str:
    """``node type 'X' needs the optional dependency torch (pip install torch)``."""
    names = list(missing)
    what = "dependency" if len(names) == 1 else "dependencies"
    return (f"node type '{node_type}' needs the optional {what} {', '.join(names)} "
            f"(pip install {' '.join(_PIP_NAMES.get(n, n) for n in names)})")


class UnknownNodeType(KeyError):
    def __init__(self, node_type: str, known: Iterable[str],
                 unavailable: Mapping[str, str] | None = None) -> None:
        known = sorted(known)
        close = difflib.get_close_matches(node_type, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        # The type may well be one of a module that could not be loaded: say which and why.
        missing = "".join(f"; module {name} is not loaded: {why}"
                          for name, why in sorted((unavailable or {}).items()))
        super().__init__(f"unknown node type '{node_type}'{hint}; known types: "
                         f"{', '.join(known)}{missing}")
        self.message = self.args[0]


class MissingDependency(UnknownNodeType):
    """A node type this catalogue knows of but cannot run: its optional dependency is missing."""

    def __init__(self, node_type: str, missing: Iterable[str]) -> None:
        KeyError.__init__(self, needs_message(node_type, missing))
        self.message = self.args[0]
        self.missing = tuple(missing)


class NodeModuleError(ValueError):
    """A node module could not be loaded: its import raised, or a node type it defines is
    already taken. The message names the module (``serve`` prints it as one line)."""

    def __init__(self, module: str, cause: str) -> None:
        super().__init__(f"node module {module!r} could not be loaded: {cause}")
        self.module = module


class NodeRegistry:
    """Maps node type names to registered entries.

    Untrusted modules are never imported here: ``default`` skips them, and the server adds
    their nodes from a sandboxed worker's description (``add``, see
    ``PipelineEngine.load_untrusted``). ``load_module`` imports into this process whatever it
    is given, whatever ``trusted`` says (tests and tools use it for untrusted classes).
    """

    def __init__(self) -> None:
        self._entries: dict[str, NodeEntry] = {}
        # Modules whose nodes could not be loaded -> why (named in UnknownNodeType messages).
        self.unavailable: dict[str, str] = {}
        # Of those, the ones the sandbox policy refused (a required layer is missing): a request
        # naming a node type this server does not know may be one of theirs.
        self.refused: set[str] = set()
        # Node types of modules skipped for a missing optional dependency -> the missing
        # import names (a request naming one is told what to install).
        self.optional: dict[str, tuple[str, ...]] = {}

    def register(self, node_cls: type[Node], *, trusted: bool = True, module: str = "") -> None:
        module = module or node_cls.__module__
        existing = self._entries.get(node_cls.node_type)
        if existing is not None and existing.cls is node_cls:
            self._entries[node_cls.node_type] = NodeEntry.of(node_cls, module, trusted)
            return
        self.add(NodeEntry.of(node_cls, module, trusted))

    def add(self, entry: NodeEntry) -> None:
        """Register a prepared entry; ValueError when its type is taken (never replaced: an
        untrusted module must not shadow a node of another module)."""
        existing = self._entries.get(entry.node_type)
        if existing is not None:
            raise ValueError(
                f"node type '{entry.node_type}' from {entry.module} clashes with the one from "
                f"{existing.module}"
            )
        self._entries[entry.node_type] = entry

    def load_module(self, name: str, *, trusted: bool = True,
                    skip_missing_dependencies: bool = False,
                    exclude: frozenset[str] = frozenset()) -> list[str]:
        """Import ``name`` (and its submodules, for a package) and register its nodes.

        ``skip_missing_dependencies``: a module whose import fails because some *other* module
        is not installed is skipped with a warning instead of failing (entry points).
        ``exclude``: submodules (with theirs) never to import, e.g. untrusted ones.
        """
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not skip_missing_dependencies or _is_self(exc, name):
                raise
            log.warning("skipping node module %s: its dependency '%s' is not installed",
                        name, exc.name)
            return []
        except Exception as exc:  # the module's own top-level code failed
            raise NodeModuleError(name, f"{type(exc).__name__}: {exc}") from exc
        added = []
        for node_cls in _nodes_of(module, exclude, self.optional):
            try:
                self.register(node_cls, trusted=trusted, module=name)
            except ValueError as exc:
                raise NodeModuleError(name, str(exc)) from exc
            added.append(node_cls.node_type)
        log.info("loaded %d node(s) from %s (%s)", len(added), name,
                 "trusted" if trusted else "untrusted")
        return added

    def load_entry_points(self, *, untrusted: frozenset[str] = frozenset()) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.value == BUILTIN_MODULE or _within(ep.value, untrusted):
                continue  # untrusted ones are described by a sandboxed worker instead
            self.load_module(ep.value, trusted=True, skip_missing_dependencies=True,
                             exclude=untrusted)

    def get(self, node_type: str) -> NodeEntry:
        try:
            return self._entries[node_type]
        except KeyError:
            if node_type in self.optional:
                raise MissingDependency(node_type, self.optional[node_type]) from None
            raise UnknownNodeType(node_type, self._entries, self.unavailable) from None

    def __contains__(self, node_type: object) -> bool:
        return node_type in self._entries

    def __iter__(self) -> Iterator[NodeEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.node_type))

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def default(
        cls,
        *,
        modules: Iterable[str] = (),
        untrusted_modules: Iterable[str] = (),
        entry_points: bool = True,
    ) -> NodeRegistry:
        """Built-ins, then entry points, then the operator's trusted modules.

        Untrusted modules are not imported: importing runs their top-level code, in this
        process. A module named both ways counts as untrusted, and so does one inside an
        untrusted package (importing it would run the package's ``__init__``); trusted
        packages are walked without importing their untrusted submodules.
        """
        registry = cls()
        untrusted = frozenset(untrusted_modules)
        registry.load_module(BUILTIN_MODULE, trusted=True)
        if entry_points:
            registry.load_entry_points(untrusted=untrusted)
        for name in modules:
            if _within(name, untrusted):
                log.info("node module %s is untrusted: its nodes come from a sandboxed worker",
                         name)
                continue
            registry.load_module(name, trusted=True, exclude=untrusted)
        return registry


def _within(name: str, modules: frozenset[str]) -> bool:
    """True when ``name`` is one of ``modules`` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _is_self(exc: ModuleNotFoundError, name: str) -> bool:
    """True when the module that was not found is ``name`` itself or one of its parents."""
    missing = exc.name or ""
    return missing == name or name.startswith(missing + ".")


def missing_requirements(module: ModuleType) -> list[str]:
    """The import names in the module's ``TENSORLINE_REQUIRES`` that are not installed."""
    required: Any = getattr(module, "TENSORLINE_REQUIRES", ())
    missing = []
    for requirement in required:
        try:
            found = importlib.util.find_spec(requirement) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    return missing


def _requirements_met(module: ModuleType, optional: dict[str, tuple[str, ...]] | None) -> bool:
    """False (noted in ``optional``, logged at debug level) when a requirement is missing."""
    missing = missing_requirements(module)
    if missing:
        log.debug("skipping the nodes of %s: optional dependenc%s %s not installed",
                  module.__name__, "y" if len(missing) == 1 else "ies", ", ".join(missing))
        if optional is not None:
            for cls in _classes_of(module, module.__name__):
                if cls.__module__ == module.__name__:
                    optional[cls.node_type] = tuple(missing)
    return not missing


def _classes_of(module: ModuleType, root: str) -> list[type[Node]]:
    """The node classes ``module`` declares (``TENSORLINE_NODES``) or defines under ``root``."""
    declared: Any = getattr(module, "TENSORLINE_NODES", None)
    if declared is not None:
        return list(declared)
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, Node) and obj is not Node and obj.__module__.startswith(root)
            and not inspect.isabstract(obj) and not obj.__name__.startswith("_")]


def _submodules(package: ModuleType, exclude: frozenset[str]) -> list[ModuleType]:
    """Every submodule of ``package``, imported, except those in (or inside) ``exclude``,
    which are never imported (``pkgutil.walk_packages`` would import subpackages to walk
    them)."""
    found = []
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if _within(info.name, exclude):
            continue
        sub = importlib.import_module(info.name)
        found.append(sub)
        if info.ispkg and hasattr(sub, "__path__"):
            found.extend(_submodules(sub, exclude))
    return found


def _nodes_of(module: ModuleType, exclude: frozenset[str] = frozenset(),
              optional: dict[str, tuple[str, ...]] | None = None) -> list[type[Node]]:
    """The node classes of ``module`` (and its submodules); those of a (sub)module whose
    optional dependency is missing are left out and noted in ``optional``."""
    if not _requirements_met(module, optional):
        return []
    declared: Any = getattr(module, "TENSORLINE_NODES", None)
    if declared is not None:
        return list(declared)
    modules = [module]
    if hasattr(module, "__path__"):
        modules.extend(_submodules(module, exclude))
    found: dict[str, type[Node]] = {}
    skipped: set[str] = set()
    for mod in modules:
        if mod is not module and not _requirements_met(mod, optional):
            skipped.add(mod.__name__)
            continue
        if mod is not module and getattr(mod, "TENSORLINE_NODES", None) is not None:
            for obj in _classes_of(mod, module.__name__):
                found[obj.node_type] = obj
            continue
        for obj in _classes_of(mod, module.__name__):
            if obj.__module__ not in skipped:
                found[obj.node_type] = obj
    return [cls for cls in found.values() if cls.__module__ not in skipped]
