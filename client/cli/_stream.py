"""``tensorline stream``: stream a file through a pipeline in chunks, with a progress bar.

Audio (.wav) is cut into chunks of ``--chunk 20ms`` (the default; or ``--chunk N`` frames);
tensors (.npy) into chunks of N rows along axis 0. A .npy has no sample rate: a duration needs
``--rate HZ`` (rows per second); without ``--chunk`` a .npy goes one row per chunk (one frame
each), or 20 ms of rows with ``--rate``. Several ``--input`` files are chunked alike and chunk i of
each goes out with sequence i, so multi-input nodes join them. Results are collected per output
and concatenated (audio and tensors along axis 0) into ``--output`` (.npz, .wav for a single
audio output, or a directory). Sending and receiving run concurrently; the server's flow control
paces the sender.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from tensorline.client._client import AsyncClient
from tensorline.client._exceptions import TensorlineError
from tensorline.client._stream import StreamEvent, StreamMetrics, StreamOutput
from tensorline.client.cli._app import (
    CaOpt,
    CertOpt,
    KeyOpt,
    ServerOpt,
    TlsOpt,
    TokenOpt,
    _connection,
    _fail,
    _report_error,
    app,
    console,
    errors,
    manifest_or_name,
)
from tensorline.client.cli._io import parse_assignment, read_input, write_outputs, write_wav
from tensorline.wire import Audio, Json, Tagged


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} chunks/s", style="progress.data.speed")


DEFAULT_MS = 20.0


def parse_chunk(text: str | None) -> tuple[float, str]:
    """``20ms`` -> (20, "ms"); ``512`` -> (512, "rows"); None -> (0, "default")."""
    if text is None:
        return 0.0, "default"
    text = text.strip().lower()
    try:
        if text.endswith("ms"):
            value, unit = float(text[:-2]), "ms"
        elif text.endswith("s"):
            value, unit = float(text[:-1]) * 1000, "ms"
        else:
            value, unit = float(int(text)), "rows"
    except ValueError:
        raise ValueError(f"--chunk must be a duration like 20ms or a number of rows/frames "
                         f"like 512, got {text!r}") from None
    if value <= 0:
        raise ValueError("--chunk must be positive")
    return value, unit


def split(value: Any, size: float, unit: str, name: str, rate: float | None = None) -> list[Any]:
    """Cut an input into chunks along axis 0 (views: no copies). ``unit`` "default": 20 ms of
    audio (or of a tensor with ``rate``), else one row of a tensor."""
    if isinstance(value, Audio):
        if unit == "default":
            size, unit = DEFAULT_MS, "ms"
        step = max(1, round(value.sample_rate * size / 1000)) if unit == "ms" else int(size)
        return [Audio(value.samples[i:i + step], value.sample_rate)
                for i in range(0, len(value.samples), step)]
    if isinstance(value, np.ndarray):
        if unit == "default":
            size, unit = (DEFAULT_MS, "ms") if rate else (1, "rows")
        if unit == "ms":
            if not rate:
                raise ValueError(f"{name}: --chunk {size:g}ms is a duration and a .npy has no "
                                 f"sample rate: give --rate HZ (rows per second) or --chunk "
                                 f"N (rows)")
            size, unit = max(1, round(rate * size / 1000)), "rows"
        if value.ndim == 0:
            return [value]
        return [value[i:i + int(size)] for i in range(0, len(value), int(size))]
    raise ValueError(f"{name}: only .wav and .npy inputs can be streamed")


def concatenate(values: list[Any]) -> Any:
    """The results of one output joined into one value."""
    bare = [v.value if isinstance(v, Tagged) else v for v in values]
    first = bare[0]
    if isinstance(first, Audio):
        return Audio(np.concatenate([a.samples for a in bare]), first.sample_rate)
    if isinstance(first, np.ndarray):
        if all(v.ndim == 0 for v in bare):
            return np.stack(bare)
        try:
            return np.concatenate(bare)
        except ValueError:
            return np.stack(bare)
    if isinstance(first, Json):
        return Json([v.value for v in bare])
    if isinstance(first, str):
        return "\n".join(bare)
    return b"".join(bytes(v) for v in bare)


def output_keys(results: list[StreamOutput]) -> dict[tuple[str, str], str]:
    ports: dict[str, set[str]] = {}
    for out in results:
        ports.setdefault(out.node_id, set()).add(out.port)
    return {(node, port): node if len(names) == 1 else f"{node}:{port}"
            for node, names in ports.items() for port in names}


async def run_stream(target: str, connection: dict[str, Any], manifest: dict[str, Any] | None,
                     inputs: dict[str, list[Any]], queue_size: int, timeout: float | None,
                     pipeline: str | None = None, version: int | None = None,
                     ) -> tuple[list[StreamOutput], StreamMetrics]:
    """Stream ``inputs`` through ``manifest``, or through the server's pipeline named
    ``pipeline`` (``version``)."""
    total = max(len(chunks) for chunks in inputs.values())
    results: list[StreamOutput] = []

    def on_event(event: StreamEvent) -> None:
        text = event.message or event.kind
        errors.print(f"[dim]{event.node_id}: {text}[/dim]", highlight=False)

    progress = Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                        _Rate(), console=errors, transient=False)
    async with AsyncClient(target, **connection) as client:
        stream = client.stream(manifest, pipeline=pipeline, version=version,
                               queue_size=queue_size, timeout=timeout, on_event=on_event)
        async with stream:
            with progress:
                sent = progress.add_task("sent", total=total)
                received = progress.add_task("received", total=None)

                async def send() -> None:
                    for index in range(total):
                        for key, chunks in inputs.items():
                            if index < len(chunks):
                                await stream.send(key, chunks[index], sequence=index)
                        progress.advance(sent)

                sender = asyncio.ensure_future(send())
                try:
                    receiving = asyncio.ensure_future(_receive(stream, results, progress,
                                                               received))
                    await sender
                    metrics = await stream.close()
                    await receiving
                finally:
                    sender.cancel()
    return results, metrics


async def _receive(stream: Any, results: list[StreamOutput], progress: Progress,
                   task: Any) -> None:
    async for out in stream:
        results.append(out)
        progress.advance(task)


@app.command()
def stream(
    manifest: Annotated[str, typer.Argument(
        metavar="MANIFEST|NAME",
        help="manifest file (.yaml/.yml/.json); when no such file exists, the name of a "
             "pipeline of the server's repository (see `tensorline pipelines`)")],
    server: ServerOpt = "localhost:50051",
    pipeline_version: Annotated[int | None, typer.Option(
        "--pipeline-version", min=1, help="with a pipeline NAME: stream through this version "
                                          "(default: the newest ready one)")] = None,
    input: Annotated[list[str], typer.Option(
        "--input", "-i", help="NODE[:PORT]=FILE (.wav or .npy), repeatable")] = [],  # noqa: B006
    chunk: Annotated[str | None, typer.Option(
        help="chunk size: a duration (20ms, the default for audio) or a number of "
             "rows/frames (default for .npy: 1 row)")] = None,
    rate: Annotated[float | None, typer.Option(
        min=0.001, help="rows per second of .npy inputs: lets --chunk be a duration")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="write outputs to FILE.npz, FILE.wav or a directory")] = None,
    queue_size: Annotated[int, typer.Option(help="server buffer per node (0 = default)")] = 0,
    timeout: Annotated[float | None, typer.Option(help="deadline of the session (s)")] = None,
    token: TokenOpt = None, tls: TlsOpt = False, tls_ca: CaOpt = None, tls_cert: CertOpt = None,
    tls_key: KeyOpt = None,
) -> None:
    """Stream files through a pipeline in chunks (StreamPipeline) and save the outputs."""
    if not input:
        raise _fail("give at least one --input NODE=FILE")
    try:
        size, unit = parse_chunk(chunk)
        data = manifest_or_name(manifest, pipeline_version)
        inputs = {}
        for key, path in map(parse_assignment, input):
            inputs[key] = split(read_input(path), size, unit, str(path), rate)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    try:
        results, metrics = asyncio.run(run_stream(
            server, _connection(token, tls, tls_ca, tls_cert, tls_key), data, inputs,
            queue_size, timeout, pipeline=manifest if data is None else None,
            version=pipeline_version))
    except TensorlineError as exc:
        raise _report_error(exc, server) from None
    keys = output_keys(results)
    grouped: dict[str, list[Any]] = {}
    for out in results:
        grouped.setdefault(keys[(out.node_id, out.port)], []).append(out.value)
    outputs = {key: concatenate(values) for key, values in grouped.items()}
    table = Table(title=f"stream closed: {metrics.chunks_received} chunks in, "
                        f"{metrics.results_sent} results out, {metrics.total_ms:.1f} ms")
    for column in ("node", "type", "runtime", "in", "out", "wall ms"):
        table.add_column(column)
    for node in metrics.nodes:
        table.add_row(node.node_id, node.node_type, node.runtime, str(node.inputs_consumed),
                      str(node.outputs_produced), f"{node.wall_ms:.2f}")
    console.print(table)
    if output:
        try:
            save(output, outputs)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
        console.print(f"wrote {output}")


def save(output: Path, outputs: dict[str, Any]) -> None:
    """Outputs to a .wav file (exactly one audio output), an .npz file or a directory."""
    if output.suffix.lower() != ".wav":
        write_outputs(output, outputs)
        return
    audio = [v for v in outputs.values() if isinstance(v, Audio)]
    if len(audio) != 1:
        raise ValueError(f"a .wav output needs exactly one audio output, got {len(audio)}")
    write_wav(output, audio[0])
