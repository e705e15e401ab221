"""The ``tensorline`` command line: serve, run, stream, validate, nodes, pipelines, health,
demo."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from tensorline.client._client import AsyncClient, Client, ExecuteResult, load_manifest
from tensorline.client._exceptions import TensorlineError
from tensorline.client.cli._io import (
    describe,
    parse_assignment,
    read_input,
    render_values,
    value_json,
    write_outputs,
)
from tensorline.wire import Audio

if TYPE_CHECKING:  # the server extra may be missing: imported where a command needs it
    from tensorline.server import SetupError

# pretty_exceptions off: an unexpected error is one line unless --debug (see ``main``).
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="tensorline: run pipelines of Python nodes over tensors.")
# Set by --debug: tracebacks for unexpected errors, debug logging on the client commands.
_debug = False
console = Console()
errors = Console(stderr=True)


def package_version() -> str:
    """The installed distribution's version (the client must not import the server's
    ``_version``; both read the same metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorline")
    except PackageNotFoundError:  # running from a checkout without an install
        return "0.0.0"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"tensorline {package_version()}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option(
        "--debug", help="debug logging, and a traceback for an unexpected error")] = False,
) -> None:
    """tensorline: run pipelines of Python nodes over tensors."""
    global _debug
    _debug = debug
    if debug and ctx.invoked_subcommand != "serve":  # serve has --log-level of its own
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


ServerOpt = Annotated[str, typer.Option("--server", "-s", envvar="TENSORLINE_SERVER",
                                        help="server address host:port")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="TENSORLINE_TOKEN",
                                              help="bearer token")]
TlsOpt = Annotated[bool, typer.Option("--tls", help="use TLS with the system roots")]
CaOpt = Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate (PEM) to trust")]
CertOpt = Annotated[Path | None, typer.Option("--tls-cert", help="client certificate (mTLS)")]
KeyOpt = Annotated[Path | None, typer.Option("--tls-key", help="client private key (mTLS)")]


def _connection(token: str | None, tls: bool, ca: Path | None, cert: Path | None,
                key: Path | None) -> dict[str, Any]:
    def read(path: Path | None, option: str) -> bytes | None:
        try:
            return path.read_bytes() if path else None
        except OSError as exc:
            raise _fail(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None

    return {
        "token": token,
        "tls": tls,
        "root_certificates": read(ca, "--tls-ca"),
        "certificate_chain": read(cert, "--tls-cert"),
        "private_key": read(key, "--tls-key"),
    }


def _fail(message: str, code: int = 1) -> typer.Exit:
    # soft_wrap: one line however narrow the terminal; escape: messages quote "[" and "]".
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# Bindings the sandbox runtime does without (it reports the layer inactive): not required.
_OPTIONAL_SERVER_DISTRIBUTIONS = frozenset({"pyseccomp", "landlock"})


def _missing_server_distributions() -> list[str]:
    """The distributions of the ``server`` extra that are not installed (pyproject.toml is the
    one list). Empty when tensorline's metadata is not there (a source tree on sys.path)."""
    from importlib import metadata

    try:
        requirements = metadata.requires("tensorline") or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        # Only what the extra always needs: a platform marker (uvloop) makes it optional.
        if marker.strip().replace("'", '"') != 'extra == "server"':
            continue
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
        if name is None or name[0].lower() in _OPTIONAL_SERVER_DISTRIBUTIONS:
            continue
        try:
            metadata.distribution(name[0])
        except metadata.PackageNotFoundError:
            missing.append(name[0])
    return missing


def _require_server(command: str) -> None:
    """Commands that run the server's code (serve, demo, validate, the local catalogue) say in
    one line what to install when ``pip install tensorline`` brought only the client."""
    missing = _missing_server_distributions()
    if missing:
        raise _fail(f"tensorline {command} needs the server extra: pip install "
                    f"'tensorline[server]' (not installed: {', '.join(missing)})")


def _headline(message: str, violations: Sequence[Any]) -> str:
    """The server's message without its inline list of problems when they follow one a line
    (``invalid manifest (2 problem(s)): a; b`` -> ``invalid manifest (2 problem(s))``)."""
    if violations:
        head, sep, _ = message.partition(" problem(s)): ")
        if sep:
            return f"{head} problem(s))"
    return message


def _report_error(exc: TensorlineError, server: str = "") -> typer.Exit:
    """The error as one line (then one per problem); ``server`` (the --server address) adds a
    hint when nothing answered there."""
    hint = ""
    if server and exc.code is not None and exc.code.name == "UNAVAILABLE" and (
            "connect" in exc.message.lower()):
        hint = (f" (is a tensorline server listening on {server}? start one with tensorline "
                "serve, or pass --server HOST:PORT)")
    errors.print(f"[red]{type(exc).__name__}[/red] ({exc.code.name if exc.code else '-'}): "
                 f"{escape(_headline(exc.message, exc.violations) + hint)}", highlight=False,
                 soft_wrap=True)
    _print_violations(exc.violations)
    return typer.Exit(1)


def _print_violations(violations: Sequence[Any]) -> None:
    """One line per problem (``field: description``), however narrow the terminal."""
    for violation in violations:
        errors.print(f"  - {escape(violation.field)}: {escape(violation.description)}",
                     highlight=False, soft_wrap=True)


def print_result(result: ExecuteResult) -> None:
    outputs = Table(title="outputs")
    outputs.add_column("output", no_wrap=True)
    outputs.add_column("value", overflow="fold")
    # The value column's width, roughly: what is left beside the output names and borders.
    width = console.width - max((len(key) for key in result.outputs), default=6) - 7
    for key, value in result.outputs.items():
        values = render_values(value, width)
        outputs.add_row(key, Text(describe(value) + (f"\n{values}" if values else "")))
    console.print(outputs)
    metrics = Table(title=f"metrics (total {result.metrics.total_ms:.2f} ms, "
                          f"plan cached: {result.metrics.plan_cached})")
    for column in ("node", "type", "runtime", "wall ms", "why"):
        metrics.add_column(column)
    for node in result.metrics.nodes:
        why = node.selection_reason + (f" [fallback: {node.fallback}]" if node.fallback else "")
        metrics.add_row(node.node_id, node.node_type, node.runtime, f"{node.wall_ms:.3f}", why)
    console.print(metrics)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port (0 = ephemeral)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON settings file")] = None,
    node_module: Annotated[list[str] | None, typer.Option(
        "--node-module", help="extra trusted node module (repeatable); importable from the "
                              "current directory, as with python -m")] = None,
    untrusted_module: Annotated[list[str] | None, typer.Option(
        "--untrusted-module", help="node module that always runs sandboxed (repeatable); "
                                   "importable from the current directory")] = None,
    auth_token: Annotated[list[str] | None, typer.Option(
        "--auth-token", help="accepted bearer token (repeatable); none = no auth")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="server private key (PEM)")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        help="CA for client certificates (enables mutual TLS)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (0 = ephemeral)")] = None,
    max_concurrent_executions: Annotated[int | None, typer.Option(help="0 = no limit")] = None,
    max_concurrent_streams: Annotated[int | None, typer.Option(help="0 = no limit")] = None,
    grace: Annotated[float | None, typer.Option(help="drain grace period in seconds")] = None,
    instance_id: Annotated[str | None, typer.Option(help="replica id for GetServerInfo")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING")] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json")] = None,
    pipelines: Annotated[Path | None, typer.Option(
        "--pipelines", help="directory of manifests served as named pipelines (run NAME; the "
                            "models of the Open Inference Protocol); changes are picked up "
                            "while serving (TENSORLINE_PIPELINES_WATCH)")
    ] = None,
) -> None:
    """Start the gRPC server (drains on SIGTERM/SIGINT). Every option also reads TENSORLINE_*."""
    _require_server("serve")
    from tensorline.server import SetupError, run_server

    options = dict(
        host=host, port=port, node_modules=node_module or None,
        untrusted_modules=untrusted_module or None, auth_tokens=auth_token or None,
        tls_cert_file=tls_cert, tls_key_file=tls_key, tls_client_ca_file=tls_client_ca,
        metrics_port=metrics_port, max_concurrent_executions=max_concurrent_executions,
        max_concurrent_streams=max_concurrent_streams, grace_s=grace,
        instance_id=instance_id, log_level=log_level, log_format=log_format,
        pipelines_dir=pipelines)
    try:
        code = run_server(options, config=config, modules_dir=os.getcwd())
    except SetupError as exc:
        raise _setup_failure(exc) from None
    raise typer.Exit(code)


def _setup_failure(exc: SetupError) -> typer.Exit:
    """The server's code could not be set up (``tensorline.server.SetupError``): one line, the
    server's JSON log entry under ``--log-format json``."""
    if exc.log_line is None:
        return _fail(exc.message, code=exc.exit_code)
    print(exc.log_line, file=sys.stderr, flush=True)
    return typer.Exit(exc.exit_code)


# What ``run`` takes for a file name rather than a pipeline name when no such file exists.
_FILE_LIKE = re.compile(r"[/\\]|\.(ya?ml|json)$", re.IGNORECASE)


def manifest_or_name(argument: str, pipeline_version: int | None) -> dict[str, Any] | None:
    """The manifest in file ``argument``, or None when ``argument`` names a pipeline of the
    server (no such file, and it does not look like a file name). ValueError otherwise."""
    path = Path(argument)
    if path.is_file():
        if pipeline_version is not None:
            raise ValueError("--pipeline-version goes with a pipeline NAME, not a manifest file")
        return load_manifest(path)
    if _FILE_LIKE.search(argument):
        raise ValueError(f"{argument}: no such file")
    return None


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(
        metavar="MANIFEST|NAME",
        help="manifest file (.yaml/.yml/.json); when no such file exists, the name of a "
             "pipeline of the server's repository (serve --pipelines DIR; see `tensorline "
             "pipelines`)")],
    server: ServerOpt = "localhost:50051",
    pipeline_version: Annotated[int | None, typer.Option(
        "--pipeline-version", min=1, help="with a pipeline NAME: run this version (default: "
                                          "the newest ready one)")] = None,
    input: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="NODE[:PORT]=FILE (.npy, .wav, .json, .txt, other=bytes)")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="write outputs to FILE.npz or a directory")] = None,
    timeout: Annotated[float | None, typer.Option(help="deadline in seconds")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print outputs and metrics as JSON (per output: kind, dtype, shape, "
                       "values of small tensors, JSON and text values)")] = False,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """Run a manifest (or a named pipeline of the server) once and print (or save) every
    output."""
    try:
        inputs = {key: read_input(p) for key, p in map(parse_assignment, input or [])}
        data = manifest_or_name(manifest, pipeline_version)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    named = data is None
    what = f"pipeline {manifest}" if named else Path(manifest).name
    try:
        with Client(server, **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client, \
                _spinner(f"running {what} on {server}"):
            if named:
                result = client.execute(inputs=inputs, pipeline=manifest,
                                        version=pipeline_version, timeout=timeout)
            else:
                result = client.execute(data, inputs, timeout=timeout)
    except TensorlineError as exc:
        raise _report_error(exc, server) from None
    if as_json:
        print(json.dumps(result_json(result), indent=2), flush=True)
    else:
        print_result(result)
    if output:
        try:
            write_outputs(output, result.outputs)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
        (errors if as_json else console).print(f"wrote {output}", highlight=False)


def _spinner(message: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on stderr while a call runs, only for a person watching it (stderr a
    terminal): never in a pipe, a log or a test's captured output."""
    if not errors.is_terminal:
        return contextlib.nullcontext()
    return errors.status(message)


def result_json(result: ExecuteResult) -> dict[str, Any]:
    """``run --json``: every output by its key, and the metrics."""
    metrics = result.metrics
    return {
        "outputs": {key: value_json(value) for key, value in result.outputs.items()},
        "metrics": {
            "total_ms": metrics.total_ms, "plan_cached": metrics.plan_cached,
            "nodes": [{"node_id": n.node_id, "node_type": n.node_type, "runtime": n.runtime,
                       "wall_ms": n.wall_ms, "selection_reason": n.selection_reason,
                       "fallback": n.fallback} for n in metrics.nodes],
        },
    }


@app.command()
def nodes(
    server: Annotated[str | None, typer.Option("--server", "-s",
                                               help="ask a server instead of the local catalogue")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (with params schemas)")] = False,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """List the node catalogue: types, parameters (JSON schema) and ports."""
    if server:
        try:
            with Client(server, **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client:
                listed = client.catalogue()
        except TensorlineError as exc:
            raise _report_error(exc, server) from None
    else:
        _require_server("nodes (without --server)")
        from tensorline.server import local_catalogue

        listed = local_catalogue()
    infos = list(listed.nodes)
    if as_json:
        from google.protobuf.json_format import MessageToDict

        listing = []
        for info in infos:
            entry = MessageToDict(info, preserving_proto_field_name=True)
            entry["params_schema"] = json.loads(entry.pop("params_schema_json", "{}"))
            listing.append(entry)
        console.print_json(json.dumps(listing))
        return
    console.print(nodes_table(infos) if console.width >= WIDE else nodes_list(infos))
    for missing, types in _unavailable(listed.unavailable).items():
        console.print(f"[dim]not available here: {', '.join(types)} (optional "
                      f"{'dependency' if len(missing) == 1 else 'dependencies'} "
                      f"{', '.join(missing)} not installed: pip install "
                      f"{' '.join(missing)})[/dim]", highlight=False)


def _unavailable(entries: Sequence[Any]) -> dict[tuple[str, ...], list[str]]:
    """The node types a catalogue cannot run, grouped by the dependencies they miss."""
    grouped: dict[tuple[str, ...], list[str]] = {}
    for entry in entries:
        grouped.setdefault(tuple(entry.missing_dependencies), []).append(entry.node_type)
    return grouped


# Below this terminal width ``nodes`` folds each node type into a few lines instead of a table.
WIDE = 120


def _param_type(schema: dict[str, Any]) -> str:
    """``integer``, ``integer?`` (anyOf with null), ``"a"|"b"`` (enum) ... for the listing."""
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        optional = "?" if len(options) < len(schema["anyOf"]) else ""
        return "|".join(_param_type(option) for option in options) + optional
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    return str(schema.get("type", "any"))


def _summary(info: Any) -> tuple[str, str, str, str]:
    """(inputs, outputs, params, description) of a node type, as the listings print them."""
    schema = json.loads(info.params_schema_json or "{}")
    params = ", ".join(f"{k}: {_param_type(v)}" for k, v in schema.get("properties", {}).items())
    return (", ".join(f"{p.name}:{p.kind}" + ("" if p.required else "?") for p in info.inputs),
            ", ".join(f"{p.name}:{p.kind}" for p in info.outputs), params or "-",
            " ".join(info.description.split()))


def nodes_table(infos: Sequence[Any]) -> Table:
    """The catalogue as a table (wide terminals): the type column is as wide as the longest
    type and never wraps (a name cut short cannot be copied into a manifest); the other columns
    wrap, folding a word too long for them rather than cutting it with an ellipsis."""
    table = Table(title=f"{len(infos)} node types")
    table.add_column("type", no_wrap=True, style="bold",
                     min_width=max((len(info.node_type) for info in infos), default=4))
    for column in ("inputs", "outputs", "params"):
        table.add_column(column, overflow="fold")
    table.add_column("description", overflow="fold", ratio=2)
    for info in infos:
        table.add_row(info.node_type, *_summary(info))
    return table


def nodes_list(infos: Sequence[Any]) -> Group:
    """The catalogue folded for narrow terminals (80 columns): per node type, its full name and
    ports on one line, then its params and description indented and wrapped."""
    parts: list[Any] = [Text(f"{len(infos)} node types", style="bold")]
    for info in infos:
        inputs, outputs, params, description = _summary(info)
        head = Text.assemble((info.node_type, "bold"), f"  {inputs or '-'} -> {outputs or '-'}")
        head.no_wrap, head.overflow = False, "fold"
        parts.append(head)
        parts.append(Padding(Text(f"params: {params}", overflow="fold"), (0, 0, 0, 4), expand=False))
        parts.append(Padding(Text(description, style="dim", overflow="fold"), (0, 0, 0, 4), expand=False))
    return Group(*parts)


@app.command()
def health(
    server: ServerOpt = "localhost:50051",
    service: Annotated[str, typer.Option(help="service name ('' = whole server)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 5.0,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """Exit 0 when the server's gRPC health is SERVING, 1 otherwise (container/k8s probe)."""
    try:
        with Client(server, retry_unavailable=False,
                    **_connection(token, tls, tls_ca, tls_cert, tls_key)) as client:
            status = client.health(service, timeout=timeout)
    except TensorlineError as exc:
        errors.print(f"{server}: {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{server}: {status}")
    raise typer.Exit(0 if status == "SERVING" else 1)


DEMO_MANIFEST: dict[str, Any] = {
    "version": "v1",
    "metadata": {"name": "demo"},
    "nodes": [
        {"id": "mic", "node_type": "AudioResample", "params": {"target_rate": 16000}},
        {"id": "features", "node_type": "PassThrough"},
        {"id": "double", "node_type": "Scale", "params": {"factor": 2}},
        {"id": "triple", "node_type": "Scale", "params": {"factor": 3}, "runtime_hint": "sandbox"},
        {"id": "mix", "node_type": "Add"},
        {"id": "norm", "node_type": "Normalize"},
    ],
    "connections": [
        {"from": "features", "to": "double"},
        {"from": "features", "to": "triple"},
        {"from": "double", "to": "mix"},
        {"from": "triple", "to": "mix"},
        {"from": "mix", "to": "norm"},
    ],
}


# What the demo's server preloads (TENSORLINE_PRELOAD_MODULES): AudioResample's scipy.signal,
# and the built-in nodes, which the sandboxed Scale imports in its worker.
DEMO_PRELOAD = ("scipy.signal", "tensorline.server.nodes.builtin")


def _demo(preload: bool) -> tuple[ExecuteResult, float, float]:
    """The demo pipeline's result, and its first and second call latency in ms."""
    from tensorline.server import TensorlineServer, run_server

    async def through(server: TensorlineServer) -> tuple[ExecuteResult, float, float]:
        console.print(f"started a tensorline server on 127.0.0.1:{server.port} (preload and "
                      f"warm-up {'on' if preload else 'off'})")
        t = np.arange(48000) / 48000
        tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
        features = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        inputs = {"mic": Audio(tone, 48000), "features": features}
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            # As a balancer would: wait until the warm-up is over (health SERVING). The health
            # check also connects the channel, so neither timed call includes that set-up.
            await server.warmed()
            status = await client.health()
            if status != "SERVING":
                console.print(f"health: {status}")
            latencies = []
            for _ in range(2):
                started = time.perf_counter()
                result = await client.execute(DEMO_MANIFEST, inputs)
                latencies.append((time.perf_counter() - started) * 1000)
        return result, latencies[0], latencies[1]

    # Self-contained (environment=False): the operator's TENSORLINE_* settings (auth, TLS, ...)
    # are not the demo's. With ``preload`` the server imports DEMO_PRELOAD (here and in the
    # sandbox launcher) and runs the warm-up examples of every node type that declares some
    # before it reports SERVING.
    return run_server(
        {"host": "127.0.0.1", "port": 0, "grace_s": 1.0,
         "preload_modules": list(DEMO_PRELOAD) if preload else [],
         "warmup_nodes": ["*"] if preload else []},
        environment=False, while_serving=through)


@app.command()
def demo(
    preload: Annotated[bool, typer.Option(
        help="preload scipy.signal and the built-in nodes and warm the node types up at start "
             "(--no-preload: the cold first call)")] = True,
) -> None:
    """Start a server on an ephemeral port, run a demo pipeline through it twice and print the
    result and both calls' latency."""
    _require_server("demo")
    from tensorline.server import SetupError

    console.print_json(json.dumps(DEMO_MANIFEST))
    try:
        result, first_ms, second_ms = _demo(preload)
    except TensorlineError as exc:
        raise _report_error(exc) from None
    except SetupError as exc:
        raise _setup_failure(exc) from None
    print_result(result)
    console.print(f"first call {first_ms:.1f} ms, second call {second_ms:.1f} ms "
                  f"(first/second {first_ms / second_ms:.1f}x)")


def main() -> None:
    try:
        code = app()
    except Exception as exc:  # a bug or an unforeseen failure: one line, the traceback on ask
        if _debug:
            raise
        errors.print(f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc))} "
                     "(run with --debug for the traceback)", highlight=False, soft_wrap=True)
        code = 1
    sys.exit(code)
