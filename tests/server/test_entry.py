"""The server's entry functions for the command line (server/_entry.py): ``run_server`` runs a
real server, ``check_manifest`` and ``local_catalogue`` run the compiler and the catalogue
without one, and each reports a failure to set up as ``SetupError``."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from tensorline.client import AsyncClient
from tensorline.server import (
    SetupError,
    TensorlineServer,
    check_manifest,
    local_catalogue,
    run_server,
)
from tests.support.manifests import one_node

# A small self-contained server: no sandbox, built-in nodes only.
OPTIONS = {"host": "127.0.0.1", "port": 0, "grace_s": 1.0, "sandbox": False,
           "load_entry_points": False}


def test_run_server_serves_while_the_callers_work_runs_then_stops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # environment=False: the operator's settings do not apply (no token is asked for).
    monkeypatch.setenv("TENSORLINE_AUTH_TOKENS", "secret")

    async def call(server: TensorlineServer) -> tuple[int, np.ndarray]:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            result = await client.execute(one_node("PassThrough"), {"n": np.arange(3.0)})
        return server.port, result["n"]

    port, value = run_server(dict(OPTIONS), environment=False, while_serving=call)
    np.testing.assert_array_equal(value, np.arange(3.0))
    with socket.socket() as probe:  # stopped: nothing listens on its port any more
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_run_server_refuses_invalid_settings_with_exit_code_2() -> None:
    async def never(server: TensorlineServer) -> None:
        raise AssertionError("started with invalid settings")

    with pytest.raises(SetupError) as caught:
        run_server({**OPTIONS, "port": -1}, environment=False, while_serving=never)
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith("invalid settings:") and "port" in caught.value.message


def test_a_missing_node_module_is_a_setup_error_with_a_json_log_line() -> None:
    async def never(server: TensorlineServer) -> None:
        raise AssertionError("started without its node module")

    with pytest.raises(SetupError) as caught:
        run_server({**OPTIONS, "node_modules": ["no_such_node_module"], "log_format": "json"},
                   environment=False, while_serving=never)
    error = caught.value
    assert error.exit_code == 1
    assert error.message.startswith("node module 'no_such_node_module' not found")
    assert error.log_line is not None
    entry = json.loads(error.log_line)
    assert entry["level"] == "ERROR" and entry["message"] == f"cannot start: {error.message}"


def test_check_manifest_reports_every_problem_or_the_pipelines_shape() -> None:
    valid = check_manifest(one_node("Scale", {"factor": 2}))
    assert valid.valid and valid.nodes == 1
    assert valid.inputs == (("n", "in"),) and valid.outputs == (("n", "out"),)

    invalid = check_manifest({"nodes": [{"id": "a", "node_type": "Scael"},
                                        {"id": "b", "node_type": "Scale",
                                         "params": {"factor": "x"}}]})
    assert not invalid.valid
    fields = [v.field for v in invalid.violations]
    assert len(fields) == 2 and fields[0].startswith("nodes[0]") and fields[1].startswith("nodes[1]")


def test_check_manifest_against_a_catalogue_agrees_with_the_local_check() -> None:
    listing = local_catalogue()
    assert "Scale" in {info.node_type for info in listing.nodes}
    manifest = one_node("Scale", {"factor": "x"})
    local, listed = check_manifest(manifest), check_manifest(manifest, catalogue=listing)
    assert [v.field for v in listed.violations] == [v.field for v in local.violations]
    assert len(local.violations) == 1


def test_check_manifest_names_a_node_module_it_cannot_import() -> None:
    with pytest.raises(SetupError) as caught:
        check_manifest(one_node("Scale"), node_modules=["no_such_node_module"])
    assert caught.value.message.startswith("node module 'no_such_node_module' not found")
