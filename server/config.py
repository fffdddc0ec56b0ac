"""ServerConfig: every knob of the server (gRPC, and the OpenAI-compatible HTTP front beside it) in one
validated dataclass.

`JaloraServer(engine, config)` and `ServerThread(engine, config)` take one; `jalora serve` derives its
server flags, types, defaults and help from the fields below (server/cli.py), as it derives its engine
flags from `EngineConfig`, so each default is written once, here. Validation runs on construction,
before any model is loaded: a bad value raises `InvalidRequestError` naming the field. The TLS and token
files must be readable then; their contents are checked by the CLI's preflight (server/cli.py) and read
by the server at start (server/security.py).

A server reachable from other machines must not serve plaintext to anyone: a `host` that is not a
loopback address needs TLS and client authentication (a token, or client certificates), unless
`insecure` says the operator means it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os

from jalora.api import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, read_token_file
from jalora.api.limits import MAX_INT32
from jalora.config import config_field, is_int, is_number, require

# gRPC channel arguments are 32-bit ints: the keepalive and connection-age times go in as milliseconds.
MAX_CHANNEL_SECONDS = MAX_INT32 // 1000


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = config_field(DEFAULT_HOST, "address to listen on (loopback unless the operator says otherwise)")
    port: int = config_field(DEFAULT_PORT, "TCP port; 0 picks a free one")
    adapter_roots: tuple[str, ...] = config_field(
        (), "LoadAdapter accepts only adapter directories under these (repeatable)", metavar="DIR"
    )
    max_pending_requests: int = config_field(256, "requests in flight before new ones get RESOURCE_EXHAUSTED")
    max_pending_calls: int = config_field(
        64, "unary calls (Tokenize, adapters, info) in flight before new ones get RESOURCE_EXHAUSTED"
    )
    tokenizer_threads: int = config_field(
        4, "threads that tokenize prompts and Tokenize calls beside the engine thread (at most this many at once)"
    )
    grace: float = config_field(5.0, "seconds running calls get to finish at shutdown")
    model_name: str = config_field(
        "", "model name GetServerInfo reports, and the `model` that picks the base model over HTTP (default: the "
        "engine's model directory)"
    )
    tls_cert: str | None = config_field(
        None, "PEM certificate chain the server presents; with --tls-key it serves TLS (default: plaintext)",
        metavar="FILE",
    )
    tls_key: str | None = config_field(None, "PEM private key of --tls-cert (default: none)", metavar="FILE")
    tls_client_ca: str | None = config_field(
        None, "PEM CA certificates: clients must present a certificate one of them signed (mutual TLS; "
        "default: no client certificates)", metavar="FILE",
    )
    auth_token_file: str | None = config_field(
        None, "file holding the bearer token every call but health checks must send as `authorization: "
        "Bearer TOKEN` (default: no token)", metavar="FILE",
    )
    admin_token_file: str | None = config_field(
        None, "file holding the token LoadAdapter and UnloadAdapter require (the admin token also passes "
        "for every other call; default: they take --auth-token-file's)", metavar="FILE",
    )
    insecure: bool = config_field(
        False, "serve a --host that is not a loopback address without TLS and client authentication"
    )
    reflection: bool = config_field(True, "serve gRPC server reflection (service discovery for grpcurl and the like)")
    keepalive_time: float = config_field(
        60.0, "seconds between the server's keepalive pings on a connection, so a vanished client's requests "
        "are aborted and their KV blocks freed"
    )
    keepalive_timeout: float = config_field(20.0, "seconds a keepalive ping may go unanswered before the "
                                            "connection is closed")  # fmt: skip
    max_connection_age: float | None = config_field(
        None, "seconds after which a connection is asked to go away, so clients spread over new servers "
        "behind a load balancer (default: no limit)"
    )
    max_connection_age_grace: float = config_field(
        DEFAULT_TIMEOUT, "seconds the calls of a connection past its --max-connection-age get to finish "
        "(a client's default deadline)"
    )
    max_concurrent_streams: int = config_field(
        1024, "calls one connection may have open at once (above --max-pending-requests, so a full server "
        "answers RESOURCE_EXHAUSTED rather than leaving calls queued in the client)"
    )
    metrics_port: int | None = config_field(
        None, "serve Prometheus metrics over HTTP on this port of --host; 0 picks a free one (default: no metrics)"
    )
    http_port: int | None = config_field(
        None, "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, ...) on "
        "this port of --host, with the same engine, limits, TLS and tokens as gRPC; 0 picks a free one "
        "(default: gRPC only)"
    )

    def __post_init__(self):
        require(isinstance(self.host, str) and bool(self.host), "host", f"must name an address, got {self.host!r}")
        require(is_int(self.port) and 0 <= self.port <= 65535, "port",
                f"must be an integer in [0, 65535], got {self.port!r}")  # fmt: skip
        roots = self.adapter_roots
        require(not isinstance(roots, str | bytes | os.PathLike), "adapter_roots",
                f"must be a sequence of directories, not one path ({roots!r})")  # fmt: skip
        try:
            roots = tuple(os.fspath(r) for r in roots)
        except TypeError:
            require(False, "adapter_roots", f"must be a sequence of directory paths, got {self.adapter_roots!r}")
        require(all(isinstance(r, str) and r for r in roots), "adapter_roots",
                f"must be non-empty directory paths, got {list(roots)!r}")  # fmt: skip
        object.__setattr__(self, "adapter_roots", roots)
        for name in ("max_pending_requests", "max_pending_calls", "tokenizer_threads"):
            n = getattr(self, name)
            require(is_int(n) and n >= 1, name, f"must be an integer >= 1, got {n!r}")
        g = self.grace
        require(is_number(g) and g >= 0, "grace",
                f"must be a number of seconds >= 0, got {g!r:.40}")  # fmt: skip
        require(isinstance(self.model_name, str), "model_name", f"must be a string, got {self.model_name!r}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file"):
            object.__setattr__(self, name, _readable_file(name, getattr(self, name)))
        require(self.tls_key is None or self.tls_cert is not None, "tls_key", "needs --tls-cert, the certificate "
                "it belongs to")  # fmt: skip
        require(self.tls_cert is None or self.tls_key is not None, "tls_cert", "needs --tls-key, its private key")
        require(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca",
                "needs TLS: --tls-cert and --tls-key")  # fmt: skip
        for name in ("auth_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path is not None:
                try:
                    read_token_file(path)
                except ValueError as e:
                    require(False, name, str(e))
        for name in ("insecure", "reflection"):
            require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        for name in ("keepalive_time", "keepalive_timeout", "max_connection_age", "max_connection_age_grace"):
            value = getattr(self, name)
            if value is None and name == "max_connection_age":
                continue
            require(is_number(value) and 0 < value <= MAX_CHANNEL_SECONDS, name,
                    f"must be a number of seconds in (0, {MAX_CHANNEL_SECONDS}], got {value!r:.40}")  # fmt: skip
        n = self.max_concurrent_streams
        require(is_int(n) and 1 <= n <= MAX_INT32, "max_concurrent_streams",
                f"must be an integer in [1, {MAX_INT32}], got {n!r}")  # fmt: skip
        if not (self.insecure or is_loopback(self.host)):
            require(self.tls_cert is not None and (self.auth_token_file or self.tls_client_ca), "host",
                    f"{self.host} is not a loopback address: serving it needs TLS (--tls-cert, --tls-key) and "
                    "client authentication (--auth-token-file or --tls-client-ca); --insecure serves it without "
                    "them")  # fmt: skip
        m = self.metrics_port
        require(m is None or (is_int(m) and 0 <= m <= 65535), "metrics_port",
                f"must be None or an integer in [0, 65535], got {m!r}")  # fmt: skip
        require(m is None or m == 0 or m != self.port, "metrics_port", f"must differ from port ({m})")
        h = self.http_port
        require(h is None or (is_int(h) and 0 <= h <= 65535), "http_port",
                f"must be None or an integer in [0, 65535], got {h!r}")  # fmt: skip
        require(h is None or h == 0 or h not in (self.port, m), "http_port",
                f"must differ from port and metrics_port ({h})")  # fmt: skip

    def replace(self, **changes) -> ServerConfig:
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: `localhost` or a loopback IP address. Any other name may
    resolve to an outside address, so it counts as not loopback."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _readable_file(field: str, path) -> str | None:
    """`path` as a str, once it names a readable file; None stays None."""
    if path is None:
        return None
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    require(isinstance(path, str) and bool(path), field, f"must name a file, got {path!r}")
    require(not os.path.exists(path) or os.path.isfile(path), field, f"{path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        require(False, field, f"cannot read {path}: {reason[:1].lower() + reason[1:]}")
    return path
