"""``tensorline validate``: check a manifest against a node catalogue and report every problem.

The catalogue is the local one (built-ins, entry points, ``--node-module``), or with
``--server`` the catalogue of a running server, fetched with ListNodes. Either way the check is
the server's own compiler, run here through ``tensorline.server.check_manifest`` (which says how
a server's catalogue stands in for its classes): every problem at once, without running
anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tensorline.client._client import Client, load_manifest
from tensorline.client._exceptions import TensorlineError
from tensorline.client.cli._app import (
    CaOpt,
    CertOpt,
    KeyOpt,
    TlsOpt,
    TokenOpt,
    _connection,
    _fail,
    _print_violations,
    _report_error,
    _require_server,
    _setup_failure,
    app,
    console,
    errors,
)


@app.command()
def validate(
    manifest: Annotated[Path, typer.Argument(help="manifest file (.yaml/.yml/.json)")],
    node_module: Annotated[list[str] | None, typer.Option(
        "--node-module", help="extra node module to know (repeatable); importable from the "
                              "current directory, as with python -m")] = None,
    server: Annotated[str | None, typer.Option(
        "--server", "-s", help="check against this server's catalogue (host:port) instead of "
                               "the local one")] = None,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """Check a manifest against the local (or a server's) node catalogue; report every problem
    at once."""
    _require_server("validate")
    from tensorline.server import SetupError, check_manifest

    if server and node_module:
        raise _fail("--node-module and --server exclude each other: the server's catalogue "
                    "has the modules it was started with")
    try:
        data = load_manifest(manifest)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    against = f" against {server}" if server else ""
    try:
        if server:
            with Client(server, **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client:
                listing = client.catalogue()
            check = check_manifest(data, catalogue=listing)
        else:
            check = check_manifest(data, node_modules=node_module or (), modules_dir=os.getcwd())
    except TensorlineError as exc:
        raise _report_error(exc, server or "") from None
    except SetupError as exc:
        raise _setup_failure(exc) from None
    if check.violations:
        errors.print(f"[red]{escape(str(manifest))}: {len(check.violations)} problem(s)"
                     f"{escape(against)}[/red]", soft_wrap=True)
        _print_violations(check.violations)
        raise typer.Exit(1)
    if check.error:
        raise _fail(check.error)
    console.print(f"[green]{manifest}: valid{against}[/green] ({check.nodes} nodes; inputs: "
                  f"{', '.join(f'{n}:{p}' for n, p in check.inputs) or 'none'}; "
                  f"outputs: {', '.join(f'{n}:{p}' for n, p in check.outputs)})", highlight=False)
