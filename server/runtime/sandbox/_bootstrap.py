"""A sandbox worker's start: called by the launcher right after the fork, it applies the
worker's isolation layers in order (``_isolation``), reports them with ``ready`` and serves
requests (``_worker``) until the server goes away.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import traceback

from tensorline.server.runtime.sandbox import _isolation
from tensorline.server.runtime.sandbox._messages import ready_message
from tensorline.server.runtime.sandbox._worker import WorkerConfig, _Worker


def worker_main(config: WorkerConfig, sock: socket.socket, launcher_pid: int) -> None:
    """Entry point of a worker process, called by the launcher right after the fork."""
    sock.setblocking(True)
    # A write past RLIMIT_FSIZE fails with EFBIG rather than killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The launcher's environment is already minimal; HOME and TMPDIR point at the scratch dir.
    os.environ["HOME"] = os.environ["TMPDIR"] = config.scratch_dir
    tempfile.tempdir = config.scratch_dir
    reports: list[_isolation.LayerReport] = [
        ("process", True, "separate worker process, forked by the sandbox launcher"),
        ("environment", True, f"minimal: {', '.join(sorted(os.environ))}"),
        ("descriptors", True, "stdin /dev/null, stdout/stderr a pipe the server logs, the "
                              "control socket; nothing else inherited"),
    ]
    reports.append(_isolation.apply_rlimits(config.limits))
    limits = config.limits
    mounted = False
    if config.namespaces and os.geteuid() == 0:
        bridge = ([*config.read_paths, *config.model_paths, *config.devices, config.scratch_dir]
                  if config.uid else [])
        mount_reports, mounted = _isolation.private_mount_namespace(bridge)
        reports.extend(mount_reports)
    # Not the model roots: a model directory other users cannot read costs sandboxed model
    # nodes their model (a permission error naming the file), never every worker its own uid.
    uid, why_not = _isolation.usable_uid(config.uid, config.read_paths)
    if mounted:
        reports.append(_isolation.mount_scratch(config.scratch_dir, limits.scratch_mb, uid))
    elif uid is not None:
        os.chown(config.scratch_dir, uid, uid)
    reports.append(_isolation.switch_user(uid, limits.threads, config.devices, why_not))
    if config.namespaces:
        reports.extend(_isolation.apply_namespaces(config.scratch_dir, limits.scratch_mb,
                                                   mounted=mounted,
                                                   thread_cap=limits.threads))
    else:
        reports.append(("network namespace", False, "disabled by configuration"))
        reports.append(("scratch quota", False, "needs the namespaces (disabled)"))
    reports.append(_isolation.drop_capabilities())
    reports.append(_isolation.apply_parent_death(launcher_pid))
    # Relative paths resolve in the scratch dir (the launcher's cwd is "/").
    os.chdir(config.scratch_dir)
    worker = _Worker(config, sock)
    threading.Thread(target=worker.cancel_thread, name="tensorline-cancel", daemon=True).start()
    signal.signal(signal.SIGUSR1, worker.on_cancel_signal)
    if config.landlock:
        reports.extend(_isolation.apply_landlock(config.scratch_dir, config.devices,
                                                 config.read_paths, config.list_paths,
                                                 config.model_paths))
    else:
        reports.append(("landlock", False, "disabled by configuration"))
    if config.seccomp:
        reports.append(_isolation.apply_seccomp())
    else:
        reports.append(("seccomp", False, "disabled by configuration"))
    code = 0
    try:
        worker._reply(ready_message(reports, _isolation.cpu_used()))
        worker.run()
    except BaseException:
        # A bug in this module, not in a node (their exceptions are replies): say so in the
        # worker's output, which the server logs, and exit non-zero.
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
