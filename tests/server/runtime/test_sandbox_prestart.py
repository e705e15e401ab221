"""A launcher started before the server imports itself (``tensorline.server.prestart_launcher``,
as ``tensorline serve`` and ``tensorline demo`` do) is the one the sandbox runtime uses when it
was started for the runtime's environment and preload modules; otherwise it is closed and the
runtime starts its own. Either way the pool serves, and nothing is left running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil

from tensorline.server._prestart import prestart as prestart_launcher
from tensorline.server.runtime import ExecutionScope, SandboxRuntime
from tests.server.runtime import sandbox_nodes as nodes
from tests.server.runtime.conftest import make_spec
from tests.support.processes import wait_until


def _prestarted_pid() -> int:
    from tensorline.server import _prestart

    assert _prestart._prestarted is not None
    return _prestart._prestarted[1].pid


async def _serves(runtime: SandboxRuntime) -> None:
    spec = make_spec(nodes.AsyncDouble, trusted=True)
    out = await runtime.call(spec, ExecutionScope(execution_id="prestart"),
                             {"in": np.arange(3.0)})
    assert out.tolist() == [0.0, 2.0, 4.0]


async def test_the_runtime_adopts_a_launcher_prestarted_for_its_settings(
        no_leaks: None, tmp_path: Path) -> None:
    prestart_launcher([], [])
    prestarted = _prestarted_pid()
    runtime = SandboxRuntime(workers=1, scratch_root=str(tmp_path / "scratch"))
    await runtime.start()
    try:
        assert runtime._launcher is not None and runtime._launcher.pid == prestarted
        await _serves(runtime)
    finally:
        await runtime.shutdown()


async def test_a_launcher_prestarted_for_other_settings_is_closed(
        no_leaks: None, tmp_path: Path) -> None:
    prestart_launcher([], ["json"])  # the runtime below preloads nothing
    prestarted = _prestarted_pid()
    runtime = SandboxRuntime(workers=1, scratch_root=str(tmp_path / "scratch"))
    await runtime.start()
    try:
        assert runtime._launcher is not None and runtime._launcher.pid != prestarted
        wait_until(lambda: not psutil.pid_exists(prestarted)
                   or psutil.Process(prestarted).status() == psutil.STATUS_ZOMBIE,
                   timeout=10.0, what="the unused launcher to exit")
        await _serves(runtime)
    finally:
        await runtime.shutdown()
