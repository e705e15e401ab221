"""Worker uids that are unique on the host, not only within one server.

Each worker of a server running as root gets a uid of its own, so that file permissions, signals
and ``RLIMIT_NPROC`` (which Linux counts per uid, over the whole host) separate it from the
server and from every other worker. Numbering the uids per server is not enough: two servers on
one host (two test runs, two processes of a deployment sharing a node without user namespaces)
would hand the same uid to their first workers, which could then signal each other and would
share one thread budget, so that one worker's threads make another's start fail.

A uid is therefore leased: the server holds an exclusive ``flock`` on a file named after it in
a root-only directory for as long as its worker lives. The kernel drops the lock when the
descriptor is closed or the server dies, so a crashed server never leaves uids taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import tempfile

log = logging.getLogger(__name__)

# Workers get uids from this range when the server runs as root.
WORKER_UID_BASE = 1_900_000
WORKER_UID_COUNT = 65_536
# How many uids a lease tries past the one it would like before giving up (far more than the
# workers of every server one host runs).
MAX_PROBES = 4096


def _lock_directory() -> str | None:
    """A directory only this (root) process's user can write, for the lock files; None when
    none can be had safely (then uids are numbered per server, as a fallback)."""
    parent = "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(parent, "tensorline-worker-uids")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except OSError:
        return None
    # Another user's directory (or a symlink planted in /tmp) must not decide which uids are
    # free, nor receive our files.
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
            or info.st_mode & 0o077):
        log.warning("%s is not a private directory of this user: worker uids are numbered per "
                    "server, and two servers on this host may share them", path)
        return None
    return path


class UidLeases:
    """Leases of uids in ``[base, base + count)``."""

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._directory: str | None = None
        self._checked = False

    def acquire(self, wanted: int) -> tuple[int, int]:
        """A free uid, starting the search at ``base + wanted % count``, and the descriptor whose
        lock holds it (-1 when locking is unavailable: then it is the wanted uid as is)."""
        if not self._checked:
            self._directory = _lock_directory()
            self._checked = True
        first = self.base + wanted % self.count
        if self._directory is None:
            return first, -1
        for probe in range(min(MAX_PROBES, self.count)):
            uid = self.base + (wanted + probe) % self.count
            fd = os.open(os.path.join(self._directory, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return uid, fd
        raise RuntimeError(f"no free worker uid among {MAX_PROBES} tried from {first}: "
                           "other servers on this host hold them all")

    @staticmethod
    def release(fd: int) -> None:
        if fd >= 0:
            os.close(fd)
