"""The commands that run the server's code name the missing extra in one line (the packaging
test does it for real, from a wheel installed without extras; this one fakes the missing
distributions in the test's own environment)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tensorline.client.cli import app
from tensorline.client.cli._app import _missing_server_distributions


def test_with_the_server_extra_nothing_is_missing() -> None:
    assert _missing_server_distributions() == []


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["validate", "pipeline.yaml"],
                                     ["nodes"]])
def test_without_it_each_server_command_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: list[str]) -> None:
    real = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        if name in ("scipy", "jsonschema"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text("nodes: [{id: a, node_type: PassThrough}]\n")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1
    name = command[0] if command != ["nodes"] else "nodes (without --server)"
    assert result.output.strip() == (
        f"error: tensorline {name} needs the server extra: pip install 'tensorline[server]' "
        "(not installed: scipy, jsonschema)")


def test_optional_bindings_and_platform_markers_are_not_required(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pyseccomp and landlock: the sandbox reports the layer inactive without them; uvloop has a
    platform marker (asyncio's loop is the fallback)."""
    real = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        if name in ("pyseccomp", "landlock", "uvloop"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    assert _missing_server_distributions() == []
