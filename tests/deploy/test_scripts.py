"""The repository's shell scripts (.ci/, docker/) are strict and shellcheck-clean."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.processes import REPO_ROOT

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCRIPTS = sorted([
    *(p for p in (REPO_ROOT / ".ci").iterdir() if p.is_file()),
    *(REPO_ROOT / "docker").glob("*.sh"),
])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_script_is_strict_executable_bash(script: os.PathLike[str]) -> None:
    path = REPO_ROOT / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(path, os.X_OK), f"{path} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        if IN_CI:
            pytest.fail("shellcheck is missing; .ci/run installs it")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
