"""What the sandbox escape suite (tests/server/test_sandbox_escape.py) and its run in the
container image (tests/deploy/test_container.py) share: the hostile node modules, the manifests
that run one attack, what a worker's environment may hold, the check that an attack was blocked,
the check that the server still serves a normal sandboxed call, and the layer report.

The attacks are in tests/nodes/_attacks.py; ``tests.nodes.hostile`` (untrusted) and
``tests.nodes.hostile_trusted`` (trusted, sent to the sandbox by ``runtime_hint``) run them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import grpc
import numpy as np
import pytest

from tensorline.client import Client, TensorlineError

UNTRUSTED = "tests.nodes.hostile"
TRUSTED = "tests.nodes.hostile_trusted"
# The untrusted module's node, and the trusted one the manifest sends to the sandbox.
DOMAINS = {"untrusted": ("Attack", None), "trusted": ("TrustedAttack", "sandbox")}
# What a worker's environment may hold (docs/security.md).
WORKER_ENVIRONMENT = {"PATH", "LANG", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                      "MKL_NUM_THREADS", "MALLOC_ARENA_MAX", "PYTHONDONTWRITEBYTECODE", "HOME",
                      "TMPDIR"}


class Layer(Protocol):
    """A GetServerInfo ``sandbox_layers`` entry."""

    @property
    def name(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def detail(self) -> str: ...


def manifest(domain: str, what: str, *, node_type: str | None = None,
             **params: Any) -> dict[str, Any]:
    """One node ``bad`` running the attack ``what`` in ``domain`` ("untrusted" or "trusted"),
    as the domain's attack node or as ``node_type``."""
    default_type, hint = DOMAINS[domain]
    node: dict[str, Any] = {"id": "bad", "node_type": node_type or default_type,
                            "params": {"what": what, **params}}
    if hint:
        node["runtime_hint"] = hint
    return {"nodes": [node]}


def sandboxed_call_works(client: Client) -> None:
    """A normal pipeline (PassThrough sent to the sandbox) still runs there."""
    x = np.arange(6.0)
    result = client.execute({"nodes": [{"id": "ok", "node_type": "PassThrough",
                                        "runtime_hint": "sandbox"}]}, {"ok": x})
    np.testing.assert_array_equal(result["ok"], x)
    assert result.metrics.nodes[0].runtime == "sandbox"


def look(client: Client, domain: str, what: str, **params: Any) -> Any:
    """Run an attack that returns what it saw: it ran in a worker, no fallback; its output."""
    result = client.execute(manifest(domain, what, **params))
    node = result.metrics.nodes[0]
    assert node.runtime == "sandbox" and not node.fallback, node
    return result["bad"]


def refused(client: Client, domain: str, what: str, codes: Iterable[grpc.StatusCode], *,
            secret: str, **params: Any) -> TensorlineError:
    """Run an attack that must fail with one of ``codes``, naming the node, the secret nowhere
    in the message."""
    codes = tuple(codes)
    with pytest.raises(TensorlineError) as caught:
        client.execute(manifest(domain, what, **params))
    error = caught.value
    assert error.code in codes, (error.code, error.message)
    assert "'bad'" in error.message, error.message
    assert secret not in error.message
    return error


def layer_report(layers: Iterable[Layer]) -> str:
    """GetServerInfo's sandbox layers, one a line: name, active or not, detail."""
    return "\n".join(f"  {layer.name:<18} {'active' if layer.active else 'MISSING':<7} "
                     f"{layer.detail}" for layer in layers)
