"""The sandbox escape suite: hostile node code against a real ``tensorline serve`` process.

Each attack runs as a node in a real worker, twice: from an untrusted module (its own trust
domain) and as trusted code sent to the sandbox by ``runtime_hint`` with fallback on (a call the
sandbox denied must never be retried in the server); and all of that twice again, against
workers under uids of their own and against workers that keep the server's uid
(``UID_MODES``). Every attack must be blocked with a status naming the node, or, for the ones
that look around, see nothing of the server's; after each, the server still serves a normal
sandboxed call and answers SERVING. A separate server shows that SIGTERM leaves no worker,
launcher, scratch dir or /dev/shm name behind.

An assertion that depends on a layer the host lacks (namespaces in a container, Landlock on an
old kernel) is skipped, naming the layer; GetServerInfo says which layers are active.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from tensorline.client import Client, TensorlineError
from tensorline.server.runtime.sandbox._messages import CHATTER_BURST, CHATTER_RATE
from tests.server.runtime.conftest import shm_segments
from tests.support import escape
from tests.support.escape import DOMAINS, TRUSTED, UNTRUSTED, WORKER_ENVIRONMENT, manifest
from tests.support.processes import ServerProcess, wait_until

SECRET = f"hunter2-{uuid.uuid4().hex}"


MODEL_BYTES = "model-bytes-under-the-root"


def server_env(scratch: Path, models: Path | None = None) -> dict[str, str]:
    env = {"TL_SECRET": SECRET, "TENSORLINE_SANDBOX_SCRATCH_DIR": str(scratch),
           "TENSORLINE_SANDBOX_WORKERS": "2", "TENSORLINE_SANDBOX_CPU_SECONDS": "10",
           "TENSORLINE_SANDBOX_MEMORY_MB": "1024", "TENSORLINE_NODE_MODULES": TRUSTED,
           "TENSORLINE_UNTRUSTED_MODULES": UNTRUSTED}
    if models is not None:
        env["TENSORLINE_MODEL_DIRS"] = str(models)
    return env


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's model root (TENSORLINE_MODEL_DIRS) holding one file, with a secret beside
    it, outside the root. Everything is readable by other users: only Landlock (or a worker's
    mount namespace) keeps the secret out of reach."""
    base = tmp_path_factory.mktemp("escape-models")
    root = base / "root"
    root.mkdir()
    (root / "model.bin").write_text(MODEL_BYTES)
    (base / "beside.bin").write_text(SECRET)
    for path, mode in ((base, 0o755), (root, 0o755), (root / "model.bin", 0o644),
                       (base / "beside.bin", 0o644)):
        path.chmod(mode)
    return root


# What a host set up for audio grants (limits.conf ``@audio - rtprio 95``, ``nice -19``): the
# server runs with these where this process may raise its own, so that only the worker's limits
# stand between a node and real-time priority (``test_no_realtime_or_raised_priority``).
PRIORITY_LIMITS = ((resource.RLIMIT_RTPRIO, 95), (resource.RLIMIT_NICE, 39))


@contextlib.contextmanager
def priority_limits_granted() -> Iterator[None]:
    """Raise this process's real-time and nice limits (inherited by what it starts meanwhile)
    as far as it may, and restore them afterwards."""
    saved = [(res, resource.getrlimit(res)) for res, _ in PRIORITY_LIMITS]
    for res, value in PRIORITY_LIMITS:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(res, (value, max(value, resource.getrlimit(res)[1])))
    try:
        yield
    finally:
        for res, limit in saved:
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(res, limit)


# The suite runs twice: against workers under uids of their own (what a root server gives
# them in production), and against workers that keep the server's uid (a non-root server's
# lot, and a root server's fallback when a worker could not read its code as another uid).
UID_MODES = {"own uid": {}, "server's uid": {"TENSORLINE_SANDBOX_SEPARATE_UIDS": "false"}}


@pytest.fixture(scope="module", params=list(UID_MODES))
def uid_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_root: Path,
           uid_mode: str) -> Iterator[tuple[ServerProcess, Client]]:
    """A server whose workers run in ``uid_mode``. For uids of their own, the server's working
    directory (its log's, and on the workers' ``sys.path``) must be readable by other users,
    which pytest's temporary directories are not."""
    scratch = tmp_path_factory.mktemp("escape-scratch")
    log_dir = Path(tempfile.mkdtemp(prefix="tensorline-escape-log-"))
    log_dir.chmod(0o755)
    try:
        with priority_limits_granted():
            server = ServerProcess.start(env={**server_env(scratch, model_root),
                                              **UID_MODES[uid_mode]},
                                         pythonpath_repo=True, log_dir=log_dir)
        with server, Client(server.target, timeout=60) as client:
            yield server, client
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def layers(served: tuple[ServerProcess, Client]) -> dict[str, bool]:
    return {layer.name: layer.active for layer in served[1].server_info().sandbox_layers}


def test_workers_run_in_the_uid_mode_asked_for(layers: dict[str, bool], uid_mode: str) -> None:
    """When the tests run as root (CI), "own uid" is the layer production has there, not the
    fallback that keeps the server's uid."""
    if os.geteuid() != 0:
        pytest.skip("the server is not root here: its workers share its uid")
    assert layers["unprivileged uid"] == (uid_mode == "own uid"), layers


def require(layers: dict[str, bool], *names: str) -> None:
    """Skip unless one of ``names`` is active here."""
    if not any(layers.get(name) for name in names):
        pytest.skip(f"none of the sandbox layers {names} is active on this host")


def still_serving(server: ServerProcess, client: Client) -> None:
    escape.sandboxed_call_works(client)
    assert server.health() == "SERVING"


def look(served: tuple[ServerProcess, Client], domain: str, what: str, **params: Any) -> Any:
    """An attack that returns what it saw."""
    server, client = served
    seen = escape.look(client, domain, what, **params)
    still_serving(server, client)
    return seen


def blocked(served: tuple[ServerProcess, Client], domain: str, what: str,
            *codes: grpc.StatusCode, **params: Any) -> TensorlineError:
    """An attack that must fail with one of ``codes``, naming the node, nothing of it run in
    the server."""
    server, client = served
    error = escape.refused(client, domain, what, codes, secret=SECRET, **params)
    still_serving(server, client)
    return error


# --- environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_environment_holds_nothing_of_the_servers(served: tuple[ServerProcess, Client],
                                                  domain: str) -> None:
    seen = look(served, domain, "environ").value
    assert SECRET not in json.dumps(seen)
    environ = seen["os.environ"]
    assert set(environ) <= WORKER_ENVIRONMENT, set(environ) - WORKER_ENVIRONMENT
    assert "TL_SECRET" not in seen["/proc/self/environ"]


# --- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "token"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


READS = ["/etc/shadow", "{secret}", "/proc/{server}/environ", "/proc/{server}/cmdline",
         "/proc/{server}/mem", "/proc/{server}/maps", "/proc/{server}/fd/0",
         "/proc/{server}/root/etc/shadow", "/proc/self/root/etc/shadow",
         "/proc/self/cwd/../../../../etc/shadow", "/proc/1/environ", "/root/.bash_history"]


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("template", READS)
def test_reads_outside_the_allow_list_are_refused(served: tuple[ServerProcess, Client],
                                                  layers: dict[str, bool], secret_file: Path,
                                                  domain: str, template: str) -> None:
    require(layers, "landlock", "unprivileged uid")
    path = template.format(secret=secret_file, server=served[0].pid)
    # Refused (Landlock, file permissions) or not there at all (a worker of its own uid sees
    # only what its mount namespace bridges below directories only root may enter).
    error = blocked(served, domain, "read", grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNKNOWN, path=path)
    if error.code == grpc.StatusCode.UNKNOWN:
        assert "FileNotFoundError" in error.message or "No such file" in error.message


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_model_root_is_readable_and_nothing_beside_it(served: tuple[ServerProcess, Client],
                                                          layers: dict[str, bool],
                                                          model_root: Path, domain: str) -> None:
    """The model roots are in every worker's read allow-list (model nodes load their files in
    the sandbox); a file beside a root, outside it, is not."""
    require(layers, "landlock")
    assert look(served, domain, "read", path=str(model_root / "model.bin")) == MODEL_BYTES
    for path in (model_root.parent / "beside.bin", f"{model_root}/../beside.bin"):
        error = blocked(served, domain, "read", grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNKNOWN, path=str(path))
        if error.code == grpc.StatusCode.UNKNOWN:
            assert "FileNotFoundError" in error.message or "No such file" in error.message


def test_another_workers_scratch_is_out_of_reach(served: tuple[ServerProcess, Client],
                                                 layers: dict[str, bool]) -> None:
    require(layers, "landlock", "unprivileged uid")
    server, client = served
    trusted = client.execute({"nodes": [{"id": "t", "node_type": "Scratch",
                                         "runtime_hint": "sandbox"}]})["t"].value
    scratch, pid = trusted["dir"], trusted["pid"]
    root = os.path.dirname(scratch)
    for what, path in (("listdir", root), ("listdir", scratch),
                       ("read", f"{scratch}/secret.txt"),
                       ("read", f"/proc/{pid}/root{scratch}/secret.txt"),
                       ("listdir", f"/proc/{pid}/root{scratch}")):
        try:
            seen = look(served, "untrusted", what, path=path)
        except TensorlineError as error:
            assert error.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNKNOWN)
            assert "'bad'" in error.message and "trusted-scratch-secret" not in error.message
            continue
        # A listing that succeeded shows this worker's own (bridged, empty) view, never the
        # trusted worker's file.
        assert "secret.txt" not in json.dumps(getattr(seen, "value", seen)), (what, path)
    still_serving(server, client)


# --- descriptors and the server's log --------------------------------------------------------


def _targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


def _one_object(target: str) -> bool:
    """A descriptor target that names one object: a pipe or socket (by inode) or a file;
    not a name every process has (/dev/null, an eventpoll) nor a data segment (memfd)."""
    if target.startswith(("pipe:[", "socket:[")):
        return True
    return target.startswith("/") and not target.startswith(("/dev/null", "/memfd:"))


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_descriptor_is_inherited(served: tuple[ServerProcess, Client], domain: str) -> None:
    """A worker holds stdin (/dev/null), its output pipe on 1 and 2, its control socket on 3,
    and what it opened itself: nothing it shares with the server or the launcher (no resource
    tracker, forkserver "alive" fd or log), data segments (memfds) aside."""
    server, _ = served
    seen = look(served, domain, "fds").value
    assert seen["0"] == "/dev/null"
    assert seen["1"].startswith("pipe:") and seen["1"] == seen["2"]
    assert seen["3"].startswith("socket:")
    launcher = next(p for p in psutil.Process(server.pid).children()
                    if "sandbox._zygote" in " ".join(p.cmdline()))
    theirs = _targets(server.pid) | _targets(launcher.pid)
    shared = {fd: target for fd, target in seen.items()
              if fd not in ("1", "2") and target in theirs and _one_object(target)}
    assert not shared, shared


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_server_log_cannot_be_forged_or_truncated(served: tuple[ServerProcess, Client],
                                                      domain: str) -> None:
    server, _ = served
    size_before = len(server.logs())
    # Writing the forged lines works (they are the worker's own output); ftruncate of a pipe
    # does not, and the node's error says so.
    blocked(served, domain, "forge_log", grpc.StatusCode.UNKNOWN)
    wait_until(lambda: "FORGED-LINE" in server.logs(), timeout=10.0,
               what="the worker's output to be logged")
    log = server.logs()
    assert len(log) >= size_before and "tensorline serving on port" in log
    forged = [line for line in log.splitlines() if "FORGED-LINE" in line]
    assert forged and all("sandbox worker" in line and "(node bad)" in line for line in forged)


def test_a_flood_of_output_is_rate_limited_in_the_log(served: tuple[ServerProcess, Client]) -> None:
    server, _ = served
    look(served, "untrusted", "flood_output", count=3000)
    wait_until(lambda: "output lines dropped" in server.logs(), timeout=10.0,
               what="the dropped lines to be counted in the log")
    logged = sum(1 for line in server.logs().splitlines() if "FLOOD-LINE" in line)
    # A burst of 200, then 50 a second: far fewer than the 3,000 printed.
    assert 0 < logged < 1000, logged


def test_garbage_on_the_control_socket_ends_only_that_worker(
        served: tuple[ServerProcess, Client]) -> None:
    blocked(served, "untrusted", "garbage_on_control_socket", grpc.StatusCode.ABORTED)


# --- resources -----------------------------------------------------------------------------


MEMORY = [("mmap_shared", 3, grpc.StatusCode.RESOURCE_EXHAUSTED, ("rlimits",)),
          ("private_memory", 3, grpc.StatusCode.RESOURCE_EXHAUSTED, ("rlimits",)),
          ("memfds", 6, grpc.StatusCode.PERMISSION_DENIED, ("seccomp",)),
          ("sysv_shm", 0, grpc.StatusCode.PERMISSION_DENIED, ("seccomp",)),
          ("dev_shm", 0, grpc.StatusCode.PERMISSION_DENIED, ("landlock",))]


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize(("what", "count", "code", "needs"), MEMORY)
def test_memory_beyond_the_cap_is_refused(served: tuple[ServerProcess, Client],
                                          layers: dict[str, bool], domain: str, what: str,
                                          count: int, code: grpc.StatusCode,
                                          needs: tuple[str, ...]) -> None:
    """Private, shared-anonymous, memfd, SysV and /dev/shm memory: 3 GiB against a 1 GiB cap."""
    require(layers, *needs)
    blocked(served, domain, what, code, count=count)


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("what", ["threads", "small_stack_threads"])
def test_threads_are_capped(served: tuple[ServerProcess, Client], layers: dict[str, bool],
                            domain: str, what: str, uid_mode: str) -> None:
    require(layers, "rlimits")
    if what == "small_stack_threads" and uid_mode != "own uid" and os.geteuid() == 0:
        pytest.skip("a worker that keeps root has no thread cap: the kernel enforces no "
                    "RLIMIT_NPROC for uid 0 (docs/security.md)")
    error = blocked(served, domain, what, grpc.StatusCode.RESOURCE_EXHAUSTED, count=2000)
    assert "thread" in error.message


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize(("what", "count"), [("fill_scratch", 4),
                                             ("fill_scratch_small_files", 16)])
def test_scratch_has_a_quota(served: tuple[ServerProcess, Client], layers: dict[str, bool],
                             domain: str, what: str, count: int) -> None:
    """4 x 1000 MiB (past the per-file limit) and 16 x 64 MiB (past the total quota)."""
    require(layers, "scratch quota")
    blocked(served, domain, what, grpc.StatusCode.RESOURCE_EXHAUSTED, count=count)


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_realtime_or_raised_priority(served: tuple[ServerProcess, Client],
                                        layers: dict[str, bool], domain: str) -> None:
    """SCHED_FIFO, SCHED_RR or a lower nice value, on a server that may use them itself."""
    require(layers, "rlimits")
    server, _ = served
    if psutil.Process(server.pid).rlimit(psutil.RLIMIT_RTPRIO)[0] == 0:
        pytest.skip("this process may not grant the server real-time priority, so a worker "
                    "could not have it either")
    blocked(served, domain, "realtime", grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("domain", DOMAINS)
def test_sysv_semaphores_are_refused(served: tuple[ServerProcess, Client],
                                     layers: dict[str, bool], domain: str) -> None:
    require(layers, "seccomp")
    blocked(served, domain, "sysv_semaphores", grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_parent_death_signal_stays_set(served: tuple[ServerProcess, Client],
                                           layers: dict[str, bool], domain: str) -> None:
    """Cleared plainly, or with the upper half of prctl's option filled."""
    require(layers, "seccomp")
    seen = look(served, domain, "outlive_the_launcher").value
    assert seen == {"worked": [], "pdeathsig": 9}, seen


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_json_value_that_expands_costs_only_its_worker(
        served: tuple[ServerProcess, Client], domain: str) -> None:
    """A JSON value of 40 nested pairs sharing one child (2**40 leaves once written out):
    written out by its own worker, until the node's timeout; and, with the worker's encoding
    taken out of its pickler by the node, refused by the server as it arrives (it would expand
    it on its event loop otherwise, and stop serving everyone)."""
    server, client = served
    with pytest.raises(TensorlineError) as caught:
        client.execute({"nodes": [{**manifest(domain, "json_bomb", count=40)["nodes"][0],
                                   "timeout_s": 1.0}]})
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    still_serving(server, client)
    error = blocked(served, domain, "json_bomb_raw", grpc.StatusCode.ABORTED, count=40)
    assert "used twice" in error.message, error.message


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_tag_map_that_expands_costs_only_its_worker(served: tuple[ServerProcess, Client],
                                                      domain: str) -> None:
    """A tensor tagged with 20,000 entries sharing one 1 MB string (20 GB written out): its
    worker runs out of memory writing it; sent shared, the server refuses it as it arrives."""
    blocked(served, domain, "metadata_bomb", grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED, count=20)
    error = blocked(served, domain, "metadata_bomb_raw", grpc.StatusCode.ABORTED, count=20)
    assert "used twice" in error.message, error.message


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_array_of_the_servers_unwritten_memory(served: tuple[ServerProcess, Client],
                                                   domain: str) -> None:
    """A reply that names ``numpy.ndarray`` to build an array of 65,536 floats the server
    never wrote (its earlier contents would go to the caller) is refused."""
    error = blocked(served, domain, "uninitialized_array", grpc.StatusCode.ABORTED)
    assert "forbidden object" in error.message and "ndarray" in error.message, error.message


@pytest.mark.parametrize("domain", DOMAINS)
def test_reply_segments_granted_add_up_to_less_than_twice_the_limit(
        served: tuple[ServerProcess, Client], domain: str) -> None:
    """A worker that asks for ever so slightly larger reply segments and keeps them all: the
    server at least doubles each grant, so a few segments of at most twice its message limit
    in all (not hundreds of up to the limit each)."""
    seen = look(served, domain, "hoard_segments", count=500).value
    limit = 2 * (256 << 20)  # twice the default message limit: the largest segment granted
    assert 0 < seen["segments"] <= 12 and seen["bytes"] <= 2 * limit, seen


@pytest.mark.parametrize("domain", DOMAINS)
def test_fork_is_refused(served: tuple[ServerProcess, Client], layers: dict[str, bool],
                         domain: str) -> None:
    require(layers, "seccomp")
    blocked(served, domain, "fork", grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_deeply_nested_reply_costs_only_its_worker(served: tuple[ServerProcess, Client],
                                                      domain: str) -> None:
    """A reply whose dict key is 400,000 nested tuples (a 400 KB pickle) is refused before
    it is unpickled: hashing it overflowed the server's stack, and the server died."""
    error = blocked(served, domain, "deep_key", grpc.StatusCode.ABORTED, count=400)
    assert "nested more than" in error.message, error.message


@pytest.mark.parametrize("domain", DOMAINS)
def test_system_calls_of_another_abi_end_the_worker(served: tuple[ServerProcess, Client],
                                                     layers: dict[str, bool], domain: str) -> None:
    """An i386 system call (``int 0x80``) from the x86-64 worker: seccomp ends the process
    (not only the calling thread, which would leave the call to its deadline)."""
    require(layers, "seccomp")
    error = blocked(served, domain, "foreign_abi", grpc.StatusCode.ABORTED)
    assert "SIGSYS" in error.message, error.message


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("hole", [0, 1])
@pytest.mark.parametrize("leak", ["leak_fds", "leak_fds_blinded"])
def test_a_worker_out_of_descriptors_is_replaced_before_the_next_call(
        served: tuple[ServerProcess, Client], domain: str, hole: int, leak: str) -> None:
    """The leaking call succeeds; the worker is recycled, so no later call of that domain fails
    with EMFILE (with a hole left, the lowest free fd looks fine; blinded, the descriptor the
    worker counts through no longer names its descriptor directory)."""
    leaked = look(served, domain, leak, count=hole).value["leaked"]
    assert leaked > 100
    for _ in range(6):  # each lists /proc/self/fd: it needs a free descriptor
        assert "3" in look(served, domain, "fds").value


# --- the server's state afterwards ---------------------------------------------------------


# A process of this uid with no capabilities, as the server and its launcher are when they run
# as a non-root user (the image): the kernel lets a process of the same uid change the
# scheduling of another only when it holds every capability that one has.
BYSTANDER = """
import ctypes, time
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none
assert ctypes.CDLL(None).capset(header, data) == 0
time.sleep(600)
"""


def scheduling_of(pid: int) -> tuple[Any, ...]:
    """What ``slow_down_others`` would change about a process."""
    process = psutil.Process(pid)
    return (process.nice(), os.sched_getscheduler(pid), process.cpu_affinity(),
            tuple(process.ionice()), process.rlimit(psutil.RLIMIT_NOFILE),
            process.rlimit(psutil.RLIMIT_CPU))


def test_other_processes_of_the_uid_cannot_be_slowed_down(tmp_path: Path) -> None:
    """Workers that share the server's uid (the non-root image, or separate uids off) may not
    renice, reschedule, pin, I/O-deprioritize or limit any other process of that uid: not one by pid
    (here a bystander standing in for the server and the launcher), nor its process group, nor
    the whole uid."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # The server binds its own threads to one CPU while the sandbox is quiet (``_placement``):
    # off here, so that any change to its CPUs would be the attack's.
    env = {**server_env(scratch), "TENSORLINE_SANDBOX_SEPARATE_UIDS": "false",
           "TENSORLINE_SANDBOX_CO_LOCATE": "false"}
    with subprocess.Popen([sys.executable, "-c", BYSTANDER]) as bystander, \
            ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        try:
            before = scheduling_of(bystander.pid), scheduling_of(server.pid)
            for domain in DOMAINS:
                seen = look((server, client), domain, "slow_down_others", pid=bystander.pid).value
                assert seen["worked"] == [], seen
                assert len(seen["refused"]) == 13, seen
            assert (scheduling_of(bystander.pid), scheduling_of(server.pid)) == before
        finally:
            bystander.kill()


def test_other_processes_cannot_be_signalled_through_sigio(tmp_path: Path) -> None:
    """The same workers (and without Landlock, as on kernels before 6.12, whose Landlock cannot
    scope signals) may not make another process the owner of a descriptor's SIGIO: the
    bystander survives the attack and the next call, which makes the control socket ready."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**server_env(scratch), "TENSORLINE_SANDBOX_SEPARATE_UIDS": "false",
           "TENSORLINE_SANDBOX_LANDLOCK": "false",
           "TENSORLINE_SANDBOX_REQUIRED_LAYERS": "rlimits,environment,descriptors,seccomp"}
    with subprocess.Popen([sys.executable, "-c", BYSTANDER]) as bystander, \
            ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        try:
            for domain in DOMAINS:
                seen = look((server, client), domain, "sigio_signal", pid=bystander.pid).value
                assert seen["worked"] == [], seen
                assert len(seen["refused"]) == 3, seen
                look((server, client), domain, "fds")  # a request on the same control socket
            assert bystander.poll() is None, "the bystander was signalled"
        finally:
            bystander.kill()


# --- the server's event loop ----------------------------------------------------------------

# A bound on what a worker gets the server to read beyond its replies in ``seconds``: the burst,
# the rate, and what its socket holds (unix datagram queues hold at most max_dgram_qlen, 512 by
# default). Unbounded, each of these floods had over ten times as many read.
def most_read(seconds: float) -> float:
    return CHATTER_BURST + CHATTER_RATE * seconds + 600


@pytest.mark.parametrize("domain", DOMAINS)
def test_segment_requests_are_answered_at_a_bounded_rate(
        served: tuple[ServerProcess, Client], domain: str) -> None:
    seen = look(served, domain, "segment_requests", count=1500).value
    assert 0 < seen["answered"] <= most_read(seen["seconds"]), seen


@pytest.mark.parametrize("domain", DOMAINS)
def test_events_from_an_idle_worker_end_it(served: tuple[ServerProcess, Client],
                                           domain: str) -> None:
    """Messages nobody asked for, sent after the reply: the worker is killed for them."""
    server = served[0]
    complaint = "broke the protocol: event outside a stream"
    before = server.log_path.read_text().count(complaint)
    assert look(served, domain, "events_after_reply") == "started"
    wait_until(lambda: server.log_path.read_text().count(complaint) > before, timeout=30,
               what="the chattering worker killed")
    still_serving(*served)


def test_events_in_a_stream_are_read_at_a_bounded_rate(
        served: tuple[ServerProcess, Client]) -> None:
    """Events are a stream's to send, as many as it likes: the server reads them at a bounded
    rate, and the reports of a node that sends more wait (here, the worker's whole loop)."""
    manifest = {"nodes": [{"id": "flood", "node_type": "EventFlood",
                           "params": {"what": "", "count": 1500}}]}
    with served[1].stream(manifest) as stream:
        stream.send("flood", np.zeros(1))
        first = next(iter(stream)).value.value
        stream.close()
    assert 0 < first["sent"] <= most_read(first["seconds"]), first
    still_serving(*served)


def test_stream_steps_out_of_turn_end_the_worker(served: tuple[ServerProcess, Client]) -> None:
    """A stream step is one message each way: an output sent while the server waits for the
    client's next chunk (which it dropped, one read each, as many as came) breaks the
    protocol."""
    server = served[0]
    complaint = "broke the protocol: 'out' out of turn"
    before = server.log_path.read_text().count(complaint)
    manifest = {"nodes": [{"id": "flood", "node_type": "EventFlood",
                           "params": {"what": "steps"}}]}
    with pytest.raises(TensorlineError) as caught, served[1].stream(manifest) as stream:
        stream.send("flood", np.zeros(1))
        wait_until(lambda: server.log_path.read_text().count(complaint) > before, timeout=30,
                   what="the worker killed")
        stream.send("flood", np.zeros(1))  # the session learns of it at its next step
        list(stream)
    assert "out of turn" in caught.value.message, caught.value.message
    still_serving(*served)


def test_an_untrusted_node_cannot_declare_itself_more_memory(
        served: tuple[ServerProcess, Client]) -> None:
    """It declares a terabyte (``traits.memory_mb``): its worker's cap stays the sandbox's."""
    blocked(served, "untrusted", "private_memory", grpc.StatusCode.RESOURCE_EXHAUSTED,
            count=3, node_type="GreedyAttack")


def test_an_untrusted_node_cannot_declare_itself_more_time(tmp_path: Path) -> None:
    """It declares a year per call (``traits.timeout_s``): the sandbox's limit still ends it."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**server_env(scratch), "TENSORLINE_SANDBOX_CALL_TIMEOUT_S": "1"}
    with ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        error = escape.refused(client, "untrusted", "sleep", [grpc.StatusCode.DEADLINE_EXCEEDED],
                               secret=SECRET, count=30, node_type="GreedyAttack")
        assert "timeout of 1 s" in error.message, error.message
        still_serving(server, client)


def test_an_untrusted_params_schema_that_fans_out_is_refused_in_bounded_time(
        served: tuple[ServerProcess, Client]) -> None:
    """2**40 evaluations for one field: the server held its event loop (health stopped
    answering) until its budget of steps per params object."""
    server, client = served
    with pytest.raises(TensorlineError) as caught:
        client.execute({"nodes": [{"id": "costly", "node_type": "CostlySchema",
                                   "params": {"x": 1}}]})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "'costly'" in caught.value.message and "steps" in caught.value.message
    still_serving(server, client)


def test_a_worker_cannot_send_a_trusted_node_back_to_the_server(tmp_path: Path) -> None:
    """A trusted node sent to the sandbox, with fallback on, falls back to the server only when
    the sandbox cannot load its class. A worker taken over by its inputs could claim that for
    the next node it is given (whose input would then run in the server), or a node could make
    its own worker claim it once loaded. Neither runs in the server: the first worker is not
    taken at its word (it ran node code; a fresh one loads the class and runs it), the second
    broke the protocol (it said it had loaded the class)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**server_env(scratch), "TENSORLINE_SANDBOX_WORKERS": "1",
           "TENSORLINE_SANDBOX_MAX_WORKERS": "1"}
    with ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        assert escape.look(client, "trusted", "claim_import_failures") == "armed"
        x = np.arange(4.0)
        result = client.execute({"nodes": [{"id": "s", "node_type": "Scale",
                                            "params": {"factor": 2.0},
                                            "runtime_hint": "sandbox"}]}, {"s": x})
        node = result.metrics.nodes[0]
        assert (node.runtime, node.fallback) == ("sandbox", ""), node
        np.testing.assert_array_equal(result["s"], 2 * x)
        with pytest.raises(TensorlineError) as caught:
            client.execute({"nodes": [{"id": "liar", "node_type": "ImportLiar",
                                       "runtime_hint": "sandbox"}]})
        assert caught.value.code == grpc.StatusCode.ABORTED, caught.value
        assert "control protocol" in caught.value.message, caught.value.message
        still_serving(server, client)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_no_process_of_the_uid_can_open_anothers_memory(tmp_path: Path) -> None:
    """Workers that share the server's uid, with neither user namespaces (a default container
    profile refuses them) nor Landlock (an older kernel): a capability-less server (as a
    non-root one is) stands in for the image's. No worker opens the memory or environment of
    the server, the launcher or another worker, though it tries every process there is."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**server_env(scratch), "TENSORLINE_SANDBOX_SEPARATE_UIDS": "false",
           "TENSORLINE_SANDBOX_LANDLOCK": "false", "TENSORLINE_SANDBOX_NAMESPACES": "false",
           "TENSORLINE_SANDBOX_REQUIRED_LAYERS": "rlimits,environment,descriptors,seccomp"}
    capless = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    with ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log",
                             prefix=capless) as server, \
            Client(server.target, timeout=60) as client:
        escape.sandboxed_call_works(client)
        for domain in DOMAINS:
            seen = look((server, client), domain, "peek_at_others").value
            sandbox = {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
            others = sandbox - {seen["me"]}
            assert len(others) >= 2, others  # the launcher and another worker at least
            assert {server.pid, *others} <= set(seen["tried"]), seen["tried"]
            assert seen["opened"] == [], seen["opened"]


def test_sigterm_leaves_no_worker_scratch_or_segment(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shm_before = shm_segments()
    with ServerProcess.start(env=server_env(scratch), pythonpath_repo=True,
                             log_dir=tmp_path / "log") as server:
        with Client(server.target, timeout=60) as client:
            client.execute({"nodes": [{"id": "t", "node_type": "Scratch",
                                       "runtime_hint": "sandbox"}]})
            client.execute(manifest("untrusted", "fds"))
            client.execute({"nodes": [{"id": "big", "node_type": "PassThrough",
                                       "runtime_hint": "sandbox"}]},
                           {"big": np.ones(4 << 20)})
        processes = psutil.Process(server.pid).children(recursive=True)
        assert len(processes) >= 3  # the launcher and its workers
        assert any(scratch.iterdir())
        assert server.terminate() == 0
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, alive
    assert not any(scratch.iterdir()), list(scratch.iterdir())
    assert shm_segments() - shm_before == set()


def test_untrusted_code_is_refused_without_a_required_layer(tmp_path: Path) -> None:
    """seccomp off while the policy requires it: the untrusted module is never imported, its
    nodes are refused with FAILED_PRECONDITION naming the layer, the server says so at startup,
    and trusted nodes still run in the sandbox."""
    env = {**server_env(tmp_path), "TENSORLINE_SANDBOX_SECCOMP": "false"}
    with ServerProcess.start(env=env, pythonpath_repo=True, log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        layers = {layer.name: layer.active for layer in client.server_info().sandbox_layers}
        assert layers["seccomp"] is False
        with pytest.raises(TensorlineError) as caught:
            client.execute(manifest("untrusted", "environ"))
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "seccomp" in caught.value.message and "'bad'" in caught.value.message
        assert "required sandbox layer(s) seccomp not active" in server.logs()
        still_serving(server, client)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding needs two CPUs or more")
@pytest.mark.parametrize("what", ["spin_beside_the_loop", "spin_later"])
def test_a_thread_left_spinning_on_the_loops_cpu_does_not_keep_the_loop_there(
        tmp_path: Path, what: str) -> None:
    """While the sandbox is quiet the server binds its threads and the worker of a short call
    to one CPU (``_placement``). A quick call of a hostile node that leaves a thread spinning
    there (started in the call, or later from a signal handler) must not keep the event loop
    on that CPU once the loop has work: it lets go while the thread still spins."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with ServerProcess.start(env=server_env(scratch), pythonpath_repo=True,
                             log_dir=tmp_path / "log") as server, \
            Client(server.target, timeout=60) as client:
        everywhere = os.sched_getaffinity(server.pid)

        def bound() -> bool:
            # Quick calls of the attack node, one at a time: its calls are short, and the
            # loop and the node's worker get bound.
            assert escape.look(client, "untrusted", "sleep", count=0) == "woke"
            return len(os.sched_getaffinity(server.pid)) == 1

        wait_until(bound, timeout=30, what="the server's loop bound to one CPU")
        escape.look(client, "untrusted", what)

        def spinning() -> list[int]:
            """Workers' threads other than their main thread, busy on a CPU."""
            return [thread.id for worker in psutil.Process(server.pid).children(recursive=True)
                    for thread in worker.threads() if thread.id != worker.pid
                    and psutil.Process(thread.id).status() == psutil.STATUS_RUNNING]

        wait_until(spinning, timeout=30, what="the hostile thread to spin")
        x = np.arange(1024, dtype=np.float32)
        work = {"nodes": [{"id": "p", "node_type": "PassThrough", "runtime_hint": "inprocess"}]}

        def let_go() -> bool:
            # In-process calls: the loop has work, and waits for the CPU it shares. A sandboxed
            # call of a trusted node too (another worker, bound as well): the sandbox is never
            # idle long enough for that alone to let go.
            for _ in range(20):
                np.testing.assert_array_equal(client.execute(work, {"p": x})["p"], x)
            escape.sandboxed_call_works(client)
            return os.sched_getaffinity(server.pid) == everywhere

        wait_until(let_go, timeout=30, what="the loop to leave the spinning thread's CPU")
        assert spinning(), "the loop let go only once the thread stopped"
        still_serving(server, client)
