"""The ``tensorline`` command line against real servers.

A server started in the test's event loop cannot answer a blocking call made from that same
thread, so each CLI invocation runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tensorline.client import AsyncClient
from tensorline.client.cli import app

MANIFEST = {
    "version": "v1",
    "metadata": {"name": "cli"},
    "nodes": [
        {"id": "src", "node_type": "PassThrough"},
        {"id": "double", "node_type": "Scale", "params": {"factor": 2}},
        {"id": "halves", "node_type": "Split"},
        {"id": "calc", "node_type": "Calculator"},
        {"id": "note", "node_type": "PassThrough"},
    ],
    "connections": [{"from": "src", "to": "double"}, {"from": "double", "to": "halves"}],
}


async def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    runner = CliRunner(env={"COLUMNS": "200", **(env or {})})
    return await asyncio.to_thread(runner.invoke, app, list(args))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(MANIFEST))
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32))
    (tmp_path / "calc.json").write_text(json.dumps({"operation": "add", "operands": [2, 40]}))
    (tmp_path / "note.txt").write_text("hello")
    return tmp_path


async def test_run_writes_every_output_to_npz(target: str, workdir: Path) -> None:
    out = workdir / "out.npz"
    result = await cli("run", str(workdir / "pipeline.yaml"), "--server", target,
                       "--input", f"src={workdir / 'x.npy'}",
                       "-i", f"calc={workdir / 'calc.json'}",
                       "-i", f"note:in={workdir / 'note.txt'}",
                       "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "halves:first" in result.stdout
    assert f"wrote {out}" in result.stdout
    with np.load(out) as saved:
        assert set(saved.files) == {"halves:first", "halves:second", "calc", "note"}
        np.testing.assert_array_equal(saved["halves:first"], [0.0, 2.0, 4.0])
        np.testing.assert_array_equal(saved["halves:second"], [6.0, 8.0, 10.0])
        assert saved["halves:first"].dtype == np.float32
        assert json.loads(str(saved["calc"]))["result"] == 42
        assert str(saved["note"]) == "hello"


async def test_run_writes_a_directory(target: str, workdir: Path) -> None:
    out = workdir / "outdir"
    result = await cli("run", str(workdir / "pipeline.yaml"), "-s", target,
                       "-i", f"src={workdir / 'x.npy'}", "-i", f"calc={workdir / 'calc.json'}",
                       "-i", f"note={workdir / 'note.txt'}", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "calc.json", "halves_first.npy", "halves_second.npy", "note.txt"]
    np.testing.assert_array_equal(np.load(out / "halves_second.npy"), [6.0, 8.0, 10.0])


async def test_run_reports_server_errors(target: str, workdir: Path) -> None:
    result = await cli("run", str(workdir / "pipeline.yaml"), "--server", target,
                       "-i", f"src={workdir / 'x.npy'}")
    assert result.exit_code == 1
    assert "InvalidRequestError (INVALID_ARGUMENT)" in result.stderr
    assert "missing input for node 'calc' port 'in'" in result.stderr
    assert "missing input for node 'note' port 'in'" in result.stderr


async def test_run_rejects_a_bad_input_argument(target: str, workdir: Path) -> None:
    result = await cli("run", str(workdir / "pipeline.yaml"), "-s", target, "-i", "src")
    assert result.exit_code == 1
    assert "expected NODE[:PORT]=FILE" in result.stderr


async def test_validate_valid_manifest(workdir: Path) -> None:
    result = await cli("validate", str(workdir / "pipeline.yaml"),
                       "--node-module", "tests.nodes.basic")
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout
    assert "5 nodes" in result.stdout


async def test_validate_lists_every_problem(tmp_path: Path) -> None:
    broken = {
        "version": "v1",
        "nodez": [],
        "nodes": [{"id": "a", "node_type": "Scale", "params": {"factr": 2}}],
    }
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = await cli("validate", str(path))
    assert result.exit_code == 1
    assert "unknown field 'nodez' (did you mean 'nodes'?)" in result.stderr

    broken.pop("nodez")
    broken["nodes"] += [{"id": "a", "node_type": "Scael"},
                        {"id": "b", "node_type": "PassThrough", "runtime_hint": "gpu"}]
    broken["connections"] = [{"from": "a", "to": "ghost"}]
    path.write_text(json.dumps(broken))
    result = await cli("validate", str(path))
    assert result.exit_code == 1
    assert "4 problem(s)" in result.stderr
    for text in ("nodes[0].params.factr", "did you mean 'factor'", "nodes[1].id",
                 "duplicate node id 'a'", "nodes[2].runtime_hint", "unknown runtime hint 'gpu'",
                 "connections[0].to", "no node 'ghost'"):
        assert text in result.stderr, text


async def test_validate_resolves_model_paths_like_a_server_here(tmp_path: Path) -> None:
    """Model paths resolve against the model roots of this environment's server settings."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"resolved only: validate loads no model")
    path = tmp_path / "model.json"
    for model, ok in (("m.onnx", True), ("../model.json", False)):
        path.write_text(json.dumps({"nodes": [{"id": "m", "node_type": "OnnxModel",
                                               "params": {"path": model}}]}))
        result = await cli("validate", str(path),
                           env={"TENSORLINE_MODEL_DIRS": str(tmp_path / "models")})
        assert result.exit_code == (0 if ok else 1), result.output
        if not ok:
            assert "nodes[0].params.path" in result.stderr
            assert "'..' is not allowed in a model path" in result.stderr
    path.write_text(json.dumps({"nodes": [{"id": "m", "node_type": "OnnxModel",
                                           "params": {"path": "m.onnx"}}]}))
    result = await cli("validate", str(path))
    assert result.exit_code == 1
    assert "no model roots" in result.stderr


async def test_validate_unreadable_manifest(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    result = await cli("validate", str(path))
    assert result.exit_code == 1
    assert "must be a mapping" in result.stderr
    result = await cli("validate", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1


async def test_nodes_table_and_json() -> None:
    table = await cli("nodes")
    assert table.exit_code == 0, table.output
    for name in ("PassThrough", "Scale", "Add", "Calculator", "Cast", "Reshape", "Normalize",
                 "AudioResample"):
        assert name in table.stdout
    as_json = await cli("nodes", "--json")
    assert as_json.exit_code == 0
    listing = {entry["node_type"]: entry for entry in json.loads(as_json.stdout)}
    scale = listing["Scale"]
    assert scale["params_schema"]["properties"]["factor"]["type"] == "number"
    assert scale["inputs"] == [{"name": "in", "kind": "tensor", "required": True}]
    assert listing["AudioResample"]["params_schema"]["required"] == ["target_rate"]


async def test_nodes_from_a_server(target: str) -> None:
    result = await cli("nodes", "--server", target, "--json")
    assert result.exit_code == 0, result.output
    types = {entry["node_type"] for entry in json.loads(result.stdout)}
    assert {"Scale", "Split", "Concat", "SlowAsync"} <= types


async def test_health_serving(target: str) -> None:
    result = await cli("health", "--server", target)
    assert result.exit_code == 0, result.output
    assert f"{target}: SERVING" in result.stdout


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port that is bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_health_when_nothing_listens(dead_port: int) -> None:
    result = await cli("health", "--server", f"127.0.0.1:{dead_port}", "--timeout", "5")
    assert result.exit_code == 1
    assert f"127.0.0.1:{dead_port}" in result.stderr


async def test_health_not_serving_while_draining(server_factory: Any) -> None:
    server = await server_factory()
    await server.health.enter_graceful_shutdown()
    result = await cli("health", "--server", f"127.0.0.1:{server.port}")
    assert result.exit_code == 1
    assert "NOT_SERVING" in result.stdout


async def test_demo_runs_end_to_end() -> None:
    # The operator's server settings in the environment must not break the self-contained demo.
    result = await cli("demo", env={"TENSORLINE_AUTH_TOKENS": "secret"})
    assert result.exit_code == 0, result.output
    assert "started a tensorline server on 127.0.0.1:" in result.stdout
    for text in ("mic", "audio int16", "16000 Hz", "norm", "tensor float32 [3, 4]", "plan cached",
                 "preload and warm-up on", "first call ", "second call "):
        assert text in result.stdout, text


def test_serve_applies_flags_over_environment_over_config_file(tmp_path: Path) -> None:
    """`tensorline serve` in a process of its own: settings precedence seen through the wire."""
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"port": 1, "instance_id": "from-file",
                                      "max_tensor_bytes": 1000, "max_message_bytes": 5_000_000}))
    env = {**os.environ, "TENSORLINE_MAX_TENSOR_BYTES": "2000", "TENSORLINE_PORT": "2",
           "TENSORLINE_INSTANCE_ID": "from-env", "TENSORLINE_LOAD_ENTRY_POINTS": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", "from tensorline.client.cli import main; main()", "serve",
         "--host", "127.0.0.1", "--port", "0", "--config", str(config), "--log-level", "WARNING"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("tensorline listening on 127.0.0.1:"), (
            line + (process.stderr.read() if process.poll() is not None and process.stderr else ""))
        port = int(line.removeprefix("tensorline listening on 127.0.0.1:").split()[0])
        assert port > 2  # the --port flag beats the environment and the file

        async def info() -> Any:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                return await client.server_info()

        server_info = asyncio.run(info())
        assert server_info.instance_id == "from-env"           # env beats file
        assert server_info.max_tensor_bytes == 2000            # env beats file
        assert server_info.max_message_bytes == 5_000_000      # file beats default
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


async def test_run_with_wav_audio(target: str, tmp_path: Path) -> None:
    import wave

    source = tmp_path / "tone.wav"
    tone = (np.sin(np.arange(4410) * 2 * np.pi * 440 / 44100) * 12000).astype("<i2")
    with wave.open(str(source), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(tone.tobytes())
    manifest = tmp_path / "resample.json"
    manifest.write_text(json.dumps({"version": "v1", "nodes": [
        {"id": "res", "node_type": "AudioResample", "params": {"target_rate": 16000}}]}))
    npz, folder = tmp_path / "out.npz", tmp_path / "out"
    for out in (npz, folder):
        result = await cli("run", str(manifest), "-s", target, "-i", f"res={source}",
                           "-o", str(out))
        assert result.exit_code == 0, result.output
        assert "audio int16 [1600] @ 16000 Hz" in result.stdout
    with np.load(npz) as saved:
        assert saved["res"].dtype == np.int16
        assert saved["res"].shape == (1600,)
        assert int(saved["res.sample_rate"]) == 16000
    with wave.open(str(folder / "res.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnframes()) == (16000, 2, 1600)


async def test_run_timeout_is_reported(target: str, workdir: Path) -> None:
    manifest = workdir / "slow.json"
    manifest.write_text(json.dumps({"version": "v1", "nodes": [
        {"id": "slow", "node_type": "SlowAsync", "params": {"seconds": 60}}]}))
    result = await cli("run", str(manifest), "-s", target, "-i", f"slow={workdir / 'x.npy'}",
                       "--timeout", "0.3")
    assert result.exit_code == 1
    assert "DeadlineExceededError (DEADLINE_EXCEEDED)" in result.stderr
