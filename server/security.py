"""Who may talk to the server: TLS credentials from ServerConfig's PEM files, and bearer tokens.

`server_credentials(config)` is None for plaintext, else the credentials of a TLS port, which require a
client certificate signed by `tls_client_ca` when one is given (mutual TLS). `TokenAuthInterceptor`
checks the `authorization: Bearer <token>` metadata of every call before its handler runs:

- the gRPC health service is exempt, so probes and load balancers need no secret;
- with `auth_token_file`, every other call needs that token or the admin token;
- with `admin_token_file`, LoadAdapter and UnloadAdapter need the admin token (which changes what the
  server runs, for every client), and other calls accept it too.

No token, or one that matches neither, is UNAUTHENTICATED; the ordinary token on an admin method is
PERMISSION_DENIED. Tokens are compared with `hmac.compare_digest`, whose time does not depend on where
the strings differ, and every configured token is compared on every call.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

from jalora.api import AUTHORIZATION_METADATA_KEY, BEARER_PREFIX, read_token_file
from jalora.api.v1 import jalora_pb2
from server.config import ServerConfig

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_SERVICE = jalora_pb2.DESCRIPTOR.services_by_name["Jalora"].full_name
ADMIN_METHODS = frozenset(f"/{_SERVICE}/{name}" for name in ("LoadAdapter", "UnloadAdapter"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (mutual with `tls_client_ca`) from the config's PEM files; None when it serves plaintext."""
    if config.tls_cert is None:
        return None
    assert config.tls_key is not None  # ServerConfig requires both
    client_ca = None if config.tls_client_ca is None else _read(config.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def token_interceptor(config: ServerConfig) -> TokenAuthInterceptor | None:
    """The interceptor for the config's token files (read now); None when it names none."""
    token = None if config.auth_token_file is None else read_token_file(config.auth_token_file)
    admin = None if config.admin_token_file is None else read_token_file(config.admin_token_file)
    if token is None and admin is None:
        return None
    return TokenAuthInterceptor(token, admin)


def _bearer(metadata) -> bytes | None:
    """The token of the call's first `authorization: Bearer ...` entry (the scheme is case-insensitive)."""
    for key, value in metadata or ():
        if key != AUTHORIZATION_METADATA_KEY or not isinstance(value, str):
            continue
        if value[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX.lower():
            return value[len(BEARER_PREFIX) :].strip().encode()
        return b""  # another scheme: presented, but no bearer token
    return None


def _matches(presented: bytes | None, expected: bytes | None) -> bool:
    if expected is None:
        return False
    # Compared even when nothing was presented, so the time taken does not say whether a token was.
    return hmac.compare_digest(presented or b"", expected) and presented is not None


def _denied(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary or streaming) that ends the call with `code`. Its
    requests are not even deserialized."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    streams_in = handler is not None and handler.request_streaming
    streams_out = handler is not None and handler.response_streaming
    if streams_in and streams_out:
        return grpc.stream_stream_rpc_method_handler(deny)
    if streams_in:
        return grpc.stream_unary_rpc_method_handler(deny)
    if streams_out:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token checks of every call (see the module's docstring). `token` guards every method but
    health; `admin_token` guards ADMIN_METHODS. Either may be None."""

    def __init__(self, token: str | None, admin_token: str | None):
        self._token = None if token is None else token.encode()
        self._admin = None if admin_token is None else admin_token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(details)
        presented = _bearer(details.invocation_metadata)
        is_token, is_admin = _matches(presented, self._token), _matches(presented, self._admin)
        admin_only = method in ADMIN_METHODS and self._admin is not None
        if is_admin or (is_token and not admin_only) or (self._token is None and not admin_only):
            return await continuation(details)
        name = method.rsplit("/", 1)[-1]
        if is_token:
            code, why = grpc.StatusCode.PERMISSION_DENIED, f"{name} needs the admin token, not this one"
        elif presented is None:
            needed = "the admin token" if admin_only else "a token"
            code = grpc.StatusCode.UNAUTHENTICATED
            why = f"{name} needs {needed} in `{AUTHORIZATION_METADATA_KEY}: {BEARER_PREFIX}<token>` metadata"
        else:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        return _denied(await continuation(details), code, why)
