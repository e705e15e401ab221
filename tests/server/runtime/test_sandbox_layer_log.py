"""The sandbox logs its layers once at startup (a summary), then only real changes: workers
report their layers one after another, and a replacement worker's own details (its uid) are no
change. ``_record_layers`` is fed fake workers; no process is started."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from tensorline.server.runtime.sandbox import SandboxRuntime


def worker(wid: int, *layers: tuple[str, bool, str]) -> Any:
    return SimpleNamespace(wid=wid, alive=True, layers=list(layers))


def test_layers_are_logged_once_then_only_changes(caplog: pytest.LogCaptureFixture) -> None:
    runtime = SandboxRuntime(workers=2)
    workers: dict[int, Any] = runtime._workers  # type: ignore[assignment]
    with caplog.at_level(logging.INFO):
        for wid in (1, 2):  # start(): the workers report one after another, nothing logged yet
            workers[wid] = worker(wid, ("uid", True, f"uid {wid}"), ("seccomp", True, "on"))
            runtime._record_layers(workers[wid])
        assert "sandbox layer" not in caplog.text
        runtime._log_layers()  # the end of start(): one line per layer
        assert caplog.text.count("sandbox layer uid: active") == 1
        assert caplog.text.count("sandbox layer seccomp: active") == 1
        caplog.clear()
        workers[3] = worker(3, ("uid", True, "uid 3"), ("seccomp", True, "on"))
        runtime._record_layers(workers[3])  # a replacement: its uid differs, nothing changed
        assert "sandbox layer" not in caplog.text
        workers[4] = worker(4, ("uid", True, "uid 4"), ("seccomp", False, "refused"))
        runtime._record_layers(workers[4])  # a real change
    assert caplog.text.count("sandbox layer") == 1
    assert "sandbox layer seccomp: NOT ACTIVE (refused)" in caplog.text
