"""Hostile node code for the sandbox escape suite (tests/server/test_sandbox_escape.py): each
function tries one thing a hostile node would and lets every exception out, so a blocked attempt
reaches the client as the status the sandbox gives it. The "look" attacks (``environ``, ``fds``,
``listdir``) return what they saw instead, and the test checks that nothing of the server's is
in it. ``hostile`` (an untrusted module) and ``hostile_trusted`` (trusted code the manifest sends
to the sandbox) define the nodes that run them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import mmap
import os
import resource
import signal
import socket
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from tensorline.client import Json, Tagged
from tensorline.server.nodes import NodeParams


class Attacker(Protocol):
    @property
    def params(self) -> AttackParams: ...


class AttackParams(NodeParams):
    what: str
    path: str = Field("", description="a file or directory to read or list")
    count: int = Field(0, description="how many (threads, GiB, files)")
    pid: int = Field(0, description="a process of the server's uid to slow down")


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(65536).decode("utf-8", "replace")


def _try_read(path: str) -> str:
    try:
        return _read(path)
    except OSError as exc:
        return f"refused: {exc}"


def _parent_of(pid: int) -> int:
    try:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def environ(node: Attacker) -> Any:
    """Every way to the server's environment a worker might have."""
    launcher = os.getppid()
    server = _parent_of(launcher)
    found: dict[str, Any] = {"os.environ": dict(os.environ)}
    for name in ("self", "thread-self"):
        found[f"/proc/{name}/environ"] = _try_read(f"/proc/{name}/environ")
    for label, pid in (("launcher", launcher), ("server", server), ("init", 1)):
        found[f"{label} environ"] = _try_read(f"/proc/{pid}/environ")
        found[f"{label} task environ"] = _try_read(f"/proc/{pid}/task/{pid}/environ")
        found[f"{label} cmdline"] = _try_read(f"/proc/{pid}/cmdline")
    found["server pid"] = str(server)
    return Json(found)


def read(node: Attacker) -> Any:
    return _read(node.params.path)


def listdir(node: Attacker) -> Any:
    return Json(sorted(os.listdir(node.params.path)))


def fds(node: Attacker) -> Any:
    """The descriptors the worker holds (the listing's own fd aside)."""
    entries = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            entries[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return Json(entries)


def write_fds(node: Attacker) -> Any:
    """A line to every descriptor a worker might have inherited (the server's resource
    tracker, its forkserver's "alive" pipe, its log): how many writes went through."""
    written = 0
    for fd in range(4, 1024):
        try:
            os.write(fd, b"tensorline-escape\n")
            written += 1
        except OSError:
            continue
    return written


def forge_log(node: Attacker) -> Any:
    """A forged server log line on stdout and stderr, then an attempt to truncate both."""
    forged = "2026-12-06 10:00:00,000 INFO tensorline.server.service._server [-] FORGED-LINE"
    print(forged, flush=True)
    os.write(2, (forged + "\r\n").encode())
    for fd in (1, 2):
        os.ftruncate(fd, 0)  # a pipe: EINVAL, which the client sees
    return "truncated"


def flood_output(node: Attacker) -> Any:
    """``count`` lines on stdout, as fast as it can: the server's log must not take them all."""
    for index in range(node.params.count):
        print(f"FLOOD-LINE {index}")
    return "flooded"


def garbage_on_control_socket(node: Attacker) -> Any:
    os.write(3, b"\x00garbage that is not a framed message")
    return "sent"


def mmap_shared(node: Attacker) -> Any:
    size = node.params.count << 30
    region = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 1
    return "mapped"


def memfds(node: Attacker) -> Any:
    held = []
    for _ in range(node.params.count):
        fd = os.memfd_create("hoard")
        os.ftruncate(fd, 512 << 20)
        os.write(fd, b"x" * (1 << 20))
        held.append(fd)
    return len(held)


def sysv_shm(node: Attacker) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(0, ctypes.c_size_t(1 << 30), 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if shmid < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return shmid


def sysv_semaphores(node: Attacker) -> Any:
    """A SysV semaphore set: an object of the IPC namespace, outside any memory cap."""
    libc = ctypes.CDLL(None, use_errno=True)
    semid = libc.semget(0, 1, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
    if semid < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    libc.semctl(semid, 0, 0)  # IPC_RMID
    return semid


def private_memory(node: Attacker) -> Any:
    return len(bytearray(node.params.count << 30))


def dev_shm(node: Attacker) -> Any:
    with open("/dev/shm/tensorline-escape", "wb") as f:
        f.write(b"x")
    return "wrote /dev/shm"


def fill_scratch(node: Attacker) -> Any:
    """``count`` files of 1000 MiB each in the scratch dir."""
    for index in range(node.params.count):
        fd = os.open(f"fill-{index}", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, 1000 << 20)
        finally:
            os.close(fd)
    return "filled"


def fill_scratch_small_files(node: Attacker) -> Any:
    """The quota as a whole, not per file: many files under the per-file limit."""
    chunk = b"x" * (1 << 20)
    for index in range(node.params.count):
        with open(f"small-{index}", "wb") as f:
            for _ in range(64):
                f.write(chunk)
    return "filled"


def threads(node: Attacker) -> Any:
    stop = threading.Event()
    started: list[threading.Thread] = []
    try:
        for _ in range(node.params.count):
            thread = threading.Thread(target=stop.wait)
            thread.start()
            started.append(thread)
    finally:
        stop.set()
        for thread in started:
            thread.join()
    return len(started)


def small_stack_threads(node: Attacker) -> Any:
    """``threads`` with 64 KiB stacks: thousands fit in the address-space cap, and each is a
    task of the uid (a pid, kernel memory), shared with the server where it is not root."""
    previous = threading.stack_size(64 * 1024)
    try:
        return threads(node)
    finally:
        threading.stack_size(previous)


_LEAKED: list[int] = []


def leak_fds(node: Attacker) -> Any:
    """Open descriptors until none is left and keep them: the worker is poisoned for any later
    call unless the server replaces it."""
    try:
        while True:
            _LEAKED.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    if node.params.count:
        os.close(_LEAKED.pop(0))  # a hole, so a probe of the lowest free fd looks fine
    return Json({"leaked": len(_LEAKED)})


def leak_fds_blinded(node: Attacker) -> Any:
    """``leak_fds``, after pointing every descriptor of a ``/proc/<pid>/fd`` directory (what
    the worker counts its descriptors through) at /dev/null: the count must not be fooled."""
    null = os.open("/dev/null", os.O_RDONLY)
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/proc/") and target.endswith("/fd"):
            os.dup2(null, int(name))
    os.close(null)
    return leak_fds(node)


def realtime(node: Attacker) -> Any:
    """Take a CPU from the server: real-time scheduling (SCHED_FIFO, then SCHED_RR), or at
    least a nice value below the server's. Each must fail (the first refusal is raised)."""
    gained: list[str] = []
    refused: list[PermissionError] = []
    for policy in (os.SCHED_FIFO, os.SCHED_RR):
        try:
            os.sched_setscheduler(0, policy, os.sched_param(1))
            gained.append(f"policy {policy}")
        except PermissionError as exc:
            refused.append(exc)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - 1)
        gained.append("nice")
    except PermissionError as exc:
        refused.append(exc)
    if gained:
        return Json({"gained": gained})
    raise refused[0]


# Syscall numbers the os module has no wrapper for: name -> (x86-64, arm64).
_SYSCALLS = {"ioprio_set": (251, 30), "prctl": (157, 167)}


def _syscall(name: str, *args: int) -> int:
    """A raw syscall with 64-bit arguments (so that a test can fill the upper half of one the
    kernel reads as an int); OSError on failure."""
    numbers = _SYSCALLS[name]
    number = {"x86_64": numbers[0], "aarch64": numbers[1]}.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown syscall number here")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = int(libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a) for a in args)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _ioprio_set(which: int, who: int, ioprio: int) -> None:
    _syscall("ioprio_set", which, who, ioprio)


def _lease_on_a_file_of_the_uid() -> None:
    """A read lease on a file of this uid (a lease then stalls whoever opens it to write),
    released at once if it was granted."""
    fd = os.open(os.__file__, os.O_RDONLY)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, "not a file of this uid: the kernel refuses")
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def outlive_the_launcher(node: Attacker) -> Any:
    """Clear the parent-death signal (SIGKILL when the launcher dies), plainly and with the
    upper half of the option's register filled (the kernel reads an int); then read it."""
    set_pdeathsig, get_pdeathsig = 1, 2
    worked = []
    for name, option in (("plain", set_pdeathsig), ("upper half", (1 << 32) | set_pdeathsig)):
        try:
            _syscall("prctl", option, 0, 0, 0, 0)
            worked.append(name)
        except OSError:
            pass
    current = ctypes.c_int(-1)
    _syscall("prctl", get_pdeathsig, ctypes.addressof(current), 0, 0, 0)
    return Json({"worked": worked, "pdeathsig": current.value})


def slow_down_others(node: Attacker) -> Any:
    """Slow down another process of the server's uid (``pid``, the launcher and the server
    alike) without a signal: nice 19, the idle scheduling policy, one CPU, idle I/O priority
    (also with the upper half of ``which`` filled), 16 descriptors at most, an hour of CPU at
    most (the limit a worker may move, its own), a read lease on a file of the uid (stalling
    its writers); and every process
    of the uid or of the process group at once. Those wide ones ask for what
    a process usually has anyway (nice 0, best-effort I/O at level 4), so that a regression
    cannot disturb the machine running the test. What worked, and what was refused."""
    pid = node.params.pid
    best_effort = (2 << 13) | 4  # IOPRIO_CLASS_BE, level 4
    tries: dict[str, Callable[[], Any]] = {
        "nice": lambda: os.setpriority(os.PRIO_PROCESS, pid, 19),
        "nice process group": lambda: os.setpriority(os.PRIO_PGRP, 0, 0),
        "nice uid": lambda: os.setpriority(os.PRIO_USER, 0, 0),
        "idle policy": lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)),
        "param": lambda: os.sched_setparam(pid, os.sched_param(0)),
        "one CPU": lambda: os.sched_setaffinity(pid, {0}),
        # ioprio_set(which, who, ioprio): IOPRIO_WHO_PROCESS, _PGRP, _USER; class 3 is idle.
        "idle I/O": lambda: _ioprio_set(1, pid, 3 << 13),
        "I/O process group": lambda: _ioprio_set(2, 0, best_effort),
        "I/O uid": lambda: _ioprio_set(3, os.getuid(), best_effort),
        "fewer files": lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (16, 16)),
        "CPU limit": lambda: resource.prlimit(pid, resource.RLIMIT_CPU, (3600, 3600)),
        "upper half": lambda: _syscall("ioprio_set", (1 << 32) | 1, pid, 3 << 13),
        "lease": _lease_on_a_file_of_the_uid,
    }
    worked, refused = [], []
    for name, attempt in tries.items():
        try:
            attempt()
            worked.append(name)
        except OSError:
            refused.append(name)
    return Json({"worked": worked, "refused": refused})


def _ioctl_int(fd: int, request: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    arg = ctypes.c_int(value)
    if libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def sigio_signal(node: Attacker) -> Any:
    """Signal another process without kill(2): make it the owner of a descriptor with
    asynchronous I/O on, so that the kernel sends it SIGIO (whose default action is to
    terminate) when the descriptor is ready: a pipe by fcntl(F_SETOWN), then written to; the
    control socket by ioctl(FIOSETOWN), ready when the next request arrives. The kernel checks
    only the uids (any target at all for euid 0), and only Landlock's signal scope (Linux 6.12+)
    stands in the way. What worked, and what was refused."""
    pid = node.params.pid
    worked, refused = [], []
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, fcntl.F_SETOWN, pid)
        fcntl.fcntl(read_end, fcntl.F_SETFL, fcntl.fcntl(read_end, fcntl.F_GETFL) | os.O_ASYNC)
        os.write(write_end, b"x")
        worked.append("F_SETOWN")
    except OSError:
        refused.append("F_SETOWN")
    finally:
        os.close(read_end)
        os.close(write_end)
    for name, request in (("FIOSETOWN", 0x8901), ("SIOCSPGRP", 0x8902)):
        try:
            _ioctl_int(3, request, pid)  # fd 3: the worker's control socket
            _ioctl_int(3, termios.FIOASYNC, 1)
            worked.append(name)
        except OSError:
            refused.append(name)
    return Json({"worked": worked, "refused": refused})


def json_bomb(node: Attacker) -> Any:
    """A JSON value of ``count`` nested pairs that all share one child: ``count`` lists in the
    worker and in the message (pickle keeps the sharing), 2 ** ``count`` leaves once written
    out as JSON."""
    value: Any = [0]
    for _ in range(node.params.count):
        value = [value, value]
    return Json(value)


def json_bomb_raw(node: Attacker) -> Any:
    """``json_bomb``, after taking the worker's own JSON encoding out of its pickler (node code
    may rewrite anything in its process), so that the server gets the shared objects as they
    are and would have to expand them itself."""

    _unleash_the_pickler()
    return json_bomb(node)


def _unleash_the_pickler() -> None:
    """Make this worker's picklers send shared objects as shared (memo on, not fast mode) and
    ``Json`` as the object itself (its class allowed, its text encoding gone), as a node may:
    whatever the server gets then is the sandbox's problem, not the worker's own code's."""
    import gc

    from tensorline.server.runtime.sandbox import _shm

    # The table the worker's picklers hold (changed in place), and the allow-list its own
    # pickler checks the classes it names against.
    _shm._Pickler.dispatch_table.pop(Json, None)
    _shm.SafeUnpickler.ALLOWED = _shm.SafeUnpickler.ALLOWED | {(Json.__module__, "Json")}
    for found in gc.get_objects():
        if isinstance(found, _shm.WorkerPickler):
            found.fast = False
    def dumps(value: Any, header: bytes = b"", pickler: Any = _shm._Pickler) -> bytes:
        buffer = io.BytesIO()
        buffer.write(header)
        pickler(buffer, protocol=5).dump(value)
        return buffer.getvalue()

    _shm._dumps = dumps


def metadata_bomb_raw(node: Attacker) -> Any:
    """``metadata_bomb`` with the worker's pickler sending the one string once."""
    _unleash_the_pickler()
    return metadata_bomb(node)


def uninitialized_array(node: Attacker) -> Any:
    """Reply, on the control socket, with an output the server's unpickler would build as
    ``numpy.ndarray((65536,))``: memory the server never wrote, with whatever it held
    before (other calls' data), sent back to the caller."""
    from tensorline.server.runtime.sandbox import _shm

    body = (b"\x80\x02X\x02\x00\x00\x00ok}X\x03\x00\x00\x00out"
            b"cnumpy\nndarray\nJ\x00\x00\x01\x00\x85\x85\x81s"
            b"G\x00\x00\x00\x00\x00\x00\x00\x00\x87.")
    socket.socket(fileno=os.dup(3)).send(_shm._HEADER.pack(_shm.FLAG_DIRECT, 0, 0, 0) + body)
    return "sent"


def deep_key(node: Attacker) -> Any:
    """Reply ``("ok", {key: 1}, 0.0)`` whose key is ``count`` thousand nested 1-tuples: a
    pickle of as many bytes, through the worker's own reply path (spilled into its segment).
    Unpickling it hashes the key, which recurses in C once per level."""
    from tensorline.server.runtime.sandbox import _shm

    key = b")" + b"\x85" * (node.params.count * 1000)
    body = b"\x80\x04\x8c\x02ok}" + key + b"K\x01sG" + bytes(8) + b"\x87."
    honest = _shm._dumps

    def dumps(value: Any, header: bytes = b"", pickler: Any = _shm._Pickler) -> bytes:
        if type(value) is tuple and value[:1] == ("ok",):
            return header + body
        return honest(value, header, pickler)

    _shm._dumps = dumps
    return np.zeros(1 << 16)  # too large for a direct message: the reply goes through _dumps


def metadata_bomb(node: Attacker) -> Any:
    """A tensor tagged with ``count`` thousand metadata entries that all share one 1 MB string:
    a small message, gigabytes once the entries are written out one by one."""
    shared = "x" * 1_000_000
    return Tagged(np.zeros(1), {f"k{i}": shared for i in range(node.params.count * 1000)})


def port_bomb(node: Attacker) -> Any:
    """``count`` thousand outputs that all share one 1 MB string (the node declares one)."""
    shared = "x" * 1_000_000
    return {"out": "ok", **{f"p{i}": shared for i in range(node.params.count * 1000)}}


_HOARD: list[int] = []


def hoard_segments(node: Attacker) -> Any:
    """Ask the server for reply segments of 65 MiB, then each 1 MiB larger than the last one
    granted (the least the server takes), and keep every fd: each one could be filled with
    ``write()``, memory no rlimit counts while it is not mapped. How many segments, and how
    many bytes, it got."""
    from tensorline.server.runtime.sandbox import _shm
    from tensorline.server.runtime.sandbox._messages import granted_size, segment_message

    control = socket.socket(fileno=os.dup(3))
    outbox = _shm.Outbox(name="hoard")
    total = 0
    ask = 65 << 20
    for _ in range(node.params.count):
        message, fresh = _shm.pack(segment_message(ask), outbox)
        _shm.send(control, message, fresh)
        try:
            data, fds = _shm.recv_raw(control)
        except _shm.ProtocolError:  # out of descriptors: the fd did not fit
            break
        granted = granted_size(data)
        if granted is None:
            break
        _HOARD.extend(fds)
        total += os.fstat(fds[0]).st_size
        ask = granted + (1 << 20)
    # Replaced after this call: the server would kill this worker at its next honest request
    # for a segment (no larger than the grants it hoarded), failing a later attack of the suite.
    _shm.send(control, *_shm.pack(("unhealthy", "hoarded its segments"), outbox))
    return Json({"segments": len(_HOARD), "bytes": total})


def segment_requests(node: Attacker) -> Any:
    """For ``count`` ms, ask for a reply segment larger than the server ever grants, again and
    again, each refused: how many the server answered, and in how long. Each costs the
    server's event loop a read, a check and an answer."""
    from tensorline.server.runtime.sandbox import _shm
    from tensorline.server.runtime.sandbox._messages import segment_message

    control = socket.socket(fileno=os.dup(3))
    message, fresh = _shm.pack(segment_message(1 << 62), _shm.Outbox(name="ask"))
    answered = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < node.params.count / 1000:
        _shm.send(control, message, fresh)
        _, fds = _shm.recv_raw(control)
        for fd in fds:
            os.close(fd)
        answered += 1
    return Json({"answered": answered, "seconds": elapsed})


def events_after_reply(node: Attacker) -> Any:
    """Return at once, leaving a thread that sends stream events on the control socket, as
    fast as it can, once the worker is idle: nobody asked for them, and each costs the
    server's event loop a read and a check."""
    from tensorline.server.runtime.sandbox import _shm
    from tensorline.server.runtime.sandbox._messages import event_message

    control = socket.socket(fileno=os.dup(3))
    message, fresh = _shm.pack(event_message("progress", "x", 0.5), _shm.Outbox(name="chat"))

    def chatter() -> None:
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            while True:
                _shm.send(control, message, fresh)

    threading.Thread(target=chatter, daemon=True).start()
    return "started"


# i386 socket(AF_INET, SOCK_STREAM, 0) through ``int 0x80``, from x86-64 code: numbered 359 in
# that ABI, a number the x86-64 denylist does not know (rbx saved: the i386 ABI's first argument
# register is callee-saved in the x86-64 one).
_I386_SOCKET = bytes([0x53, 0xB8, 0x67, 0x01, 0, 0, 0xBB, 2, 0, 0, 0, 0xB9, 1, 0, 0, 0,
                      0x31, 0xD2, 0xCD, 0x80, 0x5B, 0xC3])


def foreign_abi(node: Attacker) -> Any:
    """Open a socket with a system call of the i386 ABI, which x86-64 processes may still make:
    a denylist written for x86-64 numbers would not see it."""
    if os.uname().machine != "x86_64":
        raise PermissionError("only x86-64 can make i386 system calls")
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(_I386_SOCKET)
    call = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    return int(call())


def claim_import_failures(node: Attacker) -> Any:
    """From now on, this worker answers every class it is asked to load with "cannot load":
    a trusted node the server then runs itself (the fallback) would run on the server's side
    with whatever input comes next, the worker's takeover complete."""
    from tensorline.server.runtime.sandbox import _worker, _worker_errors
    from tensorline.server.runtime.sandbox._messages import IMPORT

    def refuse(self: Any, module: str, qualname: str, params_json: str) -> Any:
        raise _worker_errors._LoadFailed(IMPORT, "ModuleNotFoundError",
                                         f"cannot load {module}.{qualname} in the worker")

    _worker._Worker._class_and_params = refuse  # type: ignore[method-assign]
    return "armed"


def peek_at_others(node: Attacker) -> Any:
    """Open every other process's memory for writing, and its environment, through /proc: the
    server's, the launcher's and other workers' where they share this worker's uid. Which
    opened, and which processes were tried."""
    me = os.getpid()
    tried: list[int] = []
    opened: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        tried.append(int(entry))
        for what, mode in (("mem", "r+b"), ("environ", "rb")):
            try:
                with open(f"/proc/{entry}/{what}", mode):
                    opened.append(f"/proc/{entry}/{what}")
            except OSError:
                pass
    return Json({"me": me, "tried": tried, "opened": opened})


def sleep(node: Attacker) -> Any:
    time.sleep(node.params.count)
    return "woke"


def _spin() -> None:
    while True:
        pass


def spin_beside_the_loop(node: Attacker) -> Any:
    """A quick call that leaves a thread spinning: where the worker was bound to the server's
    CPU, the thread is too (it inherits the binding), beside the server's event loop."""
    thread = threading.Thread(target=_spin, daemon=True)
    thread.start()
    return "spinning"


def spin_later(node: Attacker) -> Any:
    """``spin_beside_the_loop`` with the thread started after the reply, from a signal handler
    that runs while the worker waits for its next request."""
    def start(signum: int, frame: Any) -> None:
        threading.Thread(target=_spin, daemon=True).start()

    signal.signal(signal.SIGALRM, start)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    return "armed"


def fork(node: Attacker) -> Any:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


ATTACKS: dict[str, Callable[[Attacker], Any]] = {
    fn.__name__: fn for fn in (
        environ, read, listdir, fds, write_fds, forge_log, flood_output, garbage_on_control_socket,
        mmap_shared, memfds, sysv_shm, sysv_semaphores, private_memory, dev_shm, fill_scratch,
        fill_scratch_small_files, threads, small_stack_threads, leak_fds, leak_fds_blinded,
        realtime, slow_down_others, sigio_signal, outlive_the_launcher, json_bomb,
        json_bomb_raw, metadata_bomb, metadata_bomb_raw, port_bomb, uninitialized_array, deep_key,
        hoard_segments, segment_requests, events_after_reply, foreign_abi, peek_at_others,
        claim_import_failures, sleep, spin_beside_the_loop, spin_later, fork)
}
