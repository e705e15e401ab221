"""Bearer-token auth on every RPC kind, TLS and mutual TLS, through a real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorline.client import AsyncClient, AuthenticationError, TensorlineError, TransportError
from tests.support.certs import make_certs

MANIFEST = {"nodes": [{"id": "p", "node_type": "PassThrough"}]}


async def test_token_required_on_unary_calls(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(auth_tokens=["alpha", "beta"])
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as anonymous:
        for call in (anonymous.execute(MANIFEST, {"p": np.ones(3)}), anonymous.list_nodes(),
                     anonymous.server_info()):
            with pytest.raises(AuthenticationError) as info:
                await call
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing bearer token" in info.value.message
        # Health stays open for balancers and probes.
        assert await anonymous.health() == "SERVING"
    async with AsyncClient(target, token="wrong") as wrong:
        with pytest.raises(AuthenticationError, match="invalid bearer token"):
            await wrong.server_info()
    for token in ("alpha", "beta"):
        async with AsyncClient(target, token=token) as good:
            result = await good.execute(MANIFEST, {"p": np.arange(3)})
            np.testing.assert_array_equal(result["p"], np.arange(3))


async def test_tls_round_trip(tmp_path: Path, server_factory: Callable[..., Any]) -> None:
    certs = make_certs(tmp_path)
    server = await server_factory(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    target = f"localhost:{server.port}"
    async with AsyncClient(target, root_certificates=certs.ca.read_bytes()) as client:
        result = await client.execute(MANIFEST, {"p": np.arange(4.0)})
        np.testing.assert_array_equal(result["p"], np.arange(4.0))
    # A plaintext client cannot talk to a TLS server.
    async with AsyncClient(target, retry_unavailable=False, timeout=5) as plain:
        with pytest.raises(TransportError):
            await plain.server_info()


async def test_mutual_tls(tmp_path: Path, server_factory: Callable[..., Any]) -> None:
    certs = make_certs(tmp_path)
    server = await server_factory(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key,
                                  tls_client_ca_file=certs.ca)
    target = f"localhost:{server.port}"
    async with AsyncClient(target, root_certificates=certs.ca.read_bytes(),
                           certificate_chain=certs.client_cert.read_bytes(),
                           private_key=certs.client_key.read_bytes()) as client:
        info = await client.server_info()
        assert info.instance_id == server.settings.instance_id
    # Without a client certificate the handshake fails.
    async with AsyncClient(target, root_certificates=certs.ca.read_bytes(),
                           retry_unavailable=False, timeout=5) as no_cert:
        with pytest.raises(TensorlineError):
            await no_cert.server_info()
