"""The node registry: built-ins, operator modules (trusted or not) and entry points."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from tensorline.server.nodes import Node, NodeRegistry, UnknownNodeType
from tensorline.server.nodes import _registry as registry_module

BUILTINS = ["Accumulator", "Add", "AudioChunker", "AudioResample", "Calculator", "Cast",
            "Normalize", "PassThrough", "Reshape", "Scale", "VoiceActivityGate"]


def test_builtins_only() -> None:
    registry = NodeRegistry.default(entry_points=False)
    assert [e.node_type for e in registry] == BUILTINS
    assert all(e.trusted for e in registry)


def test_operator_modules_trusted_and_untrusted() -> None:
    """Untrusted modules are never imported in the server: their nodes come from a sandboxed
    worker's description later (PipelineEngine.load_untrusted)."""
    registry = NodeRegistry.default(modules=["tests.nodes.basic"],
                                    untrusted_modules=["tests.nodes.spine"], entry_points=False)
    assert registry.get("Split").trusted is True
    assert registry.get("Split").module == "tests.nodes.basic"
    assert registry.get("Split").cls is not None
    assert "Probe" not in registry
    # Untrusted wins when a module is named in both lists.
    both = NodeRegistry.default(modules=["tests.nodes.spine"],
                                untrusted_modules=["tests.nodes.spine"], entry_points=False)
    assert "Probe" not in both


def test_untrusted_submodule_of_a_trusted_package_is_never_imported() -> None:
    registry = NodeRegistry.default(modules=["tests.nodes.mixed"],
                                    untrusted_modules=["tests.nodes.mixed.evil"],
                                    entry_points=False)
    assert registry.get("MixedFriendly").trusted is True
    assert "MixedEvil" not in registry
    assert "tests.nodes.mixed.evil" not in sys.modules


def test_trusted_module_inside_an_untrusted_package_is_not_imported() -> None:
    # Importing it would run the untrusted package's __init__ first.
    registry = NodeRegistry.default(modules=["tests.nodes.mixed.friendly"],
                                    untrusted_modules=["tests.nodes.mixed"], entry_points=False)
    assert "MixedFriendly" not in registry


def test_unknown_type_names_the_modules_that_could_not_load() -> None:
    registry = NodeRegistry.default(entry_points=False)
    registry.unavailable["acme.evil"] = "RuntimeError: no"
    with pytest.raises(UnknownNodeType, match=r"module acme\.evil is not loaded: RuntimeError: no"):
        registry.get("EvilNode")


def test_entry_points_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    points = [
        EntryPoint("builtin", "tensorline.server.nodes.builtin", "tensorline.nodes"),
        EntryPoint("basic", "tests.nodes.basic", "tensorline.nodes"),
        EntryPoint("spine", "tests.nodes.spine", "tensorline.nodes"),
    ]

    def fake_entry_points(*, group: str) -> list[EntryPoint]:
        assert group == "tensorline.nodes"
        return points

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = NodeRegistry.default(untrusted_modules=["tests.nodes.spine"])
    assert registry.get("Split").trusted is True
    assert "Probe" not in registry  # an untrusted entry point is described in the sandbox
    assert registry.get("Scale").module == "tensorline.server.nodes.builtin"


def test_unknown_type_suggests_and_lists() -> None:
    registry = NodeRegistry.default(entry_points=False)
    with pytest.raises(UnknownNodeType) as caught:
        registry.get("PassThru")
    assert "did you mean 'PassThrough'" in caught.value.message
    assert "known types: " + ", ".join(BUILTINS) in caught.value.message
    assert "Scale" in registry
    assert "Nope" not in registry
    assert len(registry) == len(BUILTINS)


def _module(name: str, **members: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in members.items():
        setattr(module, key, value)
    return module


def test_type_clash_between_modules_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    clash = _module("acme_clash", Scale=type("Scale", (Node,), {"__module__": "acme_clash"}))
    monkeypatch.setitem(sys.modules, "acme_clash", clash)
    registry = NodeRegistry.default(entry_points=False)
    with pytest.raises(ValueError, match="node type 'Scale' from acme_clash clashes"):
        registry.load_module("acme_clash")


def test_module_discovery_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    public = type("Public", (Node,), {"__module__": "acme_found"})
    private = type("_Private", (Node,), {"__module__": "acme_found"})
    renamed = type("Renamed", (Node,), {"__module__": "acme_found", "node_type": "Custom"})
    module = _module("acme_found", Public=public, _Private=private, Renamed=renamed,
                     Imported=NodeRegistry.default(entry_points=False).get("Scale").cls)
    monkeypatch.setitem(sys.modules, "acme_found", module)
    registry = NodeRegistry()
    assert sorted(registry.load_module("acme_found")) == ["Custom", "Public"]

    declared = _module("acme_declared", TENSORLINE_NODES=(public,))
    monkeypatch.setitem(sys.modules, "acme_declared", declared)
    assert NodeRegistry().load_module("acme_declared") == ["Public"]


def test_missing_module_fails_loudly() -> None:
    with pytest.raises(ModuleNotFoundError):
        NodeRegistry.default(modules=["no_such_module_anywhere"], entry_points=False)
