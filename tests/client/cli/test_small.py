"""Issue 12's small CLI fixes, through the installed ``tensorline`` script as a user runs it
(and a real server on an ephemeral port where one is involved): each failure is one or two lines
naming the file, field or port and the fix, never a traceback.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.cli.test_messages import TENSORLINE, error_lines, user_env
from tests.support.processes import ServerProcess


def tensorline(*args: str, cwd: Path, env: dict[str, str] | None = None,
               columns: int = 80) -> subprocess.CompletedProcess[str]:
    full = {**user_env(), "COLUMNS": str(columns), **(env or {})}
    return subprocess.run([TENSORLINE, *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    """One real ``tensorline serve`` for the module (with the test node modules)."""
    with ServerProcess.start(env={"TENSORLINE_LOAD_ENTRY_POINTS": "true",
                                  "TENSORLINE_NODE_MODULES": '["tests.nodes.basic"]',
                                  "TENSORLINE_SANDBOX_WORKERS": "1"},
                             pythonpath_repo=True) as server:
        yield server


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = tensorline("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tensorline {version('tensorline')}"


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_empty_manifest_is_named_once(tmp_path: Path, text: str, command: str) -> None:
    (tmp_path / "empty.yaml").write_text(text)
    result = tensorline(command, "empty.yaml", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "error: empty.yaml: the manifest is empty; write a mapping with 'version' and 'nodes' "
        "(see examples/)"]
