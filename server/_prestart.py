"""Starting the sandbox launcher process early: before the server's own imports.

The launcher (``runtime.sandbox._launcher``/``_zygote``) is a Python process of its own that
imports numpy, pydantic, the node SDK and the operator's preload modules before it forks any
worker: most of a second of a cold start, spent after the server process has imported itself
(gRPC, the service, the executor...) when the sandbox runtime starts. ``tensorline serve`` and
``tensorline demo`` know the launcher's command line as soon as their settings are read, so they
call ``prestart`` then, and the two imports run on two cores at once; the sandbox runtime's
``Launcher`` then ``adopt``s that process instead of starting one, provided it was started
for the same environment, preload modules and import path (otherwise it is closed: a launcher
exits when its control socket closes). Nothing about the launcher changes: same command, same
minimal environment, same file descriptors.

This module imports nothing heavy (it is imported before the rest of the server), and lives in
``tensorline.server`` because the package's ``__init__`` imports nothing on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping

# What every worker's environment holds: one BLAS thread (the pool is the parallelism, and a
# process with threads cannot create a user namespace); few malloc arenas (each reserves 64 MiB
# of address space, which the RLIMIT_AS memory cap counts).
BASE_ENVIRONMENT = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "PYTHONDONTWRITEBYTECODE": "1",
}

BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
        "from tensorline.server.runtime.sandbox._zygote import main; "
        "main(int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))")

# The CPUs the server may run on, as it was started (before the sandbox's placement binds any
# of its threads to one, see ``runtime.sandbox._placement``): a launcher started while a thread
# is bound runs, and forks its workers, on all of them.
SERVER_CPUS = sorted(os.sched_getaffinity(0))

Launched = tuple["subprocess.Popen[bytes]", socket.socket]
_Key = tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]
_prestarted: tuple[_Key, subprocess.Popen[bytes], socket.socket] | None = None


def import_path() -> list[str]:
    """The server's ``sys.path`` with "" (the current directory) made absolute: the launcher
    runs in "/"."""
    return [entry or os.getcwd() for entry in sys.path]


def minimal_environment(passthrough: Iterable[str] = (),
                        source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's (and so every worker's) environment: the fixed base plus the variables
    the operator named, copied from ``source`` (the server's environment) when set there."""
    source = os.environ if source is None else source
    env = dict(BASE_ENVIRONMENT)
    for name in passthrough:
        if name in source:
            env[name] = source[name]
    return env


def spawn(env: Mapping[str, str], preload: list[str]) -> Launched:
    """Start a launcher process; returns it and our end of its control socket (non-blocking)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # subprocess (vfork + exec) rather than the event loop's own spawning, which may fork()
        # a process full of gRPC threads (uvloop does).
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOT, json.dumps(import_path()),
             str(theirs.fileno()), json.dumps(preload), json.dumps(SERVER_CPUS)],
            env=dict(env), pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, close_fds=True, cwd="/")
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return process, ours


def _key(env: Mapping[str, str], preload: Iterable[str]) -> _Key:
    return (tuple(sorted(env.items())), tuple(dict.fromkeys(preload)), tuple(import_path()))


def prestart(passthrough: Iterable[str], preload: Iterable[str]) -> None:
    """Start the launcher the sandbox runtime will ask for (see the module docstring)."""
    global _prestarted
    discard()
    env = minimal_environment(passthrough)
    modules = list(dict.fromkeys(preload))
    process, sock = spawn(env, modules)
    _prestarted = (_key(env, modules), process, sock)


def adopt(env: Mapping[str, str], preload: Iterable[str]) -> Launched | None:
    """The prestarted launcher, if it runs for exactly this environment, preload and import
    path; otherwise None (and a prestarted one is closed)."""
    global _prestarted
    if _prestarted is None:
        return None
    key, process, sock = _prestarted
    _prestarted = None
    if key == _key(env, preload) and process.poll() is None:
        return process, sock
    _close(process, sock)
    return None


def discard() -> None:
    """Close a prestarted launcher nobody adopted (it exits when its socket closes)."""
    global _prestarted
    if _prestarted is not None:
        _, process, sock = _prestarted
        _prestarted = None
        _close(process, sock)


def _close(process: subprocess.Popen[bytes], sock: socket.socket) -> None:
    sock.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5.0)
