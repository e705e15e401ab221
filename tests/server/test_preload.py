"""Preloading (``server/_preload.py``, ``TENSORLINE_PRELOAD_MODULES``) through the real path: a
``tensorline serve`` process whose server and sandbox workers report what they had imported
before their first call; a module that cannot be imported; an untrusted one refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tensorline.client import Client
from tensorline.server import Settings, create_server
from tensorline.server._preload import PreloadError
from tests.support.processes import REPO_ROOT, ServerProcess

PROBE = "tests.server.preload_probe"
NEEDS_ENV = "tests.server.preload_needs_env"
NODES = "tests.server.preload_nodes"


def server_env(**extra: str) -> dict[str, str]:
    return {"TENSORLINE_NODE_MODULES": NODES, "TENSORLINE_SANDBOX_WORKERS": "1",
            "TENSORLINE_LOAD_ENTRY_POINTS": "false", **extra}


def modules_seen(client: Client, runtime: str) -> dict[str, Any]:
    """What ``PreloadedModules`` reports from the server (inprocess) or a worker (sandbox)."""
    manifest = {"version": "v1", "nodes": [{"id": "m", "node_type": "PreloadedModules",
                                            "runtime_hint": runtime}]}
    result = client.execute(manifest, {"m": np.zeros(1, dtype=np.float32)})
    assert result.metrics.nodes[0].runtime == runtime
    seen: dict[str, Any] = result["m"].value
    return seen


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Client]]:
    # NEEDS_ENV imports in the server (its environment has the variable) but not in the
    # launcher, whose environment is minimal.
    env = server_env(TENSORLINE_PRELOAD_MODULES=f"{PROBE},{NEEDS_ENV}",
                     TENSORLINE_TEST_PRELOAD_ENV="1")
    with ServerProcess.start(env=env, pythonpath_repo=True,
                             log_dir=tmp_path_factory.mktemp("preload-log")) as server, \
            Client(server.target, timeout=60) as client:
        yield server, client


def test_the_server_has_imported_the_preload_modules_before_any_call(
        preloaded: tuple[ServerProcess, Client]) -> None:
    server, client = preloaded
    seen = modules_seen(client, "inprocess")
    assert seen == {"modules": [NEEDS_ENV, PROBE], "pid": server.pid}
    assert "preloaded 2 module(s)" in server.logs()


def test_a_worker_starts_with_the_modules_the_launcher_preloaded(
        preloaded: tuple[ServerProcess, Client]) -> None:
    server, client = preloaded
    seen = modules_seen(client, "sandbox")
    assert seen["pid"] != server.pid
    # The launcher imported PROBE before forking; NEEDS_ENV failed there (minimal environment):
    # logged, naming it, and the server serves regardless.
    assert seen["modules"] == [PROBE]
    assert (f"sandbox launcher: preload module {NEEDS_ENV} could not be imported"
            in server.logs())
    assert server.health() == "SERVING"


def test_without_preloading_neither_server_nor_worker_has_the_module(tmp_path: Path) -> None:
    """The control: the node module itself never imports the probe."""
    with ServerProcess.start(env=server_env(), pythonpath_repo=True, log_dir=tmp_path) as server, \
            Client(server.target, timeout=60) as client:
        assert modules_seen(client, "inprocess")["modules"] == []
        assert modules_seen(client, "sandbox")["modules"] == []


def test_tensorline_serve_stops_naming_a_preload_module_that_does_not_import(
        tmp_path: Path) -> None:
    env = {**os.environ, "TENSORLINE_PRELOAD_MODULES": "tests.server.no_such_module",
           "TENSORLINE_LOAD_ENTRY_POINTS": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT),
                                                     os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-c", "from tensorline.client.cli import main; main()", "serve",
         "--host", "127.0.0.1", "--port", "0"],
        env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 1, done.stderr
    assert "preload module 'tests.server.no_such_module' could not be imported" in done.stderr
    assert "ModuleNotFoundError" in done.stderr


async def test_start_raises_preload_error_before_any_runtime_starts() -> None:
    server, _ = await create_server(Settings(host="127.0.0.1", port=0,
                                             preload_modules=["tests.server.no_such_module"],
                                             load_entry_points=False))
    try:
        with pytest.raises(PreloadError) as caught:
            await server.start()
        assert caught.value.module == "tests.server.no_such_module"
        assert server.engine.runtimes["sandbox"].healthy() is False  # never started
    finally:
        await server.stop(grace=0)


def test_an_untrusted_module_is_never_preloaded() -> None:
    with pytest.raises(ValueError, match="untrusted code is never imported outside"):
        Settings(untrusted_modules=["acme.nodes"], preload_modules=["acme.nodes.audio"])
    with pytest.raises(ValueError, match="untrusted"):
        Settings(untrusted_modules=["acme.nodes"], preload_modules=["acme.nodes"])
    # A sibling whose name merely starts the same is not inside it.
    assert Settings(untrusted_modules=["acme.nodes"],
                    preload_modules=["acme.nodes_extra"]).preload_modules == ["acme.nodes_extra"]
