"""Layering that import-linter (the contracts in pyproject.toml, run by .ci/test) cannot state:
no module imports a private (``_x``) module of another of tensorline's packages. Each package
(``tensorline.server``, ``tensorline.client``, ``tensorline.wire``, ``tensorline.v1``) offers a
curated public API; what sits behind it may change without notice to the others.

Within a package, subpackages are one concern each too: ``tensorline.server.service`` reaching
into ``tensorline.server.executor._engine`` counts as well (the owner of ``_engine`` is
``tensorline.server.executor``)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import tensorline.server
from tests.support.processes import REPO_ROOT

# Source directory -> the package it installs as (pyproject's package-dir).
PACKAGES = {
    REPO_ROOT / "server": "tensorline.server",
    REPO_ROOT / "client": "tensorline.client",
    REPO_ROOT / "protos" / "tensorline" / "wire": "tensorline.wire",
}


def modules() -> Iterator[tuple[str, Path]]:
    for root, package in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def imported(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """Every tensorline module ``path`` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def owner(private: str) -> str:
    """The package a private module belongs to: the path up to its first ``_x`` part."""
    parts = private.split(".")
    first = next(i for i, part in enumerate(parts) if part.startswith("_"))
    return ".".join(parts[:first])


def test_no_module_imports_another_packages_private_module() -> None:
    crossings = []
    for name, path in modules():
        for line, target in imported(path, name):
            if not target.startswith("tensorline.") or not any(
                    part.startswith("_") and not part.startswith("__")
                    for part in target.split(".")):
                continue
            home = owner(target)
            if not (name == home or name.startswith(home + ".")):
                crossings.append(f"{path.relative_to(REPO_ROOT)}:{line}: {target}")
    assert crossings == []


def test_only_the_cli_imports_the_server_and_only_its_top_level() -> None:
    """The client library never imports the server; its command line imports only the package
    ``tensorline.server`` (its top-level public names: the entry functions of server/_entry.py),
    no module of it. import-linter checks the second half too; the first it cannot state."""
    crossings = []
    for name, path in modules():
        if not name.startswith("tensorline.client"):
            continue
        in_cli = name == "tensorline.client.cli" or name.startswith("tensorline.client.cli.")
        for line, target in imported(path, name):
            if target != "tensorline.server" and not target.startswith("tensorline.server."):
                continue
            allowed = in_cli and (target == "tensorline.server" or _public_name_of_server(target))
            if not allowed:
                crossings.append(f"{path.relative_to(REPO_ROOT)}:{line}: {target}")
    assert crossings == []


def _public_name_of_server(target: str) -> bool:
    """``from tensorline.server import run_server`` yields ``tensorline.server.run_server``:
    a name the package exports, not one of its modules."""
    name = target.removeprefix("tensorline.server.")
    return "." not in name and name in tensorline.server.__all__


def test_the_server_source_never_names_the_client_package() -> None:
    """The server knows nothing of the client: not in an import (import-linter), nor in a
    string, a lazy import or a comment that would invite one (``grep -rn tensorline.client
    server/`` finds nothing)."""
    naming = [f"{path.relative_to(REPO_ROOT)}:{number}"
              for path in sorted((REPO_ROOT / "server").rglob("*.py"))
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if "tensorline.client" in line]
    assert naming == []
