"""``tensorline serve --pipelines DIR``, ``tensorline pipelines`` and ``tensorline run NAME``
through the installed script against a real server process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.client.cli.test_messages import error_lines
from tests.client.cli.test_small import no_traceback, tensorline
from tests.support.processes import ServerProcess


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("pipelines")
    (directory / "scale.yaml").write_text(
        "metadata:\n  name: scaler\n"
        "  inputs: [{name: x, node: s, datatype: FP64, shape: [-1]}]\n"
        "nodes:\n  - {id: s, node_type: Scale, params: {factor: 2}}\n")
    (directory / "broken.yaml").write_text("nodes:\n  - {id: s, node_type: NoSuchNode}\n")
    with ServerProcess.start(args=["--pipelines", str(directory)],
                             env={"TENSORLINE_SANDBOX_WORKERS": "1"}) as server:
        yield server


def test_pipelines_lists_states_and_signatures(repository: ServerProcess, tmp_path: Path) -> None:
    result = tensorline("pipelines", "-s", repository.target, cwd=tmp_path, columns=200)
    assert result.returncode == 0, result.stderr
    no_traceback(result)
    # A row's first line (a long reason wraps onto lines with an empty name cell).
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
            if line.count("│") > 3 and "name" not in line and line.split("│")[1].strip()}
    assert set(rows) == {"broken", "scaler"}
    assert "READY" in rows["scaler"] and "x:tensor FP64[?]" in rows["scaler"]
    assert "UNAVAILABLE" in rows["broken"] and "NoSuchNode" in rows["broken"]
    listed = json.loads(tensorline("pipelines", "-s", repository.target, "--json",
                                   cwd=tmp_path).stdout)
    assert [(p["status"]["name"], p["status"]["state"]) for p in listed] == [
        ("broken", "UNAVAILABLE"), ("scaler", "READY")]
    assert listed[1]["status"]["versions"] == ["1"]  # int64 in JSON: a string


def test_run_name_runs_the_named_pipeline(repository: ServerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(3.0))
    for extra in ([], ["--pipeline-version", "1"]):
        result = tensorline("run", "scaler", "-s", repository.target, "-i", "s=x.npy",
                            "--json", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["outputs"]["s"]["values"] == [0.0, 2.0, 4.0]
    result = tensorline("run", "nothing", "-s", repository.target, "-i", "s=x.npy",
                        cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert "no pipeline named 'nothing'" in " ".join(error_lines(result))
    # A file name that does not exist is not taken for a pipeline name.
    result = tensorline("run", "missing.yaml", "-s", repository.target, cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result) == ["error: missing.yaml: no such file"]


def test_stream_name_streams_through_the_named_pipeline(repository: ServerProcess,
                                                        tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(6.0).reshape(3, 2))
    result = tensorline("stream", "scaler", "-s", repository.target, "-i", "s=x.npy",
                        "--pipeline-version", "1", "-o", "out.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["s"], np.arange(6.0).reshape(3, 2) * 2)


def test_pipelines_against_a_server_without_a_repository(tmp_path: Path) -> None:
    with ServerProcess.start(env={"TENSORLINE_SANDBOX": "false"}) as server:
        result = tensorline("pipelines", "-s", server.target, cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert "no pipeline repository" in " ".join(error_lines(result))


def test_serve_refuses_a_missing_pipeline_directory(tmp_path: Path) -> None:
    result = tensorline("serve", "--port", "0", "--pipelines", "missing", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result)[-1] == (
        "error: the pipeline directory missing does not exist or is not a directory "
        "(--pipelines, TENSORLINE_PIPELINES_DIR)")
