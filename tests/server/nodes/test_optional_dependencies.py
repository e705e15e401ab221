"""The registry skips node modules whose optional dependency is missing (logged at debug level
only, and remembered: a manifest naming one of their node types is told what to install), and the
ecosystem catalogue loads without importing torch or pandas."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tensorline.server.nodes import MissingDependency, NodeRegistry

NODE = textwrap.dedent('''
    from tensorline.server.nodes import Node
    {extra}
    class {name}(Node):
        def process(self, inputs):
            return inputs["in"]
''')


def write_package(root: Path) -> None:
    package = root / "optpkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package with one module per optional library."""\n')
    (package / "present.py").write_text(NODE.format(name="Present", extra=""))
    (package / "absent.py").write_text(NODE.format(
        name="NeedsMissing", extra="TENSORLINE_REQUIRES = ('surely_not_installed_lib',)"))
    (root / "hard_import.py").write_text(NODE.format(
        name="HardImport", extra="import surely_not_installed_lib"))


def test_a_submodule_with_a_missing_requirement_is_skipped_at_debug_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = NodeRegistry()
    with caplog.at_level(logging.INFO):
        added = registry.load_module("optpkg")
    assert added == ["Present"]
    assert "NeedsMissing" not in registry
    assert "skipping" not in caplog.text  # not on every command that builds a catalogue
    assert registry.optional == {"NeedsMissing": ("surely_not_installed_lib",)}
    with pytest.raises(MissingDependency) as raised:
        registry.get("NeedsMissing")
    assert raised.value.message == (
        "node type 'NeedsMissing' needs the optional dependency surely_not_installed_lib "
        "(pip install surely_not_installed_lib)")
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        NodeRegistry().load_module("optpkg")
    assert "skipping the nodes of optpkg.absent: optional dependency surely_not_installed_lib " \
           "not installed" in caplog.text


def test_an_entry_point_module_that_fails_to_import_a_dependency_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = NodeRegistry()
    with caplog.at_level(logging.WARNING):
        assert registry.load_module("hard_import", skip_missing_dependencies=True) == []
    assert "dependency 'surely_not_installed_lib' is not installed" in caplog.text
    # A module the operator names explicitly fails loudly; so does a module that is itself absent.
    with pytest.raises(ModuleNotFoundError):
        registry.load_module("hard_import")
    with pytest.raises(ModuleNotFoundError):
        registry.load_module("no_such_node_module", skip_missing_dependencies=True)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout + done.stderr


def test_the_ecosystem_catalogue_loads_without_importing_heavy_libraries() -> None:
    out = run_python('''
        import sys
        from tensorline.server.nodes import NodeRegistry
        registry = NodeRegistry()
        registry.load_module("tensorline.server.nodes.ecosystem")
        print(sorted(e.node_type for e in registry))
        print("heavy imported:", sorted({"torch", "pandas"} & set(sys.modules)))
    ''')
    assert "heavy imported: []" in out
    # The torch nodes are listed where torch is installed (CI installs it; the README's fresh
    # machine does not), without torch being imported for the catalogue either way.
    torch = importlib.util.find_spec("torch") is not None
    expected = ["ButterLowpass", "DataFrameAggregate", "PyHashChain"]
    expected += ["TorchMLP", "TorchSpectrogram"] if torch else []
    for node_type in expected:
        assert node_type in out
    if not torch:
        assert "TorchMLP" not in out


def test_without_torch_the_torch_nodes_are_skipped_and_the_rest_load() -> None:
    out = run_python('''
        import logging, sys
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
        sys.modules["torch"] = None  # as if torch were not installed: find_spec gives None
        from tensorline.server.nodes import NodeRegistry
        registry = NodeRegistry()
        registry.load_module("tensorline.server.nodes.ecosystem")
        print(sorted(e.node_type for e in registry))
        print(sorted(registry.optional.items()))
    ''')
    assert "['ButterLowpass', 'DataFrameAggregate', 'OnnxModel', 'PyHashChain']" in out
    assert ("[('TorchMLP', ('torch',)), ('TorchScriptModel', ('torch',)), "
            "('TorchSpectrogram', ('torch',))]") in out
    assert "skipping the nodes of tensorline.server.nodes.ecosystem.torch_nodes: optional " \
           "dependency torch not installed" in out


def test_without_onnxruntime_the_onnx_node_is_skipped_and_named() -> None:
    out = run_python('''
        import sys
        sys.modules["onnxruntime"] = None  # as if onnxruntime were not installed
        from tensorline.server.manifest import compile_manifest
        from tensorline.server.nodes import NodeRegistry
        from tensorline.server.selector import Selector
        from tensorline.server import RequestInvalid
        registry = NodeRegistry()
        registry.load_module("tensorline.server.nodes.ecosystem")
        print("OnnxModel" in registry, sorted(registry.optional.items()))
        try:
            compile_manifest({"nodes": [{"id": "m", "node_type": "OnnxModel",
                                         "params": {"path": "m.onnx"}}]}, registry, Selector())
        except RequestInvalid as exc:
            print([(v.field, v.description, v.kind) for v in exc.violations])
    ''')
    assert "False [('OnnxModel', ('onnxruntime',))" in out
    assert ("('nodes[0].node_type', \"node 'm': node type 'OnnxModel' needs the optional "
            "dependency onnxruntime (pip install onnxruntime)\", 'precondition')") in out
