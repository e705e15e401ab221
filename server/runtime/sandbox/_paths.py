"""What a sandbox worker may read, and whether it can run under a uid of its own.

Landlock lets a worker read only what it needs: the Python installation (prefixes and the
directories on ``sys.path``, where node code lives), the tensorline packages, system libraries
(``_isolation``) and operator-named extras. A ``sys.path`` directory that is a whole top-level
tree or a home directory (``/``, ``/root``, ``/home/alice``: what ``python -m`` from a home
directory puts there) is only listable, so that imports can look in it, but its files stay
closed: that is where secrets live.

A worker of its own uid must still reach these paths: the worker bridges a directory others
cannot traverse (``/root`` holding a pyenv Python) in its own mount namespace
(``_isolation.private_mounts``).
"""

from __future__ import annotations

import importlib.util
import os
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
    read += _package_dirs(["tensorline.server", "tensorline.wire", "tensorline.v1"])
    read += [os.path.abspath(p) for p in extra]
    return tuple(dict.fromkeys(read)), tuple(dict.fromkeys(listed))
