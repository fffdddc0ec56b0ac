"""Who may talk to the server: TLS credentials from ServerConfig's PEM files, and bearer tokens
(the same rules, `TokenPolicy`, for the gRPC interceptor and the HTTP front).

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


def token_policy(config: ServerConfig) -> TokenPolicy | None:
    """The token rules of the config's token files (read now); None when it names none."""
    token = None if config.auth_token_file is None else read_token_file(config.auth_token_file)
    admin = None if config.admin_token_file is None else read_token_file(config.admin_token_file)
    if token is None and admin is None:
        return None
    return TokenPolicy(token, admin)


def token_interceptor(config: ServerConfig) -> TokenAuthInterceptor | None:
    """The gRPC interceptor for the config's token files (read now); None when it names none."""
    policy = token_policy(config)
    return None if policy is None else TokenAuthInterceptor(policy)


def _bearer(metadata) -> bytes | None:
    """The token of the call's first `authorization: Bearer ...` entry (the scheme is case-insensitive)."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_METADATA_KEY and isinstance(value, str):
            return bearer_token(value)
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


class TokenPolicy:
    """Who may make a call, for every front: `token` guards every call but health checks, `admin_token`
    the admin calls (loading and unloading adapters) and passes everywhere. Either may be None."""

    def __init__(self, token: str | None, admin_token: str | None):
        self._token = None if token is None else token.encode()
        self._admin = None if admin_token is None else admin_token.encode()

    def check(self, presented: bytes | None, admin_call: bool, call: str, how: str) -> tuple[str, str] | None:
        """None if `presented` (a bearer token, b"" for another scheme, None for none) may make the call;
        else ("UNAUTHENTICATED" | "PERMISSION_DENIED", why). `call` names the call and `how` says how a
        token is sent, for the message."""
        is_token, is_admin = _matches(presented, self._token), _matches(presented, self._admin)
        admin_only = admin_call and self._admin is not None
        if is_admin or (is_token and not admin_only) or (self._token is None and not admin_only):
            return None
        if is_token:
            return "PERMISSION_DENIED", f"{call} needs the admin token, not this one"
        if presented is None:
            needed = "the admin token" if admin_only else "a token"
            return "UNAUTHENTICATED", f"{call} needs {needed} in {how}"
        return "UNAUTHENTICATED", "invalid bearer token"


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of an `authorization` value (`Bearer <token>`, the scheme case-insensitive); b"" for
    another scheme, None for no value."""
    if authorization is None:
        return None
    if authorization[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX.lower():
        return authorization[len(BEARER_PREFIX) :].strip().encode()
    return b""  # another scheme: presented, but no bearer token


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token checks of every gRPC call (see the module's docstring) by a TokenPolicy."""

    def __init__(self, policy: TokenPolicy):
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method.startswith(HEALTH_METHOD_PREFIX):
            return await continuation(details)
        name = method.rsplit("/", 1)[-1]
        how = f"`{AUTHORIZATION_METADATA_KEY}: {BEARER_PREFIX}<token>` metadata"
        denied = self._policy.check(_bearer(details.invocation_metadata), method in ADMIN_METHODS, name, how)
        if denied is None:
            return await continuation(details)
        code, why = denied
        return _denied(await continuation(details), grpc.StatusCode[code], why)
