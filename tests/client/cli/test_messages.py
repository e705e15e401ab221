"""The CLI's failures are one clear line, never a traceback, through the installed ``tensorline``
script run as a user runs it: a manifest with a syntax error, a node module in the current
directory, a port already in use, JSON logs and Ctrl-C on ``serve``.

The script, not ``python -c``: ``python -c`` puts the current directory on sys.path by itself,
which would hide whether ``serve --node-module`` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tensorline.client import Client

TENSORLINE = str(Path(sys.executable).with_name("tensorline"))

NODES = '''
"""A user's node package, next to where the server is started."""
from tensorline.server.nodes import Node, Port


class Twice(Node):
    """Double the input."""

    inputs = (Port("in", kind="tensor"),)
    outputs = (Port("out", kind="tensor"),)

    def process(self, inputs):
        return inputs["in"] * 2
'''


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"TENSORLINE_LOAD_ENTRY_POINTS": "false", "COLUMNS": "80"})
    return env


def tensorline(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TENSORLINE, *args], cwd=cwd, env=user_env(), capture_output=True,
                          text=True, timeout=120)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the server's log lines (which carry a timestamp and a level)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and " INFO " not in line and " WARNING " not in line]


@pytest.mark.parametrize("command", ["validate", "run"])
def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path, command: str) -> None:
    (tmp_path / "bad.yaml").write_text(
        "version: v1\nnodes:\n  - {id: a, node_type: PassThrough\n  - [\n")
    result = tensorline(command, "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result) == [
        "error: bad.yaml:4:5: not valid YAML: expected ',' or '}', but got '[' "
        "(while parsing a flow mapping)"], result.stderr


def test_json_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"version": "v1",\n "nodes": [}\n')
    result = tensorline("validate", "bad.json", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result) == ["error: bad.json:2:12: not valid JSON: Expecting value"]


@pytest.fixture
def user_package(tmp_path: Path) -> Path:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nodes.py").write_text(NODES)
    return tmp_path


class Serving:
    """``tensorline serve`` in a session of its own, as a terminal runs it (Ctrl-C signals the
    whole foreground process group)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [TENSORLINE, "serve", "--host", "127.0.0.1", "--port", "0", "--grace", "2", *args],
            cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self.process.stdout is not None
        self.first_line = self.process.stdout.readline()

    def port(self) -> int:
        line = self.first_line
        if line.startswith("{"):
            line = json.loads(line)["message"]
        assert "listening on 127.0.0.1:" in line, line + self.finish()[1]
        return int(line.split("listening on 127.0.0.1:")[1].split()[0])

    def ctrl_c(self) -> tuple[str, str]:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.finish()

    def finish(self) -> tuple[str, str]:
        out, err = self.process.communicate(timeout=60)
        return self.first_line + out, err

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()


def test_serve_imports_node_modules_from_the_current_directory(user_package: Path) -> None:
    server = Serving("--node-module", "mypkg.nodes", cwd=user_package)
    try:
        port = server.port()
        with Client(f"127.0.0.1:{port}") as client:
            # Sandboxed workers import it from there too.
            for hint in ("inprocess", "sandbox"):
                result = client.execute(
                    {"nodes": [{"id": "t", "node_type": "Twice", "runtime_hint": hint}]},
                    {"t": np.arange(3.0)})
                np.testing.assert_array_equal(result["t"], [0.0, 2.0, 4.0])
                assert result.metrics.nodes[0].runtime == hint
        out, err = server.ctrl_c()
    finally:
        server.kill()
    assert server.process.returncode == 0, err
    assert "Traceback" not in out + err


def test_serve_with_a_node_module_it_cannot_find(user_package: Path) -> None:
    elsewhere = user_package / "elsewhere"
    elsewhere.mkdir()
    result = tensorline("serve", "--port", "0", "--node-module", "mypkg.nodes", cwd=elsewhere)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line.startswith("error: node module 'mypkg.nodes' not found: No module named 'mypkg'")
    assert f"current directory {elsewhere}" in line
    assert "PYTHONPATH" in line


@pytest.mark.parametrize("command", ["serve", "validate"])
@pytest.mark.parametrize(("source", "cause"), [
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ("from tensorline.server.nodes import Node, Port\n"
     "class Scale(Node):\n"
     "    inputs = (Port('in'),)\n"
     "    outputs = (Port('out'),)\n"
     "    def process(self, inputs):\n"
     "        return inputs\n",
     "node type 'Scale' from broken_nodes clashes with the one from "
     "tensorline.server.nodes.builtin"),
])
def test_a_node_module_that_cannot_load_is_one_line(tmp_path: Path, command: str, source: str,
                                                     cause: str) -> None:
    (tmp_path / "broken_nodes.py").write_text(source)
    (tmp_path / "p.yaml").write_text("nodes:\n  - {id: s, node_type: Scale}\n")
    args = ["--port", "0"] if command == "serve" else ["p.yaml"]
    result = tensorline(command, *args, "--node-module", "broken_nodes", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert line == f"error: node module 'broken_nodes' could not be loaded: {cause}"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = tensorline("serve", "--host", "127.0.0.1", "--port", str(busy_port), cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert error_lines(result) == [
        f"error: cannot listen on 127.0.0.1:{busy_port}: address already in use "
        "(is another server running on this port?)"]
    assert result.stdout == ""


def test_serve_on_a_port_in_use_logs_json(tmp_path: Path, busy_port: int) -> None:
    result = tensorline("serve", "--host", "127.0.0.1", "--port", str(busy_port),
                        "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 1
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries[-1]["level"] == "ERROR"
    assert f"cannot listen on 127.0.0.1:{busy_port}" in entries[-1]["message"]


def test_json_logs_and_ctrl_c_print_only_json(tmp_path: Path) -> None:
    server = Serving("--log-format", "json", cwd=tmp_path)
    try:
        port = server.port()
        with Client(f"127.0.0.1:{port}") as client:  # a sandboxed call: a worker is running
            client.execute({"nodes": [{"id": "s", "node_type": "Scale",
                                       "runtime_hint": "sandbox"}]}, {"s": np.ones(2)})
        out, err = server.ctrl_c()
    finally:
        server.kill()
    assert server.process.returncode == 0, err
    assert "Traceback" not in out + err
    lines = (out + err).splitlines()
    entries = [json.loads(line) for line in lines]  # every line is JSON
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("tensorline listening on 127.0.0.1:") for m in messages)
    assert "drained; exiting" in messages


def test_validate_reports_every_problem_once_per_line(tmp_path: Path) -> None:
    """A top-level typo and a node-field typo hide nothing and invent nothing: one line per
    real problem, however narrow the terminal (COLUMNS=80)."""
    (tmp_path / "typo.yaml").write_text(
        "version: v1\n"
        "nodes:\n"
        "  - {id: src, node_typ: PassThrough}\n"
        "  - {id: s, node_type: Scale, params: {factr: 2}}\n"
        "conections: []\n"
        "connections:\n"
        "  - {from: src, to: s}\n"
        "  - {from: s, to: ghost}\n")
    result = tensorline("validate", "typo.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = error_lines(result)
    # (After the catalogue's own warnings, such as an optional dependency not installed.)
    assert lines[lines.index("typo.yaml: 5 problem(s)"):] == [
        "typo.yaml: 5 problem(s)",
        "  - conections: unknown field 'conections' (did you mean 'connections'?)",
        "  - nodes[0].node_type: Field required",
        "  - nodes[0].node_typ: unknown field 'node_typ' (did you mean 'node_type'?)",
        "  - nodes[1].params.factr: node 's': unknown field 'factr' (did you mean 'factor'?)",
        "  - connections[1].to: no node 'ghost'",
    ]
