"""Isolation layers a sandbox worker applies to itself, each only when the kernel allows it.

Runs inside the worker process (imports nothing gRPC). The order matters and is fixed by
``worker_main``:

1. rlimits: memory (RLIMIT_DATA and RLIMIT_AS, which counts shared mappings too), CPU, open
   files, file size, threads (RLIMIT_NPROC, when the worker has a uid of its own), no POSIX
   message queues, no core dumps, no real-time or raised scheduling priority;
2. an unprivileged uid of the worker's own, when the server runs as root and the worker can
   still read what it needs (before the namespaces: the kernel checks the real uid);
3. user + network + IPC + mount namespaces (must happen while the process has a single thread),
   a size-limited tmpfs on the scratch dir (its disk quota), and the thread cap (RLIMIT_NPROC)
   again, now counted in the worker's own user namespace (so also under a shared uid);
4. every capability dropped, no_new_privs;
5. parent-death signal (after the credential changes, which clear it);
6. Landlock: reads only below an allow-list (system libraries, the Python installation, the node
   code), writes only below the worker's scratch dir, no ``/dev/shm``, no other process's
   ``/proc`` entries; then (ctypes, which the ``landlock`` binding lacks) TCP bind/connect
   denied and signals/abstract sockets scoped to the sandbox;
7. seccomp denylist, last, once the control socket is open (open fds keep working).

Each layer yields a ``LayerStatus``-shaped tuple ``(name, active, detail)``; a layer that cannot
be applied is reported, never fatal, so operators can see the protection they actually have
(and a policy can refuse untrusted nodes when one they require is missing).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import importlib
import os
import resource
import signal
import stat
import time
from collections.abc import Sequence
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
    # Threads (and processes) of the worker's uid: a cap only when the worker has a uid of its
    # own (RLIMIT_NPROC counts per real uid, system-wide).
    threads: int = 64
    # Size of the tmpfs mounted on the scratch dir (its total disk quota), MiB.
    scratch_mb: int = 512


# Address space a worker may add beyond what it has at start, on top of its memory cap: thread
# stacks and malloc arenas are reserved, not used, yet RLIMIT_AS counts them.
AS_SLACK_MB = 256


def _vm_size() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


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
    # RLIMIT_DATA misses shared mappings (MAP_SHARED, memfd, mapped files); RLIMIT_AS counts
    # every mapping. What a worker could create unmapped (memfds, SysV/POSIX IPC) is refused by
    # seccomp, and its scratch is a size-limited tmpfs.
    space = _vm_size() + data + AS_SLACK_MB * 1024 * 1024
    setl("AS", resource.RLIMIT_AS, space, space)
    setl("MSGQUEUE", resource.RLIMIT_MSGQUEUE, 0, 0)

    used = cpu_used()
    hard_cpu = int(used + limits.cpu_seconds_lifetime) + 1
    setl("CPU", resource.RLIMIT_CPU, min(hard_cpu, int(used + limits.cpu_seconds) + 1), hard_cpu)
    setl("NOFILE", resource.RLIMIT_NOFILE, limits.nofile, limits.nofile)
    fsize = limits.fsize_mb * 1024 * 1024
    setl("FSIZE", resource.RLIMIT_FSIZE, fsize, fsize)
    setl("CORE", resource.RLIMIT_CORE, 0, 0)
    # No real-time scheduling and no nice value below the one inherited, whatever limits the
    # server was given (hosts set up for audio often grant rtprio 95): a worker spinning under
    # SCHED_FIFO would starve the server's threads on its CPU, watchdog included. Without
    # CAP_SYS_NICE in the initial user namespace, these limits are all that allow either.
    setl("RTPRIO", resource.RLIMIT_RTPRIO, 0, 0)
    setl("NICE", resource.RLIMIT_NICE, 0, 0)
    detail = (f"memory {limits.memory_mb} MiB (RLIMIT_DATA, and RLIMIT_AS over every mapping), "
              f"CPU {limits.cpu_seconds:g} s per call, {limits.nofile} files, "
              f"file size {limits.fsize_mb} MiB, no core dumps, no real-time or raised "
              "scheduling priority")
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


_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def b(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    if libc().mount(b(source), b(target), b(fstype), flags, b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _scratch_options(scratch_mb: int, owner: int | None) -> str:
    options = f"size={scratch_mb}m,nr_inodes=65536,mode=0700"
    if owner is not None:
        options += f",uid={owner},gid={owner}"
    return options


def _blocked_ancestor(path: str) -> str | None:
    """The shallowest directory above ``path`` that other users cannot traverse."""
    parts = os.path.abspath(path).split("/")[1:-1]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            if not os.stat(current).st_mode & stat.S_IXOTH:
                return current
        except OSError:
            return None
    return None


def readable_by_others(path: str) -> bool:
    """Whether a process of another uid, without capabilities, can read ``path`` (a missing
    path counts as readable: there is nothing to lose there)."""
    try:
        info = os.stat(path)
    except OSError:
        return True
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(info.st_mode) else 0)
    return info.st_mode & need == need and _blocked_ancestor(path) is None


def private_mount_namespace(bridge: Sequence[str]) -> tuple[list[LayerReport], bool]:
    """As root, before giving root up: a mount namespace of the worker's own (its scratch tmpfs
    goes there, see ``mount_scratch``), in which the ``bridge`` paths stay reachable after a uid
    switch: a directory other users cannot traverse (``/root`` holding a pyenv Python, pytest's
    temp root above the scratch dir) is covered by an empty tmpfs into which only those paths
    are bind-mounted. Returns the reports and whether the namespace exists."""
    if libc().unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        return [("scratch quota", False, f"no mount namespace as root: {os.strerror(err)}")], False
    try:
        # Nothing mounted here may propagate back to the host.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    except OSError as exc:
        return [("scratch quota", False, str(exc))], False
    return _bridge(bridge), True


def mount_scratch(scratch_dir: str, scratch_mb: int, owner: int | None) -> LayerReport:
    """The scratch dir as a size-limited tmpfs (its disk quota), owned by ``owner``."""
    try:
        _mount("tmpfs", scratch_dir, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               _scratch_options(scratch_mb, owner))
    except OSError as exc:
        return ("scratch quota", False, str(exc))
    return ("scratch quota", True, f"scratch is a private {scratch_mb} MiB tmpfs (65536 files)")


def _bridge(paths: Sequence[str]) -> list[LayerReport]:
    """Cover each directory other users cannot traverse with an empty tmpfs and bind-mount
    back into it only ``paths`` (see ``private_mounts``)."""
    blocked: dict[str, list[str]] = {}
    for path in paths:
        ancestor = _blocked_ancestor(path)
        if ancestor is not None and os.path.exists(path):
            blocked.setdefault(ancestor, []).append(path)
    reports: list[LayerReport] = []
    for ancestor, below in blocked.items():
        try:
            # Opened before the tmpfs hides them; bound from these fds afterwards.
            fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in below]
            _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
            for path, fd in zip(below, fds, strict=True):
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(path, mode=0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    open(path, "a").close()
                _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
                os.close(fd)
        except OSError as exc:
            reports.append(("path bridging", False, f"{ancestor}: {exc}"))
    return reports


def usable_uid(uid: int | None, read_paths: Sequence[str]) -> tuple[int | None, str]:
    """``uid`` when the worker could still read everything it needs as that uid (after any
    bridging), else None and why."""
    if uid is None:
        return None, ""
    unreadable = [path for path in read_paths if not readable_by_others(path)]
    if unreadable:
        return None, f"kept root: {unreadable[0]} is not readable by other users"
    return uid, ""


def switch_user(uid: int | None, threads: int, devices: Sequence[str] = (),
                why_not: str = "") -> LayerReport:
    """Give up root for the worker's own unprivileged uid (before the user namespace, so that
    file permissions, signals and RLIMIT_NPROC apply to a real uid of its own). It keeps the
    groups that own the granted device nodes (``/dev/dri/renderD*`` is ``root:render 0660``),
    and no other."""
    if uid is None:
        detail = f"runs as the server's uid {os.geteuid()}"
        if os.geteuid() == 0:
            detail += " (root: file permissions do not separate it; Landlock does)"
        if why_not:
            detail += f"; {why_not}"
        return ("unprivileged uid", os.geteuid() != 0, detail)
    groups = sorted({os.stat(path).st_gid for path in devices if os.path.exists(path)} - {0})
    try:
        os.setgroups(groups)
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        return ("unprivileged uid", False, f"could not switch to uid {uid}: {exc}")
    detail = f"uid {uid}, gid {uid}, " + (
        f"device groups {groups}" if groups else "no supplementary groups")
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (threads, threads))
        detail += f"; at most {threads} threads (RLIMIT_NPROC)"
    except (OSError, ValueError) as exc:
        detail += f"; thread cap failed: {exc}"
    return ("unprivileged uid", True, detail)


# Inside its user namespace a worker is this uid, not root.
NAMESPACE_UID = 1000


def apply_namespaces(scratch_dir: str, scratch_mb: int, *, mounted: bool,
                     thread_cap: int) -> list[LayerReport]:
    """User, network and IPC namespaces: no network interface but a down loopback, a private
    IPC space. Without ``mounted`` (``private_mounts`` could not run: not root) a mount
    namespace too, owned by the new user namespace, with the scratch tmpfs in it. And
    ``thread_cap`` tasks at most, counted in the new user namespace (see below)."""
    threads = _thread_count()
    quota = [] if mounted else [("scratch quota", False, "needs a mount namespace")]
    if threads != 1:
        return [("network namespace", False,
                 f"not applied: the worker already has {threads} threads (unshare needs one)"),
                *quota]
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | (0 if mounted else CLONE_NEWNS)
    if libc().unshare(flags) != 0:
        err = ctypes.get_errno()
        return [("network namespace", False,
                 f"unshare(user|net|ipc) refused: {errno.errorcode.get(err, err)} "
                 f"({os.strerror(err)}); typical inside a default container profile"), *quota]
    # The id maps belong to root while the process is not dumpable (a uid change, or the
    # launcher's own setting, inherited): dumpable again until ``drop_capabilities``, which
    # ends that. Only a process of the uid outside this new namespace could reach it meanwhile.
    libc().prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{NAMESPACE_UID} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{NAMESPACE_UID} {gid} 1")
    except OSError as exc:
        return [("network namespace", True,
                 f"user+net+ipc namespaces created; id maps not written ({exc})"), *quota]
    detail = "user+net+ipc namespaces: no network interfaces"
    # The kernel counts RLIMIT_NPROC per user namespace: set now, in the worker's own, it caps
    # the worker's threads alone, even where it shares the server's uid (a non-root server,
    # which otherwise leaves it bounded by nothing but the address-space cap: thousands of
    # small-stack threads, each a pid and kernel memory). Not before the unshare: the new
    # namespace would then cap every task of the uid, server included, at ``thread_cap``. (For
    # uid 0 the kernel enforces no RLIMIT_NPROC at all.)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (thread_cap, thread_cap))
        detail += f"; at most {thread_cap} threads (RLIMIT_NPROC, counted in the namespace)"
    except (OSError, ValueError) as exc:
        detail += f"; thread cap failed: {exc}"
    reports: list[LayerReport] = [("network namespace", True, detail)]
    if not mounted:
        try:
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
            _mount("tmpfs", scratch_dir, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
                   _scratch_options(scratch_mb, None))
            reports.append(("scratch quota", True,
                            f"scratch is a private {scratch_mb} MiB tmpfs (65536 files)"))
        except OSError as exc:
            reports.append(("scratch quota", False, str(exc)))
    return reports


# prctl options and the capability ABI (linux/prctl.h, linux/capability.h).
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> LayerReport:
    """No capabilities left in any set (in the worker's namespace or outside it), and
    no_new_privs: nothing the worker does can gain privileges again. And not dumpable
    (``forbid_inspection``): the id maps, the last /proc files it writes, are written."""
    lib = libc()
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    for cap in range(last + 1):
        lib.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: nothing to drop
    lib.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    capset = lib.capset(ctypes.byref(header), ctypes.byref(data)) == 0
    nnp = lib.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    hidden = forbid_inspection()
    effective = _status_field("CapEff")
    ok = capset and nnp and hidden and effective is not None and int(effective, 16) == 0
    return ("capabilities", ok,
            f"effective capabilities {effective}, bounding set dropped, no_new_privs "
            f"{'set' if nnp else 'NOT set'}, {'not ' if hidden else 'STILL '}dumpable")


def forbid_inspection() -> bool:
    """Make this process non-dumpable (True when that took): another process of its uid then
    needs ``CAP_SYS_PTRACE`` to open its ``/proc/<pid>/mem``, ``environ``, ``maps``, ``fd/``
    or ``root``. The server, the launcher and every worker do this. Without it, a worker that
    shares their uid and has neither a user namespace of its own nor Landlock (both up to the
    host) could write into the server's memory, or another trust domain's worker's. The
    price: no core dumps of these processes, and a debugger or ``py-spy`` needs root."""
    return bool(libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def _status_field(name: str) -> str | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def apply_parent_death(launcher_pid: int) -> LayerReport:
    """SIGKILL when the launcher (our parent, which kills its workers and exits when the server
    goes away) dies. Armed after the credential changes, which clear it."""
    ok = libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != launcher_pid:
        os._exit(70)  # the launcher died before the signal was armed
    return ("parent death", ok, "PR_SET_PDEATHSIG=SIGKILL against the launcher" if ok else
            "PR_SET_PDEATHSIG refused")


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


# System files every worker may read (besides the Python installation and the node code the
# server names): shared libraries and their cache, time zones, CPU facts, a few devices.
_SYSTEM_READ = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64",
                "/usr/local/lib", "/usr/share/zoneinfo", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/localtime", "/proc/cpuinfo", "/proc/meminfo",
                "/proc/stat", "/sys/devices/system/cpu", "/dev/null", "/dev/zero",
                "/dev/urandom", "/dev/random", "/dev/full")


def _readable_roots(read_paths: Sequence[str]) -> list[str]:
    return [*_SYSTEM_READ, f"/proc/{os.getpid()}", *read_paths]


def device_paths(patterns: Sequence[str]) -> list[str]:
    """The existing paths ``patterns`` (globs) match, sorted, each once."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def apply_landlock(scratch_dir: str, devices: Sequence[str] = (), read_paths: Sequence[str] = (),
                   list_paths: Sequence[str] = (),
                   model_paths: Sequence[str] = ()) -> list[LayerReport]:
    """Reads only below an allow-list (system libraries, ``read_paths``: the Python installation
    and the node code; ``list_paths``: directories whose entries may be listed, not read;
    ``model_paths``: the model roots, readable but not executable),
    writes only below ``scratch_dir``; ``devices`` (globs, e.g. ``Settings.sandbox_devices``)
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
        for path in list_paths:
            with contextlib.suppress(OSError):  # absent on this machine
                if os.path.isdir(path):
                    ruleset.allow(path, rules=fs.READ_DIR)
        for path in _readable_roots(read_paths):
            try:
                is_dir = os.path.isdir(path)
                rights = read if is_dir else read_file
                if path == "/dev/null":
                    rights = fs.READ_FILE | fs.WRITE_FILE
                ruleset.allow(path, rules=rights)
            except OSError:
                continue  # absent on this machine
        for path in model_paths:
            # Model files are data: read them and list their directories, execute nothing.
            with contextlib.suppress(OSError):  # absent on this machine
                ruleset.allow(path, rules=fs.READ_FILE | (
                    fs.READ_DIR if os.path.isdir(path) else 0))
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
        ("landlock", True, f"ABI {abi}: reads only the Python installation, node code, "
                           f"system libraries and the model roots ({len(model_paths)}), "
                           f"writes only below the worker's scratch dir; "
                           f"no /dev/shm, no other process's /proc; {allowed}")]
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
    # Memory no rlimit counts while it is unmapped (the server hands out every shared segment
    # a worker needs), and a way to compare other processes' kernel objects.
    "memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "mq_open", "msgget",
    "process_madvise", "kcmp",
    # The rest of SysV IPC: objects of the IPC namespace (the host's or container's, where a
    # worker cannot have its own) that other processes of its uid may be using, or that it
    # could create until the namespace's limits are reached for everyone.
    "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl",
    # The rest of the mount and quota families above, the kernel log (readable by anyone
    # where dmesg_restrict is 0: other tenants' OOM kills, process names), and obsolete or
    # rarely used calls whose only use here would be the kernel's attack surface.
    "mount_setattr", "quotactl_fd", "syslog", "uselib", "lookup_dcookie", "sysfs", "ustat",
    "_sysctl", "modify_ldt", "nfsservctl",
)


# ioprio_set's ``which`` for one process (linux/ioprio.h); fcntl and ioctl commands that make
# another process the owner of a descriptor's signals (asm-generic/fcntl.h, sockios.h).
_IOPRIO_WHO_PROCESS = 1
_F_SETOWN_EX = 15
_FIOSETOWN = 0x8901
_SIOCSPGRP = 0x8902


def _int_arg(sc: Any, index: int, value: int) -> Any:
    """``argument == value`` for an ``int`` or ``unsigned int`` argument: seccomp sees the
    whole 64-bit register, the kernel only its lower half, so a denial on equality must ignore
    the upper half (a caller may fill it to slip past a plain comparison)."""
    return sc.Arg(index, sc.MASKED_EQ, 0xFFFFFFFF, value)


def apply_seccomp() -> LayerReport:
    sc = _seccomp
    if sc is None:
        return ("seccomp", False, f"libseccomp binding unavailable: {_SECCOMP_ERROR}")
    pid = os.getpid()
    eperm = sc.ERRNO(errno.EPERM)
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        # A call of another ABI (x86-64 code can still make i386 calls with ``int 0x80``,
        # numbered otherwise, which this list does not name) ends the whole process, not only
        # its thread (libseccomp's default): a worker whose main thread was gone would hold
        # its call until the deadline.
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
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
        # Scheduling, CPU placement, I/O priority and memory placement of the calling thread
        # or process only, named by 0: where workers share the server's uid (a non-root
        # server), the kernel would let one renice, idle, pin or I/O-starve the server, the
        # launcher and other trust domains' workers, none of which holds a capability the
        # worker lacks. (Seccomp cannot also allow the worker's own pid: this libseccomp takes
        # one comparison per argument, and a pid compared alone is a 64-bit register whose
        # upper half the kernel ignores.) A node that names itself by pid gets EPERM.
        for name in ("sched_setscheduler", "sched_setparam", "sched_setattr",
                     "sched_setaffinity", "migrate_pages", "move_pages"):
            f.add_rule(eperm, name, sc.Arg(0, sc.NE, 0))
        # setpriority(which, who, prio) and ioprio_set(which, who, ioprio): not a process
        # group or a whole uid (PRIO_PROCESS is 0, IOPRIO_WHO_PROCESS 1), only the caller.
        for name, one_process in (("setpriority", os.PRIO_PROCESS),
                                  ("ioprio_set", _IOPRIO_WHO_PROCESS)):
            f.add_rule(eperm, name, sc.Arg(0, sc.NE, one_process))
            f.add_rule(eperm, name, sc.Arg(1, sc.NE, 0))
        # Signals through I/O ownership: the owner of a descriptor with O_ASYNC gets SIGIO
        # (whose default action is to terminate), checked against uids only, and against
        # nothing at all for euid 0. Only Landlock's signal scope (Linux 6.12+) stops that
        # otherwise; a worker keeps the SIGIO of its own descriptors (the default owner).
        # And no lease: one on a file of the worker's uid it may read (a model, the node code,
        # a pipeline file of a non-root server) stalls whoever opens it for writing, for up to
        # lease-break-time (45 s by default).
        for name, commands in (("fcntl", (fcntl.F_SETOWN, _F_SETOWN_EX, fcntl.F_SETLEASE)),
                               ("ioctl", (_FIOSETOWN, _SIOCSPGRP))):
            for command in commands:
                f.add_rule(eperm, name, _int_arg(sc, 1, command))
        # Limits can be read, and only the CPU soft limit (moved per call) can be changed, and
        # only this process's: a non-root server's limits would be within reach otherwise.
        f.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0), sc.Arg(1, sc.NE, resource.RLIMIT_CPU))
        f.add_rule(eperm, "prlimit64", sc.Arg(2, sc.NE, 0), sc.Arg(0, sc.NE, 0))
        # The parent-death signal must stay set.
        f.add_rule(eperm, "prctl", _int_arg(sc, 0, PR_SET_PDEATHSIG))
        f.load()
    except Exception as exc:
        return ("seccomp", False, f"filter not loaded: {exc}")
    detail = ("denylist: sockets, exec, fork (threads allowed), ptrace, process_vm, io_uring, "
              "namespaces/mounts, bpf, keyrings, modules, signals to other processes, rlimit "
              "raises, memfd, SysV IPC and POSIX message queues, scheduling and I/O priority "
              "but the caller's")
    if skipped:
        detail += f"; unknown here: {', '.join(skipped)}"
    return ("seccomp", True, detail)
