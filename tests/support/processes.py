"""Real server processes for tests: ``tensorline serve`` as a subprocess on a free loopback port.

    with ServerProcess.start(env={"TENSORLINE_INSTANCE_ID": "a"}) as server:
        client = Client(server.target)
        ...
        code = server.terminate()  # SIGTERM, waits for the drain, returns the exit code

Readiness is the real condition: the process is alive and gRPC health on its port answers
SERVING (polled, no fixed sleeps). Output goes to a log file (never an undrained pipe), so a
chatty server can't block, and ``logs()`` reads it for assertions. Every process started here is
stopped again: on context exit, and at interpreter exit for ones a test forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

T = TypeVar("T")

_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()
# Log directories ``ServerProcess.start`` made itself (no ``log_dir`` given).
_temporary_log_dirs: list[Path] = []


class ProcessStartError(RuntimeError):
    """A process did not become ready; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it).

    The port can in principle be taken before the caller binds it; callers that start a process
    on it retry with a new port when the process fails to bind (see ``ServerProcess.start``).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    abort: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value, which is returned.

    ``abort`` is checked between polls; when it returns a message (e.g. "process exited") the
    wait fails at once with that message instead of running out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if abort is not None and (reason := abort()):
            raise ProcessStartError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:.1f} s")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def health_status(target: str, *, service: str = "", timeout: float = 1.0) -> str | None:
    """The gRPC health status name of ``target`` (e.g. "SERVING"), or None if unreachable."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def tensorline_command() -> list[str]:
    """The ``tensorline`` console script of the interpreter running the tests."""
    script = Path(sys.executable).parent / "tensorline"
    if script.exists():
        return [str(script)]
    found = shutil.which("tensorline")
    if found is None:
        raise FileNotFoundError("the tensorline console script is not installed (pip install .)")
    return [found]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """A ``tensorline serve`` subprocess on loopback. Use ``ServerProcess.start(...)``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path,
                 host: str = LOOPBACK) -> None:
        self.proc = proc
        self.port = port
        self.host = host
        self.log_path = log_path
        _live.add(self)

    # --- starting -------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
        name: str = "tensorline",
        ready_timeout: float = 60.0,
        attempts: int = 3,
        pythonpath_repo: bool = False,
        prefix: Sequence[str] = (),
    ) -> ServerProcess:
        """Start ``tensorline serve --host 127.0.0.1 --port P [args]`` and wait until SERVING.

        ``env`` adds to (and overrides) the current environment, e.g. ``TENSORLINE_INSTANCE_ID``.
        ``pythonpath_repo`` puts the repository root on PYTHONPATH so the server can import
        test-only node modules (``TENSORLINE_NODE_MODULES=tests.support.nodes``).
        ``prefix`` goes before the command (e.g. ``setpriv`` options the server runs under).
        A process that exits before it is ready (port taken meanwhile) is retried on a new port.
        """
        if log_dir is not None:
            log_root = Path(log_dir)
        else:
            # Kept until the test run ends (a failing test's message quotes its log), then
            # removed by _stop_leftovers.
            log_root = Path(tempfile.mkdtemp(prefix="tensorline-proc-"))
            _temporary_log_dirs.append(log_root)
        log_root.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if pythonpath_repo:
            parts = [str(REPO_ROOT), full_env.get("PYTHONPATH", "")]
            full_env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
        last_error: Exception | None = None
        for _attempt in range(attempts):
            port = free_port()
            log_path = log_root / f"{name}-{port}.log"
            command = [*prefix, *tensorline_command(), "serve", "--host", LOOPBACK, "--port", str(port),
                       *args]
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    command, env=full_env, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, cwd=log_root, start_new_session=True)
            server = cls(proc, port, log_path)
            try:
                server.wait_ready(timeout=ready_timeout)
            except ProcessStartError as error:
                # Exited early: most likely the port was taken between probe and bind.
                last_error = error
                server.kill()
                continue
            except BaseException:
                server.kill()
                raise
            return server
        raise ProcessStartError(
            f"{name} did not start after {attempts} attempt(s): {last_error}")

    def wait_ready(self, *, timeout: float = 60.0) -> None:
        """Block until gRPC health is SERVING; fail fast (with the log) if the process exits."""

        def exited() -> str | None:
            code = self.proc.poll()
            if code is None:
                return None
            return f"process exited with {code}; log:\n{_tail(self.log_path)}"

        try:
            wait_until(lambda: health_status(self.target) == "SERVING", timeout=timeout,
                       what=f"SERVING on {self.target}", abort=exited)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; log:\n{_tail(self.log_path)}") from None

    # --- using ----------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> str | None:
        return health_status(self.target)

    # --- stopping -------------------------------------------------------------------------------

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def terminate(self, *, timeout: float = 30.0) -> int:
        """SIGTERM (the graceful drain), wait for exit, SIGKILL on timeout. Returns the exit code
        (negative: killed by that signal)."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.target} did not exit within {timeout:.0f} s of SIGTERM; "
                               f"killed. log:\n{_tail(self.log_path)}") from None

    def kill(self) -> None:
        """SIGKILL the process group (the server and any workers it started) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        _live.discard(self)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.alive():
            with contextlib.suppress(TimeoutError):
                self.terminate(timeout=30.0)
        self.kill()


@contextlib.contextmanager
def running_servers(
    count: int,
    *,
    env: Mapping[str, str] | None = None,
    instance_prefix: str = "replica",
    log_dir: str | os.PathLike[str] | None = None,
    pythonpath_repo: bool = False,
    ready_timeout: float = 60.0,
) -> Iterator[list[ServerProcess]]:
    """Start ``count`` servers, each with ``TENSORLINE_INSTANCE_ID=<prefix>-<i>``; stop all."""
    servers: list[ServerProcess] = []
    try:
        for index in range(count):
            name = f"{instance_prefix}-{index}"
            servers.append(ServerProcess.start(
                env={**(env or {}), "TENSORLINE_INSTANCE_ID": name}, name=name, log_dir=log_dir,
                pythonpath_repo=pythonpath_repo, ready_timeout=ready_timeout))
        yield servers
    finally:
        for server in servers:
            server.__exit__(None, None, None)


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.kill()
    for path in _temporary_log_dirs:
        shutil.rmtree(path, ignore_errors=True)
