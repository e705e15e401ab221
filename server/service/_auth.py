"""Bearer-token authentication, enforced by an interceptor on every RPC (streaming included).

Health checks stay open so load balancers and orchestrators can probe without a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from tensorline.server.service._status import await_first_message

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def _deny(message: str) -> Callable[..., Any]:
    async def unary(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return unary


def _deny_stream(message: str) -> Callable[..., Any]:
    async def streaming(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    return streaming


def _deny_request_stream(message: str) -> Callable[..., Any]:
    """Refuse a call whose client streams: only once its first message has arrived (see
    ``await_first_message``), so the client sees UNAUTHENTICATED rather than INTERNAL."""
    async def streaming(request: Any, context: Any) -> None:
        await await_first_message(context)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return streaming


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def _authorized(self, metadata: Any) -> str | None:
        """None when authorized, else the reason."""
        for key, value in metadata or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() != "bearer" or not token:
                    return "authorization metadata must be 'Bearer <token>'"
                presented = token.strip().encode()
                if any(hmac.compare_digest(presented, t) for t in self._tokens):
                    return None
                return "invalid bearer token"
        return "missing bearer token (authorization metadata)"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        reason = self._authorized(details.invocation_metadata)  # type: ignore[attr-defined]
        if reason is None:
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny_request_stream(reason))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny_request_stream(reason))
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream(reason))
        # No deserializer: a refused request is not decoded.
        return grpc.unary_unary_rpc_method_handler(_deny(reason))
