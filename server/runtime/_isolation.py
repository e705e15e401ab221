"""Isolation layers a sandbox worker applies to itself, each only when the kernel allows it.

Runs inside the worker process (imports nothing gRPC). The order matters and is fixed by
``apply_all``:

1. rlimits (memory cap via RLIMIT_DATA, CPU, open files, file size, no core dumps);
2. user + network + IPC namespaces (must happen while the process has a single thread);
3. parent-death signal (after the namespace switch: changing credentials may clear it);
4. Landlock: reads below the system directories, writes only below the worker's scratch dir,
   no ``/dev/shm``, no other process's ``/proc`` entries; then (ctypes, which the ``landlock``
   binding lacks) TCP bind/connect denied and signals/abstract sockets scoped to the sandbox;
5. seccomp denylist, last, once the control socket is open (open fds keep working).

Each layer yields a ``LayerStatus``-shaped tuple ``(name, active, detail)``; a layer that cannot
be applied is reported, never fatal, so operators can see the protection they actually have.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import importlib
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LayerReport = tuple[str, bool, str]

# Imported here so that the forkserver preloads them: a worker never pays for the import, and
# never imports them after Landlock is in force. Either may be missing (no libseccomp, an old
# platform): the layer is then reported inactive.
def _optional(name: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # libseccomp missing raises RuntimeError, not ImportError
        return None, f"{type(exc).__name__}: {exc}"


_seccomp, _SECCOMP_ERROR = _optional("pyseccomp")
_landlock, _LANDLOCK_ERROR = _optional("landlock")

PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # Not ctypes.util.find_library: it runs ldconfig in a subprocess.
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    return _libc


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker resource limits (a worker is started for one memory cap)."""

    memory_mb: int
    cpu_seconds: float
    # Hard CPU limit over the worker's whole life: the soft limit is moved per call (see
    # ``set_call_cpu_budget``), the hard one cannot be raised again from inside the sandbox.
    cpu_seconds_lifetime: float
    nofile: int
    fsize_mb: int


def apply_rlimits(limits: Limits) -> LayerReport:
    done: list[str] = []
    failed: list[str] = []

    def setl(name: str, res: int, soft: int, hard: int) -> None:
        try:
            resource.setrlimit(res, (soft, hard))
            done.append(name)
        except (OSError, ValueError) as exc:
            failed.append(f"{name}: {exc}")

    data = limits.memory_mb * 1024 * 1024
    setl("DATA", resource.RLIMIT_DATA, data, data)
    used = cpu_used()
    hard_cpu = int(used + limits.cpu_seconds_lifetime) + 1
    setl("CPU", resource.RLIMIT_CPU, min(hard_cpu, int(used + limits.cpu_seconds) + 1), hard_cpu)
    setl("NOFILE", resource.RLIMIT_NOFILE, limits.nofile, limits.nofile)
    fsize = limits.fsize_mb * 1024 * 1024
    setl("FSIZE", resource.RLIMIT_FSIZE, fsize, fsize)
    setl("CORE", resource.RLIMIT_CORE, 0, 0)
    detail = (f"memory {limits.memory_mb} MiB (RLIMIT_DATA), CPU {limits.cpu_seconds:g} s per "
              f"call, {limits.nofile} files, file size {limits.fsize_mb} MiB, no core dumps")
    if failed:
        detail += "; failed: " + ", ".join(failed)
    return ("rlimits", not failed, detail)


def cpu_used() -> float:
    """CPU seconds this process used (all threads): ``CLOCK_PROCESS_CPUTIME_ID``, the clock
    RLIMIT_CPU is enforced against, and one cheap syscall (getrusage fills a whole struct). The
    reading is remembered for ``set_call_cpu_budget``."""
    global _last_cpu
    used = time.process_time()
    _last_cpu = (used, time.monotonic())  # one reference swap: any thread sees a matching pair
    return used


def cpu_used_recent() -> float:
    """``cpu_used()``, or its last reading when that is less than ``_RECENT_S`` old: for
    figures that tolerate that much staleness (what a reply reports, for the lifetime limit)."""
    used, at = _last_cpu
    if time.monotonic() - at < _RECENT_S:
        return used
    return cpu_used()


# The last cpu_used() reading and when (monotonic) it was taken.
_last_cpu: tuple[float, float] = (0.0, -1e9)
# A reading this recent stands in for a fresh one (see set_call_cpu_budget).
_RECENT_S = 0.01

_cpu_soft: list[int] = []


def set_call_cpu_budget(seconds: float) -> None:
    """Soft RLIMIT_CPU = CPU used so far + ``seconds`` (capped by the lifetime hard limit): the
    kernel sends SIGXCPU when one call burns more than its budget. The limit has a resolution of
    one second, so it is only rewritten when that second changes (saves two syscalls a call).

    A request usually arrives within ``_RECENT_S`` of the previous reply, whose CPU reading then
    serves here plus one second (more than all threads can burn in that time on 100 cores): a
    call never gets less than its budget, at most a second more, and one syscall is saved."""
    used, at = _last_cpu
    if time.monotonic() - at < _RECENT_S:
        used += 1.0
    else:
        used = cpu_used()
    soft = int(used + seconds) + 1
    if _cpu_soft and _cpu_soft[0] == soft:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    _cpu_soft[:] = [soft]


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def apply_namespaces() -> LayerReport:
    """A user namespace (needed to create the others unprivileged and to drop host-level
    capabilities) with fresh network and IPC namespaces: no interface but a down loopback."""
    threads = _thread_count()
    if threads != 1:
        return ("network namespace", False,
                f"not applied: the worker already has {threads} threads (unshare needs one)")
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC
    if libc().unshare(flags) != 0:
        err = ctypes.get_errno()
        return ("network namespace", False,
                f"unshare(user|net|ipc) refused: {errno.errorcode.get(err, err)} "
                f"({os.strerror(err)}); typical inside a default container profile")
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    except OSError as exc:
        return ("network namespace", True,
                f"user+net+ipc namespaces created; id maps not written ({exc})")
    return ("network namespace", True, "user+net+ipc namespaces: no network interfaces")


def apply_parent_death(parent_alive_fd: int, on_parent_death: Callable[[], None]) -> LayerReport:
    """SIGKILL when the forkserver (our parent, which exits with the server) dies, plus a thread
    that waits for EOF on a pipe whose write end only the server holds."""
    import threading

    ok = libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0

    def watch() -> None:
        try:
            while True:
                try:
                    if os.read(parent_alive_fd, 1) == b"":
                        break
                except InterruptedError:
                    continue
        except OSError:
            pass
        on_parent_death()

    threading.Thread(target=watch, name="tensorline-parent-watch", daemon=True).start()
    detail = "PR_SET_PDEATHSIG=SIGKILL + server pipe watch thread" if ok else (
        "PR_SET_PDEATHSIG refused; server pipe watch thread only")
    return ("parent death", True, detail)


# --- Landlock ---------------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0
_LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1
_LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_LANDLOCK_SCOPE_SIGNAL = 1 << 1


class _NetRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


def _readable_roots() -> list[str]:
    roots = []
    for name in sorted(os.listdir("/")):
        if name in ("proc", "dev"):
            continue
        roots.append(os.path.join("/", name))
    roots += [f"/proc/{os.getpid()}", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat"]
    roots += ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full"]
    return roots


def device_paths(patterns: Sequence[str]) -> list[str]:
    """The existing paths ``patterns`` (globs) match, sorted, each once."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def apply_landlock(scratch_dir: str, devices: Sequence[str] = ()) -> list[LayerReport]:
    """Writes only below ``scratch_dir``; ``devices`` (globs, e.g. ``Settings.sandbox_devices``)
    name device nodes the worker may also open read/write (a GPU node must, or sees no GPU)."""
    landlock = _landlock
    if landlock is None:
        return [("landlock", False, f"landlock binding unavailable: {_LANDLOCK_ERROR}")]
    try:
        abi = int(landlock.landlock_abi_version())
    except Exception as exc:
        return [("landlock", False, f"not supported by this kernel: {exc}")]
    fs = landlock.FSAccess
    read = fs.READ_FILE | fs.READ_DIR | fs.EXECUTE
    read_file = fs.READ_FILE | fs.EXECUTE
    try:
        ruleset = landlock.Ruleset()
        for path in _readable_roots():
            try:
                is_dir = os.path.isdir(path)
                rights = read if is_dir else read_file
                if path == "/dev/null":
                    rights = fs.READ_FILE | fs.WRITE_FILE
                ruleset.allow(path, rules=rights)
            except OSError:
                continue  # absent on this machine
        ruleset.allow(scratch_dir)
        granted = device_paths(devices)
        for path in granted:
            ruleset.allow(path, rules=fs.READ_FILE | fs.WRITE_FILE | (
                fs.READ_DIR if os.path.isdir(path) else 0))
        if granted and os.path.isdir("/proc/driver"):
            # Drivers publish their parameters there (CUDA reads /proc/driver/nvidia).
            ruleset.allow("/proc/driver", rules=read)
        ruleset.apply()
    except Exception as exc:
        return [("landlock", False, f"filesystem rules failed: {exc}")]
    allowed = f"devices read/write: {', '.join(granted)}" if granted else "no device nodes"
    reports: list[LayerReport] = [
        ("landlock", True, f"ABI {abi}: writes only below the worker's scratch dir; no "
                           f"/dev/shm, no other process's /proc; {allowed}")]
    reports.append(_landlock_net_and_scope(abi))
    return reports


def _landlock_net_and_scope(abi: int) -> LayerReport:
    if abi < 4:
        return ("landlock network", False, f"ABI {abi} < 4: TCP rules unsupported")
    attr = _NetRulesetAttr(0, _LANDLOCK_ACCESS_NET_BIND_TCP | _LANDLOCK_ACCESS_NET_CONNECT_TCP, 0)
    size = ctypes.sizeof(_NetRulesetAttr) if abi >= 6 else 16
    if abi >= 6:
        attr.scoped = _LANDLOCK_SCOPE_SIGNAL | _LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
    lib = libc()
    lib.syscall.restype = ctypes.c_long
    fd = lib.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                     ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        return ("landlock network", False, f"create_ruleset failed: {os.strerror(err)}")
    try:
        if lib.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            return ("landlock network", False, f"restrict_self failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    detail = "TCP bind/connect denied"
    if abi >= 6:
        detail += "; signals and abstract unix sockets scoped to the sandbox"
    return ("landlock network", True, detail)


# --- seccomp ----------------------------------------------------------------------------------

# Denied outright (EPERM): networking, exec, tracing, other processes' memory, io_uring,
# namespaces and mounts, bpf, kernel keyrings and modules, handle-based opens (a classic
# container escape), fd theft from other processes.
_DENY = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_send_signal",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at",
    "setrlimit", "tkill", "ioperm", "iopl",
)


def apply_seccomp() -> LayerReport:
    sc = _seccomp
    if sc is None:
        return ("seccomp", False, f"libseccomp binding unavailable: {_SECCOMP_ERROR}")
    pid = os.getpid()
    eperm = sc.ERRNO(errno.EPERM)
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        skipped = []
        for name in _DENY:
            try:
                f.add_rule(eperm, name)
            except (OSError, ValueError, RuntimeError):
                skipped.append(name)
        # Threads yes, processes no: clone without CLONE_THREAD is a fork.
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
        # clone3 hides its flags in memory seccomp cannot read: ENOSYS makes libc fall back to
        # clone, which the rule above checks.
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        # Signals only to ourselves.
        for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            f.add_rule(eperm, name, sc.Arg(0, sc.NE, pid))
        # Limits can be read, and only the CPU soft limit (moved per call) can be changed.
        f.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0), sc.Arg(1, sc.NE, resource.RLIMIT_CPU))
        f.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0), sc.Arg(0, sc.NE, 0))
        # The parent-death signal must stay set.
        f.add_rule(eperm, "prctl", sc.Arg(0, sc.EQ, PR_SET_PDEATHSIG))
        f.load()
    except Exception as exc:
        return ("seccomp", False, f"filter not loaded: {exc}")
    detail = ("denylist: sockets, exec, fork (threads allowed), ptrace, process_vm, io_uring, "
              "namespaces/mounts, bpf, keyrings, modules, signals to other processes, rlimit "
              "raises")
    if skipped:
        detail += f"; unknown here: {', '.join(skipped)}"
    return ("seccomp", True, detail)
