"""Server side of the launcher process that forks sandbox workers (see ``_zygote``).

Why a launcher of our own rather than multiprocessing's forkserver: the forkserver inherits the
server's environment (a worker's ``/proc/self/environ`` shows it whatever Python does to
``os.environ``) and hands every worker the server's forkserver "alive" fd and the resource
tracker's fd, each of which a hostile node can write to. This launcher is exec'd with an
explicit minimal environment, receives exactly the fds each worker needs, and reports each
worker's exit status, which it reaps.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tensorline.server._prestart import adopt, minimal_environment, spawn
from tensorline.server.runtime.sandbox._isolation import forbid_inspection

log = logging.getLogger(__name__)

__all__ = ["Launcher", "LauncherGone", "minimal_environment"]


class LauncherGone(RuntimeError):
    """The launcher process is not running (it died, or was never started)."""


class Launcher:
    """Starts the launcher process and asks it for workers.

    ``on_exit(pid, code)`` is called (on the event loop) for every worker that ends, with its
    exit status or minus the signal that killed it; when the launcher itself dies, for every
    worker it had (they die with it: ``PR_SET_PDEATHSIG``). ``preload``: trusted modules the
    launcher imports before forking any worker (one that fails is logged, not fatal: the server
    process imported it already, and a launcher restarted mid-service must not stop serving).
    """

    def __init__(self, env: Mapping[str, str], on_exit: Callable[[int, int], None],
                 start_timeout_s: float = 60.0, preload: Iterable[str] = ()) -> None:
        self._env = dict(env)
        self._preload = list(dict.fromkeys(preload))
        self._on_exit = on_exit
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[int] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._children: set[int] = set()
        self._tokens = itertools.count(1)
        self._starting: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._sock is not None and self._ready is not None and self._ready.done() and (
            not self._ready.cancelled() and self._ready.exception() is None)

    async def ensure_running(self) -> None:
        """Start the launcher (again, after it died); concurrent callers share one start."""
        if self.running:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._close_socket()
        # The server is out of reach of workers that share its uid from now on (see
        # ``forbid_inspection``): before any worker exists.
        forbid_inspection()
        loop = asyncio.get_running_loop()
        self._loop = loop
        # The one `tensorline serve`/`demo` started before importing the server, if it is
        # for these settings (server._prestart); else a new one (started in a thread: spawning
        # takes a few ms).
        launched = adopt(self._env, self._preload)
        if launched is None:
            launched = await asyncio.to_thread(spawn, self._env, self._preload)
        self._process, ours = launched
        self._sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self._start_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def spawn(self, config: Any, sock: socket.socket, output_fd: int) -> int:
        """Fork a worker that gets ``sock`` (its control socket) and ``output_fd`` (its
        stdout/stderr); returns its pid. Both fds stay open here: the caller closes them."""
        await self.ensure_running()
        assert self._sock is not None and self._loop is not None
        token = next(self._tokens)
        future: asyncio.Future[int] = self._loop.create_future()
        self._pending[token] = future
        try:
            self._sock.sendmsg([pickle.dumps(("spawn", token, config))], [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS,
                 array.array("i", [sock.fileno(), output_fd]))])
            return await future
        finally:
            self._pending.pop(token, None)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._on_launcher_gone()
            return
        try:
            message = pickle.loads(data)
            kind = message[0]
        except Exception:
            log.error("sandbox launcher sent an undecodable message; restarting it")
            self._on_launcher_gone()
            return
        if kind == "ready" and self._ready is not None and not self._ready.done():
            for module, error in message[2]:
                log.error("sandbox launcher: preload module %s could not be imported (workers "
                          "import it on demand): %s", module, error)
            self._ready.set_result(int(message[1]))
        elif kind == "spawned":
            self._children.add(int(message[2]))
            self._resolve(int(message[1]), int(message[2]), None)
        elif kind == "failed":
            self._resolve(int(message[1]), 0, LauncherGone(str(message[2])))
        elif kind == "exited":
            pid = int(message[1])
            self._children.discard(pid)
            self._on_exit(pid, int(message[2]))

    def _resolve(self, token: int, pid: int, error: Exception | None) -> None:
        future = self._pending.get(token)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(pid)
        else:
            future.set_exception(error)

    def _on_launcher_gone(self) -> None:
        """Every worker died with the launcher; report them, and fail the spawns in flight."""
        self._close_socket()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(LauncherGone("the sandbox launcher exited during start"))
            self._ready.exception()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LauncherGone("the sandbox launcher exited"))
        children, self._children = self._children, set()
        for pid in children:
            self._on_exit(pid, -9)
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def _close_socket(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        """Close the socket: the launcher kills its workers and exits. Idempotent."""
        self._close_socket()
        process = self._process
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, 10.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.to_thread(process.wait)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LauncherGone("the sandbox launcher was shut down"))
