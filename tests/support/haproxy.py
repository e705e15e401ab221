"""A real HAProxy (Debian's package) as an L7 gRPC load balancer in front of loopback backends.

    with HaproxyBalancer.start(["127.0.0.1:50001", "127.0.0.1:50002"], workdir=tmp_path) as lb:
        client = Client(lb.target)

The config is docker/haproxy.cfg, the sample for operators, with only the bind address and the
server lines changed (plus an admin socket, which the test reads server states from), so the
test exercises the settings operators deploy: HTTP/2 on both sides, round-robin per call, the
raw-HTTP/2 gRPC health check. HAProxy runs in the foreground (``-db``) with its log on stdout,
which goes to a file under ``workdir``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from tests.support.processes import (
    LOOPBACK,
    REPO_ROOT,
    ProcessStartError,
    free_port,
    port_open,
    wait_until,
)

SAMPLE_CONFIG = REPO_ROOT / "docker" / "haproxy.cfg"
HEALTH_PATH = b"/grpc.health.v1.Health/Check"
SERVING_MESSAGE = "00000000020801"  # gRPC frame header (length 2) + HealthCheckResponse SERVING

_SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server\s+\S+\s+\S+(?P<options>[^\n]*)$",
                          re.MULTILINE)
_BIND_LINE = re.compile(r"^(?P<indent>[ \t]*)bind\s+:50051\b", re.MULTILINE)


def haproxy_binary() -> str | None:
    """Path of the haproxy executable, or None."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None)


def grpc_health_check_bytes(authority: bytes = b"tensorline") -> bytes:
    """What docker/haproxy.cfg's ``tcp-check send-binary`` sends: one gRPC Health/Check call
    for the whole server ("") as raw HTTP/2 with prior knowledge.

    HAProxy's http-check cannot carry the gRPC frame header (five zero bytes for an empty
    message), so the check is written at the byte level; building it here keeps the sample's hex
    reviewable. :authority is required by gRPC servers (grpc-core resets the stream without it).
    """

    def literal(name_index: int, value: bytes) -> bytes:
        # HPACK literal without indexing, name from the static table (index < 15), no Huffman.
        assert name_index < 15 and len(value) < 127
        return bytes([name_index, len(value)]) + value

    def frame(kind: int, flags: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (
            (1 if kind in (0x0, 0x1) else 0).to_bytes(4, "big")) + payload

    content_type = b"application/grpc"
    header_block = (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + literal(4, HEALTH_PATH)  # :path
        + literal(1, authority)  # :authority
        # content-type is static index 31: a 4-bit prefix (15) plus 16 as the next byte.
        + b"\x0f\x10" + bytes([len(content_type)]) + content_type
        + b"\x00\x02te\x08trailers"  # new name: te is not in the static table
    )
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + frame(0x4, 0x0, b"")  # SETTINGS, defaults
            + frame(0x1, 0x4, header_block)  # HEADERS, END_HEADERS
            + frame(0x0, 0x1, b"\x00" * 5))  # DATA, END_STREAM: an empty HealthCheckRequest


def render_config(backends: Sequence[str], *, listen: str, admin_socket: Path,
                  sample: str | None = None) -> str:
    """docker/haproxy.cfg balancing over ``backends`` ("host:port" each), bound to ``listen``.

    Each backend becomes ``server replica-<i> <address>`` with the options of the sample's first
    server line (the shared ones are on ``default-server``)."""
    text = SAMPLE_CONFIG.read_text() if sample is None else sample
    servers = list(_SERVER_LINE.finditer(text))
    if not servers or not _BIND_LINE.search(text):
        raise ValueError("docker/haproxy.cfg: no 'bind :50051' or no server lines")
    indent, options = servers[0]["indent"], servers[0]["options"]
    lines = "\n".join(f"{indent}server replica-{i} {backend}{options}"
                      for i, backend in enumerate(backends))
    text = text[:servers[0].start()] + lines + text[servers[-1].end():]
    text = _BIND_LINE.sub(lambda m: f"{m['indent']}bind {listen}", text, count=1)
    return re.sub(r"^global\n", f"global\n    stats socket {admin_socket} mode 600 level admin\n",
                  text, count=1, flags=re.MULTILINE)


class HaproxyBalancer:
    """A running HAProxy. Use ``HaproxyBalancer.start(...)``; stop with ``stop()`` or ``with``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, prefix: Path,
                 backends: Sequence[str], host: str = LOOPBACK) -> None:
        self.proc = proc
        self.port = port
        self.host = host
        self.prefix = prefix
        self.backends = list(backends)

    @classmethod
    def start(cls, backends: Sequence[str], *, workdir: str | os.PathLike[str],
              ready_timeout: float = 20.0, attempts: int = 3) -> HaproxyBalancer:
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError("haproxy is not installed (apt-get install -y haproxy)")
        if not backends:
            raise ValueError("at least one backend is needed")
        last_error: Exception | None = None
        for _attempt in range(attempts):
            port = free_port()
            prefix = Path(workdir) / f"haproxy-{port}"
            prefix.mkdir(parents=True, exist_ok=True)
            conf = prefix / "haproxy.cfg"
            conf.write_text(render_config(backends, listen=f"{LOOPBACK}:{port}",
                                          admin_socket=prefix / "admin.sock"))
            check = subprocess.run([binary, "-c", "-q", "-f", str(conf)], capture_output=True,
                                   text=True, check=False)
            if check.returncode != 0:
                raise ProcessStartError(
                    f"haproxy rejected its config: {check.stdout}{check.stderr}\n{conf}")
            with (prefix / "haproxy.log").open("wb") as log:
                proc = subprocess.Popen([binary, "-db", "-f", str(conf)],
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            balancer = cls(proc, port, prefix, backends)
            try:
                balancer.wait_ready(timeout=ready_timeout)
            except ProcessStartError as error:  # port taken meanwhile: try another
                last_error = error
                balancer.stop()
                continue
            except BaseException:
                balancer.stop()
                raise
            return balancer
        raise ProcessStartError(f"haproxy did not start after {attempts} attempts: {last_error}")

    def wait_ready(self, *, timeout: float) -> None:
        """Block until HAProxy accepts connections and its health checks found every backend
        UP (servers start out UP before their first check; "UP" after a passed check is what
        ``server_states`` waits for); fail fast if it exits."""
        wait_until(lambda: port_open(self.host, self.port), timeout=timeout,
                   what=f"haproxy listening on {self.target}", abort=self._exited)
        self.wait_states({backend: "UP" for backend in self.backends}, timeout=timeout)

    def wait_states(self, wanted: dict[str, str], *, timeout: float) -> dict[str, str]:
        """Wait until each backend address in ``wanted`` has that state (UP, DOWN...)."""

        def reached() -> dict[str, str] | None:
            states = self.server_states()
            return states if all(states.get(b) == s for b, s in wanted.items()) else None

        return wait_until(reached, timeout=timeout, what=f"haproxy server states {wanted}",
                          abort=self._exited)

    def _admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.prefix / "admin.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            for _ in range(1000):  # bounded: the answer is a few KB, then HAProxy closes
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[str, str]:
        """Backend address -> status ("UP" only once a health check passed, "DOWN"...)."""
        try:
            csv = self._admin("show stat")
        except OSError:
            return {}
        header, *rows = csv.lstrip("# ").splitlines()
        columns = header.split(",")
        states: dict[str, str] = {}
        for row in rows:
            fields = dict(zip(columns, row.split(","), strict=False))
            if fields.get("pxname") == "tensorline" and fields.get("addr"):
                status = fields.get("status", "")
                # "UP" before any check has run is HAProxy's initial assumption, not a result.
                checked = fields.get("check_status", "") not in ("", "INI")
                states[fields["addr"]] = status if checked else f"{status} (unchecked)"
        return states

    def _exited(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        return f"haproxy exited with {code}: {self.log()[-2000:]}"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        try:
            return (self.prefix / "haproxy.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait_logged(self, request_ids: Iterable[str], *, timeout: float = 10.0) -> str:
        """Wait until the log has a line for every request id (HAProxy logs a request when it
        ends, which a client can see first) and return the log."""
        wanted = {f"rid={rid} " for rid in request_ids}

        def complete() -> str | None:
            text = self.log()
            return text if all(rid in text for rid in wanted) else None

        return wait_until(complete, timeout=timeout, what="haproxy log lines",
                          abort=self._exited)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL on timeout. A hard stop: the tests stop HAProxy after their calls
        ended, and a soft stop (SIGUSR1) would wait for clients' idle connections."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> HaproxyBalancer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
