"""Bearer-token authentication: a gRPC server interceptor that maps a token to a tenant.

Clients send ``authorization: Bearer <token>``. The interceptor hashes the token (SHA-256), compares
it in constant time with every configured digest, and runs the handler with the tenant available
through :func:`current_tenant`. A missing, malformed or unknown token ends the call with
UNAUTHENTICATED before the handler runs. Tokens are never logged.

Health checks and reflection are exempt, so a load balancer needs no token.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from typing import Iterable, Mapping

import grpc

__all__ = ["BearerAuthInterceptor", "current_tenant", "EXEMPT_PREFIXES"]

#: Services callable without a token.
EXEMPT_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("shallowmark_tenant", default=None)


def current_tenant() -> str | None:
    """The tenant of the call being handled on this thread (``None`` outside an authenticated call)."""
    return _tenant.get()


def _abort_handler(message: str) -> grpc.RpcMethodHandler:
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny)


def _with_tenant(behavior, tenant: str):
    def run(request_or_iterator, context):
        token = _tenant.set(tenant)
        try:
            return behavior(request_or_iterator, context)
        finally:
            _tenant.reset(token)

    return run


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Authenticate every call outside :data:`EXEMPT_PREFIXES` by bearer token.

    Args:
        token_digests: ``"sha256:<hex>"`` of each accepted token -> tenant
            (:meth:`ServerConfig.token_digests` builds it).
        exempt: method path prefixes that need no token.
    """

    def __init__(self, token_digests: Mapping[str, str], exempt: Iterable[str] = EXEMPT_PREFIXES):
        self._digests = [(bytes.fromhex(d.split(":", 1)[1]), tenant) for d, tenant in token_digests.items()]
        self._exempt = tuple(exempt)

    def tenant_for(self, token: str) -> str | None:
        """The tenant of ``token``, or ``None``. Constant time in the token's value."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for digest, tenant in self._digests:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        header = None
        for k, v in handler_call_details.invocation_metadata or ():
            if k == "authorization":
                header = v if isinstance(v, str) else v.decode("latin-1")
                break
        if header is None:
            return _abort_handler("missing bearer token: send the metadata header 'authorization: Bearer <token>'")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _abort_handler("malformed authorization header: expected 'Bearer <token>'")
        tenant = self.tenant_for(token)
        if tenant is None:
            return _abort_handler("unknown bearer token")
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _with_tenant(handler.unary_unary, tenant), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _with_tenant(handler.unary_stream, tenant), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _with_tenant(handler.stream_unary, tenant), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _with_tenant(handler.stream_stream, tenant), handler.request_deserializer, handler.response_serializer)
