"""The ``tensorline`` command line (typer)."""

from tensorline.client.cli import _pipelines as _pipelines  # registers ``pipelines``
from tensorline.client.cli import _stream as _stream  # registers the ``stream`` command
from tensorline.client.cli import _validate as _validate  # registers the ``validate`` command
from tensorline.client.cli._app import app, main

__all__ = ["app", "main"]
