"""``tensorline pipelines``: the named pipelines of a server's repository (serve --pipelines
DIR), with their state, versions and signature, as a table (or JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.table import Table

from tensorline.client._client import Client
from tensorline.client._exceptions import TensorlineError
from tensorline.client.cli._app import (
    CaOpt,
    CertOpt,
    KeyOpt,
    ServerOpt,
    TlsOpt,
    TokenOpt,
    _connection,
    _report_error,
    app,
    console,
)


def _port(port: Any) -> str:
    """``name:kind``, the v2 datatype and shape where declared, ``?`` for an optional input."""
    text = f"{port.name}:{port.kind}"
    if port.datatype:
        text += f" {port.datatype}"
    if port.shape:
        text += "[" + ",".join("?" if d < 0 else str(d) for d in port.shape) + "]"
    return text + ("" if port.required else "?")


def pipelines_table(infos: Sequence[Any]) -> Table:
    table = Table(title=f"{len(infos)} pipeline{'' if len(infos) == 1 else 's'}")
    table.add_column("name", no_wrap=True, style="bold",
                     min_width=max((len(i.status.name) for i in infos), default=4))
    table.add_column("state", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for column in ("inputs", "outputs"):
        table.add_column(column, overflow="fold")
    table.add_column("reason", overflow="fold", ratio=2)
    for info in infos:
        status = info.status
        style = {"READY": "green", "LOADING": "yellow"}.get(status.state, "red")
        table.add_row(status.name, f"[{style}]{status.state}[/{style}]",
                      ",".join(map(str, status.versions)) or "-",
                      ", ".join(map(_port, info.inputs)) or "-",
                      ", ".join(map(_port, info.outputs)) or "-", status.reason or "")
    return table


@app.command()
def pipelines(
    server: ServerOpt = "localhost:50051",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """List the server's named pipelines (serve --pipelines DIR): state, versions, inputs and
    outputs, and why one is not served. Run one with `tensorline run NAME`."""
    try:
        with Client(server, **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client:
            infos = client.list_pipelines()
    except TensorlineError as exc:
        raise _report_error(exc, server) from None
    if as_json:
        from google.protobuf.json_format import MessageToDict

        console.print_json(json.dumps([MessageToDict(info, preserving_proto_field_name=True)
                                       for info in infos]))
        return
    console.print(pipelines_table(infos))
