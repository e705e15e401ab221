"""``tensorline validate``: check a manifest against a node catalogue and report every problem.

The catalogue is the local one (built-ins, entry points, ``--node-module``), or with
``--server`` the catalogue of a running server, fetched with ListNodes: its node types become
registry entries without a class (as the server does for an untrusted module, whose class it
never imports), so the server's own compiler checks the manifest here against exactly the
types, ports and params schemas the server would run it with, every problem at once, without
running anything. Node types the server knows but cannot run (a missing optional dependency)
are reported as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
    _module_not_found,
    _node_modules_from_cwd,
    _print_violations,
    _report_error,
    _require_server,
    app,
    console,
    errors,
)

if TYPE_CHECKING:
    from tensorline.server.nodes import NodeEntry, NodeRegistry
    from tensorline.v1 import tensorline_pb2 as pb


def entry_of_info(info: pb.NodeInfo) -> NodeEntry:
    """A registry entry (without a class) for a node type a server listed."""
    from tensorline.server.nodes import NodeEntry, NodeTraits, Port

    return NodeEntry(
        node_type=info.node_type, module=info.module or "(server)", trusted=info.trusted,
        class_ref=(info.module or "server", info.node_type), description=info.description,
        inputs=tuple(Port(p.name, p.kind, p.description, p.required, p.many)  # type: ignore[arg-type]
                     for p in info.inputs),
        outputs=tuple(Port(p.name, p.kind, p.description)  # type: ignore[arg-type]
                      for p in info.outputs),
        traits=NodeTraits(), reusable=info.reusable, streaming=info.streaming,
        async_process=False, async_initialize=False, async_cleanup=False, has_initialize=False,
        has_cleanup=False, cls=None, schema_json=info.params_schema_json or "{}",
    )


def server_registry(catalogue: pb.ListNodesResponse) -> NodeRegistry:
    """The registry a server's ListNodes answer describes."""
    from tensorline.server.nodes import NodeRegistry

    registry = NodeRegistry()
    for info in catalogue.nodes:
        registry.add(entry_of_info(info))
    for unavailable in catalogue.unavailable:
        registry.optional[unavailable.node_type] = tuple(unavailable.missing_dependencies)
    return registry


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
    # Either way the check is the server's own compiler, run here.
    _require_server("validate")
    from tensorline.server import RequestInvalid, Settings, TensorlineServerError
    from tensorline.server.manifest import compile_manifest
    from tensorline.server.nodes import NodeModuleError, NodeRegistry
    from tensorline.server.selector import Selector

    if server and node_module:
        raise _fail("--node-module and --server exclude each other: the server's catalogue "
                    "has the modules it was started with")
    try:
        data = load_manifest(manifest)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if server:
        try:
            with Client(server, **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client:
                registry = server_registry(client.catalogue())
        except TensorlineError as exc:
            raise _report_error(exc, server) from None
        against = f" against {server}"
    else:
        if node_module:
            _node_modules_from_cwd()
        try:
            registry = NodeRegistry.default(modules=node_module or ())
        except ModuleNotFoundError as exc:
            raise _fail(_module_not_found(exc, node_module or [])) from None
        except NodeModuleError as exc:
            raise _fail(str(exc)) from None
        against = ""
    # Model files (``ModelPath`` params) resolve against the roots a server started here would
    # have (TENSORLINE_PIPELINES_DIR, TENSORLINE_MODEL_DIRS, the config file). A server's
    # catalogue (--server) describes params by their JSON schema: its roots are its own.
    try:
        model_roots = () if server else Settings.load().model_roots
    except ValueError as exc:
        raise _fail(f"the server settings of this environment are invalid: {exc}") from None
    try:
        plan = compile_manifest(data, registry, Selector(sandbox_available=True),
                                model_roots=model_roots)
    except RequestInvalid as exc:
        errors.print(f"[red]{escape(str(manifest))}: {len(exc.violations)} problem(s)"
                     f"{escape(against)}[/red]", soft_wrap=True)
        _print_violations(exc.violations)
        raise typer.Exit(1) from None
    except TensorlineServerError as exc:
        raise _fail(exc.message) from None
    console.print(f"[green]{manifest}: valid{against}[/green] ({len(plan.nodes)} nodes; inputs: "
                  f"{', '.join(f'{n}:{p}' for n, p in plan.external_inputs) or 'none'}; "
                  f"outputs: {', '.join(f'{n}:{p}' for n, p in plan.sinks)})", highlight=False)
