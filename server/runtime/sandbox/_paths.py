"""What a sandbox worker may read, and whether it can run under a uid of its own.

Landlock lets a worker read only what it needs: the Python installation (prefixes and the
directories on ``sys.path``, where node code lives), the tensorline packages, system libraries
(``_isolation``) and operator-named extras. A ``sys.path`` directory that is a whole top-level
tree or a home directory (``/``, ``/root``, ``/home/alice``: what ``python -m`` from a home
directory puts there) is only listable, so that imports can look in it, but its files stay
closed: that is where secrets live.

A uid of the worker's own (file permissions and signals then separate it from the server and
from other workers, and RLIMIT_NPROC caps its threads) is possible only when the server runs as
root and every path the worker reads is readable by other users; a Python installed below
``/root`` (pyenv) is not, and the worker then keeps the server's uid, reported as such.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from collections.abc import Iterable, Sequence


def _broad(path: str) -> bool:
    """A whole top-level tree or a home directory: list it, never read it whole."""
    path = os.path.abspath(path)
    if path.count("/") <= 1:  # "/", "/root", "/home", "/tmp", ...
        return True
    home = os.path.expanduser("~")
    return path == home or os.path.dirname(path) == "/home"


def _package_dirs(names: Iterable[str]) -> list[str]:
    dirs: list[str] = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
    return dirs


def worker_paths(extra: Sequence[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(read, list_only)``: hierarchies a worker may read, directories it may only list."""
    read: list[str] = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    listed: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if not os.path.exists(path):
            continue  # e.g. the editable install's path hook: its packages are added below
        (listed if _broad(path) else read).append(path)
    read += _package_dirs(["tensorline.server", "tensorline.client", "tensorline.v1"])
    read += [os.path.abspath(p) for p in extra]
    return tuple(dict.fromkeys(read)), tuple(dict.fromkeys(listed))


def _readable_by_others(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return True  # absent: nothing to read there
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(info.st_mode) else 0)
    if info.st_mode & need != need:
        return False
    parent = os.path.dirname(path)
    while parent and parent != "/":
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(parent)
    return True


def separate_uids_possible(enabled: bool, read_paths: Sequence[str]) -> tuple[bool, str]:
    """Whether workers can get uids of their own, and why not when they cannot."""
    if not enabled:
        return False, "disabled by configuration"
    if os.geteuid() != 0:
        return False, ""  # the server is not root: its workers are not either
    for path in read_paths:
        if not _readable_by_others(path):
            return False, (f"{path} is not readable by other users (a worker of its own uid "
                           "could not load Python or the node code)")
    return True, ""
