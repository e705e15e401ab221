"""The event loop choice: what each setting resolves to, and real servers on both loops."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import numpy as np
import pytest

from tensorline.client import Client
from tensorline.server import _eventloop
from tests.support.processes import ServerProcess


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_prefers_uvloop_when_installed() -> None:
    assert importlib.util.find_spec("uvloop") is not None, "uvloop is a dependency"
    assert _eventloop.resolve("auto") == "uvloop"
    assert _eventloop.run(loop_module(), "auto").startswith("uvloop")


def test_asyncio_choice_uses_the_standard_loop() -> None:
    assert _eventloop.resolve("asyncio") == "asyncio"
    assert _eventloop.run(loop_module(), "asyncio") == "asyncio.unix_events"


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "uvloop" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert _eventloop.resolve("auto") == "asyncio"
    with pytest.raises(RuntimeError, match="TENSORLINE_EVENT_LOOP=asyncio"):
        _eventloop.resolve("uvloop")


MIXED = {"nodes": [
    {"id": "scale", "node_type": "Scale", "params": {"factor": 2.0},
     "runtime_hint": "inprocess"},
    {"id": "box", "node_type": "PassThrough", "runtime_hint": "sandbox"},
], "connections": [{"from": "scale", "to": "box"}]}


@pytest.mark.parametrize(("choice", "loop_class"), [
    ("uvloop", "uvloop.Loop"),
    ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop"),
])
def test_serve_runs_in_process_and_sandboxed_nodes_on_either_loop(
        choice: str, loop_class: str) -> None:
    with ServerProcess.start(env={"TENSORLINE_EVENT_LOOP": choice,
                                  "TENSORLINE_SANDBOX_WORKERS": "1"}) as server:
        data = np.arange(1000, dtype=np.float32)
        with Client(server.target) as client:
            result = client.execute(MIXED, {"scale": data})
        np.testing.assert_array_equal(result.outputs["box"], data * 2)
        assert {m.node_id: m.runtime for m in result.metrics.nodes} == {
            "scale": "inprocess", "box": "sandbox"}
        assert f"event loop: {loop_class}" in server.logs()
