"""The launcher process: forks sandbox workers with nothing of the server's but what it sends.

Runs in its own process (never in the server), started by ``Launcher`` with ``exec`` and an
explicit, minimal environment, so that neither ``os.environ`` nor ``/proc/self/environ`` of a
worker holds anything of the server's. It preloads numpy, pydantic and the worker module, and
the operator's ``preload_modules`` (``Settings``; trusted modules only), then serves one control
socket (``SOCK_SEQPACKET``, messages are pickled tuples):

    server -> launcher   ("spawn", token, WorkerConfig) with two fds: the worker's control
                         socket and the write end of its output pipe
    launcher -> server   ("ready", pid, failures) once (failures: [(module, error)] of the
                         preload modules that did not import), ("spawned", token, pid),
                         ("failed", token, why), ("exited", pid, code)   (code: exit status, or
                         -signal)

Preloaded modules are imported here, before any fork, so every worker starts with them imported
(its pages shared copy-on-write) and never imports them after its isolation is in force. The
isolation itself is untouched: each worker applies every layer after the fork (``_bootstrap``).

A forked worker keeps exactly four descriptors: stdin (``/dev/null``), stdout and stderr (its
output pipe, which the server reads and logs) and its control socket at fd 3. Every other fd
this process had (its own control socket, the wake-up pipe) is closed before the worker's code
runs, so a worker inherits no channel to the launcher or the server but its own.

When the control socket reaches EOF (the server exited, however it died) every worker is killed
and the launcher exits. Workers arm ``PR_SET_PDEATHSIG`` against this process, so a launcher
killed outright takes its workers with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import sys
import traceback
from typing import Any

# The worker's control socket is moved to this fd in the child.
WORKER_SOCKET_FD = 3
_MAX_MESSAGE = 64 * 1024


def _preload(modules: list[str]) -> list[tuple[str, str]]:
    """Import what every worker needs, then the operator's ``modules``; returns the latter's
    failures (a worker imports such a module on demand, as without preloading)."""
    # Imported once here, so that each worker starts warm (~ms, not the ~65 ms of a cold
    # interpreter with numpy) and never imports them after its isolation is in force.
    import numpy  # noqa: F401
    import pydantic  # noqa: F401

    from tensorline.server._preload import import_modules
    from tensorline.server.runtime.sandbox import _bootstrap  # noqa: F401

    return import_modules(modules)


def _send(ctl: socket.socket, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        ctl.send(pickle.dumps(message))


def _child(ctl: socket.socket, wake_r: int, wake_w: int, config: Any, sock_fd: int,
           out_fd: int, launcher_pid: int) -> None:
    """In the forked worker: keep only stdin, the output pipe and the control socket."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Detached, so that no Python object can later close an fd number a node has reused.
    ctl.detach()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if sock_fd != WORKER_SOCKET_FD:
        os.dup2(sock_fd, WORKER_SOCKET_FD)
    os.closerange(WORKER_SOCKET_FD + 1, os.sysconf("SC_OPEN_MAX"))
    del wake_r, wake_w  # closed by closerange
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from tensorline.server.runtime.sandbox._bootstrap import worker_main

    worker_main(config, socket.socket(fileno=WORKER_SOCKET_FD), launcher_pid)


def _reap(ctl: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(ctl, ("exited", pid, os.waitstatus_to_exitcode(status)))


def _spawn(ctl: socket.socket, wake_r: int, wake_w: int, message: tuple[Any, ...],
           fds: list[int], children: set[int]) -> None:
    _, token, config = message
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        _send(ctl, ("failed", token, f"expected 2 descriptors, got {len(fds)}"))
        return
    sock_fd, out_fd = fds
    launcher_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        _send(ctl, ("failed", token, f"fork failed: {exc}"))
        pid = -1
    if pid == 0:
        code = 1
        try:
            _child(ctl, wake_r, wake_w, config, sock_fd, out_fd, launcher_pid)
            code = 0
        except BaseException:
            # Goes to the worker's output pipe (fd 2 by now, else the launcher's stderr).
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(sock_fd)
    os.close(out_fd)
    if pid > 0:
        children.add(pid)
        _send(ctl, ("spawned", token, pid))


def _kill_all(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    children.clear()


def main(control_fd: int, preload: list[str] | None = None,
         cpus: list[int] | None = None) -> None:
    """Serve spawn requests until the server goes away; ``preload``: the operator's modules;
    ``cpus``: the server's CPUs (it may have been started from a thread bound to one)."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    ctl = socket.socket(fileno=control_fd)
    ctl.setblocking(True)
    # A session of our own: a terminal's Ctrl-C goes to the server, which then shuts the pool
    # down in order, not to the launcher and every worker at once.
    os.setsid()
    # Out of reach of the workers it forks, where they share its uid (``forbid_inspection``);
    # each worker is forked non-dumpable and stays so once its id maps are written.
    from tensorline.server.runtime.sandbox._isolation import forbid_inspection

    forbid_inspection()
    # The server's Ctrl-C or SIGTERM is for the server, which then closes our socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    failures = _preload(preload or [])
    children: set[int] = set()
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    _send(ctl, ("ready", os.getpid(), failures))
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap(ctl, children)
                continue
            try:
                data, ancdata, _, _ = ctl.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
            except InterruptedError:
                continue
            except OSError:
                data, ancdata = b"", []
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder)
                               for i in range(0, len(payload) - len(payload) % 4, 4))
            if not data:
                _kill_all(children)
                os._exit(0)
            message = pickle.loads(data)  # from the server, which started us
            if message[0] == "spawn":
                _spawn(ctl, wake_r, wake_w, message, fds, children)
            else:
                for extra in fds:
                    os.close(extra)
        _reap(ctl, children)
