"""Model files named in params: resolved against the server's model roots, never outside them.

A manifest comes from a remote client, so a node param naming a file (``ModelPath``) is a path
the client chose. The server resolves it when it validates the manifest: a relative path is
looked up below each model root in turn (the pipeline repository, then the operator's
``model_dirs``), an absolute one must lie below a root, ``..`` is refused outright, and the
file's real path (symlinks followed) must still be below a root, so a symlink in a model
directory cannot lead out of it. The validated params then hold that real, absolute path:
that is what the node opens, in-process or in a sandboxed worker (whose Landlock allow-list
holds the model roots, read-only), and what keys its warm instances.

The roots reach the validator as pydantic validation context (``model_roots_context``), given by
the manifest compiler. Params validated without that context (a sandbox worker rebuilding
params the server already checked, a test constructing them) accept only an absolute path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo

# The validation-context key holding the model roots (a tuple of directory paths).
MODEL_ROOTS = "tensorline.model_roots"
MAX_MODEL_PATH = 4096


class ModelFileChanged(OSError):
    """The model file's real path is no longer the one the server checked (a symlink was put
    in its way since): the node refuses to open it."""


def model_roots_context(roots: Iterable[str | os.PathLike[str]]) -> dict[str, Any]:
    """The validation context that lets ``ModelPath`` params resolve against ``roots``."""
    return {MODEL_ROOTS: tuple(os.fspath(root) for root in roots)}


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_model_path(path: str, roots: Iterable[str]) -> str:
    """The real absolute path of the model file ``path`` names below ``roots``; ValueError
    saying what is wrong otherwise. Messages never say where a root or a symlink is: they go
    to remote clients."""
    if "\x00" in path:
        raise ValueError("a model path cannot contain NUL")
    if ".." in PurePosixPath(path).parts:
        raise ValueError("'..' is not allowed in a model path")
    real_roots = [os.path.realpath(root) for root in roots]
    if not real_roots:
        raise ValueError("this server has no model roots (TENSORLINE_PIPELINES_DIR, "
                         "TENSORLINE_MODEL_DIRS), so it loads no model files")
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        real = os.path.realpath(candidate)
        if not any(_within(real, root) for root in real_roots):
            raise ValueError(f"model path {path!r} is outside the model roots")
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise ValueError(f"model path {path!r} cannot be read: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"model path {path!r} is not a regular file")
        return real
    if os.path.isabs(path) and not any(_within(os.path.abspath(path), r) for r in real_roots):
        raise ValueError(f"model path {path!r} is outside the model roots")
    raise ValueError(f"no model file {path!r} under the model roots")


def _check_model_path(value: str, info: ValidationInfo) -> str:
    context = info.context
    if isinstance(context, Mapping) and MODEL_ROOTS in context:
        return resolve_model_path(value, context[MODEL_ROOTS])
    # No roots given: the value is one the server resolved already (or trusted code's own).
    if not os.path.isabs(value) or ".." in PurePosixPath(value).parts or "\x00" in value:
        raise ValueError("outside a server's manifest validation a model path must be "
                         "absolute, without '..'")
    return value


def check_unchanged(path: str) -> str:
    """``path`` (a real path ``ModelPath`` produced) when it still is its own real path; the
    node calls this right before opening the file. ModelFileChanged otherwise."""
    if os.path.realpath(path) != path:
        raise ModelFileChanged(f"model file {path!r} changed since the manifest was validated "
                               "(a symlink now stands in its path)")
    return path


# A param naming a model file: see the module docstring.
ModelPath = Annotated[
    str,
    Field(min_length=1, max_length=MAX_MODEL_PATH,
          description="model file: relative to the server's model roots (the pipeline "
                      "repository, TENSORLINE_MODEL_DIRS), or absolute below one of them"),
    AfterValidator(_check_model_path),
]
