"""Issue 12's small CLI fixes, through the installed ``tensorline`` script as a user runs it
(and a real server on an ephemeral port where one is involved): each failure is one or two lines
naming the file, field or port and the fix, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "audio_scoring"


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PYTHONPATH entry whose sitecustomize hides torch, as on a default install (whether or
    not this machine has torch): ``find_spec("torch")`` is None."""
    folder = tmp_path_factory.mktemp("no-torch")
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    return str(folder)


@pytest.fixture(scope="module")
def served(no_torch: str) -> Iterator[ServerProcess]:
    """One real ``tensorline serve`` for the module: test node modules, the ecosystem entry
    points, no torch."""
    with ServerProcess.start(env={"TENSORLINE_LOAD_ENTRY_POINTS": "true",
                                  "TENSORLINE_NODE_MODULES": "tests.nodes.basic,tests.nodes.spine",
                                  "TENSORLINE_SANDBOX_WORKERS": "2",
                                  "PYTHONPATH": no_torch},
                             pythonpath_repo=True) as server:
        yield server


def test_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = tensorline("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tensorline {version('tensorline')}"


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
@pytest.mark.parametrize("command", ["validate", "run", "stream"])
def test_an_empty_manifest_is_named_once(tmp_path: Path, text: str, command: str) -> None:
    (tmp_path / "empty.yaml").write_text(text)
    np.save(tmp_path / "x.npy", np.zeros(2))
    inputs = () if command == "validate" else ("-i", "x=x.npy")
    result = tensorline(command, "empty.yaml", *inputs, cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "error: empty.yaml: the manifest is empty; write a mapping with 'version' and 'nodes' "
        "(see examples/)"]


def test_client_commands_do_not_log_the_skipped_optional_nodes(tmp_path: Path,
                                                               no_torch: str) -> None:
    for args in (["nodes"], ["--version"], ["validate", str(EXAMPLE / "pipeline.yaml")]):
        result = tensorline(*args, cwd=tmp_path, env={"PYTHONPATH": no_torch})
        no_traceback(result)
        assert "skipping the nodes" not in result.stderr + result.stdout, args


def test_serve_logs_the_unavailable_optional_nodes_once(served: ServerProcess) -> None:
    logs = served.logs()
    assert logs.count("node types TorchMLP, TorchScriptModel, TorchSpectrogram not available: "
                      "optional dependency torch not installed") == 1, logs
    assert "skipping the nodes" not in logs


def test_validate_says_which_optional_dependency_a_node_needs(tmp_path: Path,
                                                             no_torch: str) -> None:
    result = tensorline("validate", "pipeline.yaml", cwd=EXAMPLE, env={"PYTHONPATH": no_torch})
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "pipeline.yaml: 2 problem(s)",
        "  - nodes[2].node_type: node 'features': node type 'TorchSpectrogram' needs the "
        "optional dependency torch (pip install torch)",
        "  - nodes[3].node_type: node 'scores': node type 'TorchMLP' needs the optional "
        "dependency torch (pip install torch)",
    ]


def test_run_says_which_optional_dependency_a_node_needs(served: ServerProcess,
                                                        tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(16, dtype=np.int16))
    result = tensorline("run", str(EXAMPLE / "pipeline.yaml"), "-s", served.target,
                        "-i", f"mic={tmp_path / 'x.npy'}", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert "unknown node type" not in result.stderr
    assert error_lines(result) == [
        "ServerError (FAILED_PRECONDITION): invalid manifest (2 problem(s))",
        "  - nodes[2].node_type: node 'features': node type 'TorchSpectrogram' needs the "
        "optional dependency torch (pip install torch)",
        "  - nodes[3].node_type: node 'scores': node type 'TorchMLP' needs the optional "
        "dependency torch (pip install torch)",
    ]


def test_serve_refuses_a_misspelled_setting(tmp_path: Path) -> None:
    result = tensorline("serve", "--host", "127.0.0.1", "--port", "0", cwd=tmp_path,
                        env={"TENSORLINE_SANBOX_WORKERS": "3", "TENSORLINE_SERVER": "x:1"})
    assert result.returncode == 2
    no_traceback(result)
    assert error_lines(result) == [
        "error: invalid settings: unknown environment variable TENSORLINE_SANBOX_WORKERS (did "
        "you mean TENSORLINE_SANDBOX_WORKERS?); fix or unset it (the TENSORLINE_* settings are "
        "listed in the README, Configuration)"]
    assert result.stdout == ""


def test_serve_reports_a_start_failure_as_a_json_log_entry(tmp_path: Path) -> None:
    result = tensorline("serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json",
                        "--node-module", "no_such_node_module", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    failure = entries[-1]
    assert failure["level"] == "ERROR", failure
    assert failure["message"].startswith("cannot start: node module 'no_such_node_module' "
                                         "not found"), failure


def scale_manifest(folder: Path) -> None:
    (folder / "scale.yaml").write_text(
        "version: v1\nnodes:\n  - {id: x, node_type: Scale, params: {factor: 2}}\n")


@pytest.mark.parametrize(("options", "chunks"), [([], 8), (["--rate", "400"], 1),
                                                  (["--rate", "400", "--chunk", "5ms"], 4),
                                                  (["--chunk", "3"], 3)])
def test_stream_a_npy_file(served: ServerProcess, tmp_path: Path, options: list[str],
                           chunks: int) -> None:
    """Default --chunk: one row of a .npy per chunk, or 20 ms of rows at --rate."""
    scale_manifest(tmp_path)
    data = np.arange(16, dtype=np.float32).reshape(8, 2)
    np.save(tmp_path / "x.npy", data)
    result = tensorline("stream", "scale.yaml", "-s", served.target, "-i", "x=x.npy",
                        "-o", "out.npz", *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    no_traceback(result)
    assert f"{chunks}/{chunks}" in result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["x"], data * 2)


def test_stream_a_npy_file_by_duration_needs_a_rate(served: ServerProcess,
                                                    tmp_path: Path) -> None:
    scale_manifest(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(8, dtype=np.float32))
    result = tensorline("stream", "scale.yaml", "-s", served.target, "-i", "x=x.npy",
                        "--chunk", "20ms", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "error: x.npy: --chunk 20ms is a duration and a .npy has no sample rate: give --rate HZ "
        "(rows per second) or --chunk N (rows)"]


def test_an_input_naming_only_the_node_binds_its_only_required_port(served: ServerProcess,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "bias.yaml").write_text(
        "version: v1\nnodes:\n  - {id: agg, node_type: OptionalBias}\n")
    np.save(tmp_path / "tbl.npy", np.arange(3, dtype=np.float32))
    result = tensorline("run", "bias.yaml", "-s", served.target, "-i", "agg=tbl.npy",
                        "-o", "out.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as saved:
        np.testing.assert_array_equal(saved["agg"], [0.0, 1.0, 2.0])


def test_an_ambiguous_input_is_one_problem_not_a_missing_input(served: ServerProcess,
                                                               tmp_path: Path) -> None:
    (tmp_path / "cat.yaml").write_text(
        "version: v1\nnodes:\n  - {id: cat, node_type: Concat}\n")
    np.save(tmp_path / "x.npy", np.arange(3, dtype=np.float32))
    result = tensorline("run", "cat.yaml", "-s", served.target, "-i", "cat=x.npy", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "InvalidRequestError (INVALID_ARGUMENT): invalid inputs (1 problem(s))",
        "  - inputs[0].port: node 'cat' has 2 inputs fed by the request (a, b); name the port "
        "(e.g. 'cat:a')"]


def test_serve_logs_each_sandbox_layer_once(served: ServerProcess) -> None:
    """Two workers start one after another: one summary line per layer, not one per worker."""
    lines = [line.split(" sandbox layer ", 1)[1].split(":")[0]
             for line in served.logs().splitlines() if " sandbox layer " in line]
    assert lines, served.logs()
    assert len(lines) == len(set(lines)), lines


@pytest.mark.parametrize("columns", [80, 140])
def test_nodes_never_cuts_a_type_name(served: ServerProcess, tmp_path: Path,
                                      columns: int) -> None:
    from tensorline.client import Client

    with Client(served.target) as client:
        types = [info.node_type for info in client.list_nodes()]
    assert max(map(len, types)) > 15  # long names (OptionalBias, DataFrameAggregate...)
    result = tensorline("nodes", "--server", served.target, cwd=tmp_path, columns=columns)
    assert result.returncode == 0, result.stderr
    no_traceback(result)
    lines = result.stdout.splitlines()
    assert all(len(line) <= columns for line in lines)
    assert "…" not in result.stdout
    words = {word.strip("│┃ ") for line in lines for word in line.split()}
    assert set(types) <= words, set(types) - words
    # What the server cannot run is named with what it needs, after the listing.
    assert " ".join(result.stdout.split()).endswith(
        "not available here: TorchMLP, TorchScriptModel, TorchSpectrogram (optional dependency "
        "torch not installed: pip install torch)")


def test_run_prints_values(served: ServerProcess, tmp_path: Path) -> None:
    scale_manifest(tmp_path)
    np.save(tmp_path / "x.npy", np.arange(8, dtype=np.float32))
    result = tensorline("run", "scale.yaml", "-s", served.target, "-i", "x=x.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tensor float32 [8]" in result.stdout
    assert "[ 0.  2.  4.  6.  8. 10. 12. 14.]" in result.stdout
    # A big tensor: numpy's summary, shape and dtype first.
    np.save(tmp_path / "x.npy", np.arange(5000, dtype=np.int64).reshape(1000, 5))
    result = tensorline("run", "scale.yaml", "-s", served.target, "-i", "x=x.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tensor int64 [1000, 5]" in result.stdout
    assert "[9990 9992 9994 9996 9998]]" in result.stdout and "..." in result.stdout
    assert len(result.stdout.splitlines()) < 40


def test_run_json(served: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: v1\nnodes:\n  - {id: x, node_type: Scale, params: {factor: 2}}\n"
        "  - {id: big, node_type: PassThrough}\n  - {id: calc, node_type: Calculator}\n"
        "  - {id: note, node_type: PassThrough}\n")
    np.save(tmp_path / "x.npy", np.array([1.0, np.nan], dtype=np.float32))
    np.save(tmp_path / "big.npy", np.zeros((100, 20), dtype=np.int16))
    (tmp_path / "calc.json").write_text(json.dumps({"operation": "add", "operands": [2, 40]}))
    (tmp_path / "note.txt").write_text("hello")
    result = tensorline("run", "p.yaml", "-s", served.target, "--json", "-i", "x=x.npy",
                        "-i", "big=big.npy", "-i", "calc=calc.json", "-i", "note=note.txt",
                        "-o", "out.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # nothing else on stdout ("wrote" goes to stderr)
    outputs = document["outputs"]
    assert outputs["x"] == {"kind": "tensor", "dtype": "float32", "shape": [2],
                            "values": [2.0, "nan"]}
    assert outputs["big"] == {"kind": "tensor", "dtype": "int16", "shape": [100, 20],
                              "values": None, "truncated": True}
    assert outputs["calc"]["kind"] == "json" and outputs["calc"]["value"]["result"] == 42
    assert outputs["note"] == {"kind": "text", "value": "hello"}
    assert {n["node_id"] for n in document["metrics"]["nodes"]} == {"x", "big", "calc", "note"}
    assert "wrote out.npz" in result.stderr


def test_run_spinner_only_on_a_terminal(served: ServerProcess, tmp_path: Path) -> None:
    import os
    import pty

    scale_manifest(tmp_path)
    np.save(tmp_path / "x.npy", np.arange(4, dtype=np.float32))
    args = ("run", "scale.yaml", "-s", served.target, "-i", "x=x.npy")
    assert "running scale.yaml" not in tensorline(*args, cwd=tmp_path).stderr  # a pipe
    primary, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            [TENSORLINE, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=secondary,
            env={**user_env(), "TERM": "xterm"})
        os.close(secondary)
        stdout, _ = process.communicate(timeout=120)
        terminal = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the process and its terminal are gone
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(primary)
    assert process.returncode == 0
    assert b"running scale.yaml on " in terminal
    assert b"tensor float32 [4]" in stdout


def test_validate_against_a_servers_catalogue(served: ServerProcess, tmp_path: Path) -> None:
    """Node types only the server has (tests.nodes.spine), fan-in ports and params schemas come
    from its ListNodes; every problem at once, nothing run."""
    (tmp_path / "ok.yaml").write_text(
        "version: v1\nnodes:\n  - {id: b, node_type: OptionalBias}\n"
        "  - {id: s1, node_type: Scale}\n  - {id: s2, node_type: Scale}\n"
        "  - {id: sum, node_type: Add}\n"
        "connections:\n  - {from: s1, to: sum}\n  - {from: s2, to: sum}\n")
    result = tensorline("validate", "ok.yaml", "--server", served.target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"ok.yaml: valid against {served.target} (4 nodes;" in result.stdout
    local = tensorline("validate", "ok.yaml", cwd=tmp_path)  # the local catalogue lacks it
    assert local.returncode == 1 and "unknown node type 'OptionalBias'" in local.stderr

    (tmp_path / "bad.yaml").write_text(
        "version: v1\nnodes:\n  - {id: b, node_type: OptionalBais}\n"
        "  - {id: s, node_type: Scale, params: {factr: 2}}\n"
        "  - {id: t, node_type: TorchMLP}\n"
        "connections:\n  - {from: s, to: ghost}\n")
    result = tensorline("validate", "bad.yaml", "-s", served.target, cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    lines = error_lines(result)
    assert lines[0] == f"bad.yaml: 4 problem(s) against {served.target}", lines
    assert lines[1].startswith("  - nodes[0].node_type: node 'b': unknown node type "
                               "'OptionalBais' (did you mean 'OptionalBias'?)")
    assert lines[2:] == [
        "  - nodes[2].node_type: node 't': node type 'TorchMLP' needs the optional dependency "
        "torch (pip install torch)",
        "  - nodes[1].params.factr: node 's': unknown field 'factr' (did you mean 'factor'?)",
        "  - connections[0].to: no node 'ghost'",
    ]


def test_validate_against_a_server_that_does_not_answer(tmp_path: Path) -> None:
    import socket

    (tmp_path / "ok.yaml").write_text("version: v1\nnodes:\n  - {id: s, node_type: Scale}\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = sock.getsockname()[1]
        result = tensorline("validate", "ok.yaml", "--server", f"127.0.0.1:{port}",
                            cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    [line] = error_lines(result)
    assert line.startswith("TransportError (UNAVAILABLE): failed to connect"), line
    assert line.endswith(f"(is a tensorline server listening on 127.0.0.1:{port}? start one "
                         "with tensorline serve, or pass --server HOST:PORT)")


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path: Path) -> None:
    """A failure the CLI did not foresee (here numpy.load made to raise): one line naming it
    and --debug; with --debug, the traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import numpy\n"
        "def load(*args, **kwargs):\n"
        "    raise RuntimeError('boom')\n"
        "numpy.load = load\n")
    scale_manifest(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(2))
    env = {"PYTHONPATH": str(tmp_path)}
    args = ("run", "scale.yaml", "-s", "127.0.0.1:1", "-i", "x=x.npy")
    result = tensorline(*args, cwd=tmp_path, env=env)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == [
        "error: unexpected RuntimeError: boom (run with --debug for the traceback)"]
    debug = tensorline("--debug", *args, cwd=tmp_path, env=env)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


def test_an_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    scale_manifest(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(2))
    result = tensorline("run", "scale.yaml", "-s", "127.0.0.1:1", "-i", "x=x.npy",
                        "--tls-ca", "ca.pem", cwd=tmp_path)
    assert result.returncode == 1
    no_traceback(result)
    assert error_lines(result) == ["error: --tls-ca ca.pem: cannot read it: No such file or "
                                   "directory"]
