"""A client-only install: ``pip install tensorline`` (the wheel, no extras) in a fresh venv.

It must not bring the server's dependencies (scipy, uvloop, the sandbox bindings, ...), and its
``tensorline`` command must work against a real server (started from the repository's own venv,
which has the server extra) for everything a client does: health, run (a .wav input included:
read without scipy), stream, nodes --server. The commands that run the server's code say in one
line which extra they need. Dependencies come from the package index (pip's cache keeps it to
about a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.processes import REPO_ROOT, ServerProcess

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

# Distributions of the server extra that a client-only install must not have (pydantic is not
# among them: recent typer releases depend on it).
SERVER_ONLY = ("scipy", "uvloop", "pyseccomp", "landlock", "pydantic-settings", "jsonschema",
               "prometheus-client", "grpcio-reflection")
EXTRA_HINT = "needs the server extra: pip install 'tensorline[server]'"


def _run(command: list[str], *, timeout: float = 300, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH: the fresh venv must import tensorline from the wheel, not from the repo.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"{command} exited {done.returncode}\nstdout:\n{done.stdout}\n"
                             f"stderr:\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project's wheel installed without extras; returns its bin dir."""
    root = tmp_path_factory.mktemp("client-only")
    # Built from a copy of what the package is made of (as the image build's context is), so
    # setuptools' build/ directory is not left in the repository, nor stale files taken from it.
    source = root / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("protos", "server", "client"):
        shutil.copytree(REPO_ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = root / "wheels"
    # No build isolation: the repository's venv has setuptools (no download to build).
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(wheels), str(source)])
    (wheel,) = wheels.glob("tensorline-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
          "--disable-pip-version-check", str(wheel)], timeout=600)
    return venv / "bin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess.start(log_dir=tmp_path_factory.mktemp("server"),
                             env={"TENSORLINE_SANDBOX_WORKERS": "1"}) as process:
        yield process


def test_no_server_dependencies_are_installed(client_venv: Path) -> None:
    listed = _run([str(client_venv / "python"), "-m", "pip", "list", "--format", "json"]).stdout
    installed = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed)}
    assert "tensorline" in installed
    assert not installed & set(SERVER_ONLY), sorted(installed & set(SERVER_ONLY))


def test_health_against_a_real_server(client_venv: Path, server: ServerProcess) -> None:
    done = _run([str(client_venv / "tensorline"), "health", "--server", server.target])
    assert done.stdout.strip() == f"{server.target}: SERVING"


def test_run_with_npy_and_wav_inputs(client_venv: Path, server: ServerProcess,
                                     tmp_path: Path) -> None:
    manifest = {"version": "v1", "nodes": [
        {"id": "src", "node_type": "PassThrough"},
        {"id": "double", "node_type": "Scale", "params": {"factor": 2}},
        {"id": "mic", "node_type": "PassThrough"},
    ], "connections": [{"from": "src", "to": "double"}]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(manifest))
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32))
    # A 16-bit PCM WAV file, written by hand: nothing on the client side uses scipy.
    samples = (np.arange(160, dtype=np.int16) - 80) * 100
    write_pcm16(tmp_path / "clip.wav", samples, 16000)
    done = _run([str(client_venv / "tensorline"), "run", "pipeline.yaml", "--server", server.target,
                 "-i", "src=x.npy", "-i", "mic=clip.wav", "-o", "out.npz"], cwd=tmp_path)
    assert "wrote out.npz" in done.stdout
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["double"], np.arange(6, dtype=np.float32) * 2)
        np.testing.assert_array_equal(out["mic"], samples)
        assert int(out["mic.sample_rate"]) == 16000


def test_stream_and_remote_catalogue(client_venv: Path, server: ServerProcess,
                                     tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(
        {"nodes": [{"id": "mic", "node_type": "PassThrough"}]}))
    samples = np.arange(3200, dtype=np.int16)
    write_pcm16(tmp_path / "speech.wav", samples, 16000)
    _run([str(client_venv / "tensorline"), "stream", "pipeline.yaml", "--server", server.target,
          "-i", "mic=speech.wav", "--chunk", "20ms", "-o", "out.wav"], cwd=tmp_path)
    # The output WAV is what scipy.io.wavfile would write: the repository's venv reads it back.
    from scipy.io import wavfile

    rate, echoed = wavfile.read(tmp_path / "out.wav")
    assert rate == 16000
    np.testing.assert_array_equal(echoed, samples)
    listing = _run([str(client_venv / "tensorline"), "nodes", "--json", "--server", server.target])
    assert "Scale" in {entry["node_type"] for entry in json.loads(listing.stdout)}


def test_the_client_imports_nothing_of_the_server(client_venv: Path, server: ServerProcess) -> None:
    script = ("import sys, numpy as np\n"
              "from tensorline.client import Client\n"
              f"with Client({server.target!r}) as client:\n"
              "    result = client.execute({'nodes': [{'id': 'n', 'node_type': 'Scale',\n"
              "                             'params': {'factor': 3}}]}, {'n': np.ones(2)})\n"
              "print(result['n'].tolist())\n"
              "print(sorted(m for m in sys.modules if m.startswith('tensorline.server')))\n")
    done = _run([str(client_venv / "python"), "-c", script])
    assert done.stdout.splitlines() == ["[3.0, 3.0]", "[]"]


@pytest.mark.parametrize("command", [["serve"], ["demo"], ["validate", "pipeline.yaml"],
                                     ["nodes"]])
def test_server_commands_name_the_extra_in_one_line(client_venv: Path, tmp_path: Path,
                                                    command: list[str]) -> None:
    (tmp_path / "pipeline.yaml").write_text("nodes: [{id: a, node_type: PassThrough}]\n")
    done = _run([str(client_venv / "tensorline"), *command], cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert EXTRA_HINT in done.stderr and "Traceback" not in done.stderr


def write_pcm16(path: Path, samples: np.ndarray, rate: int) -> None:
    """A mono 16-bit PCM WAV file (the canonical 44-byte header)."""
    import struct

    body = samples.astype("<i2").tobytes()
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt "
                     + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
                     + b"data" + struct.pack("<I", len(body)) + body)
