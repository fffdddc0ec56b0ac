"""Starts the gRPC server: jalora.v1.Jalora, grpc.health.v1.Health and server reflection (unless
`reflection` is off), over TLS and behind bearer tokens when the config names their files
(server/security.py); with an `http_port`, the OpenAI-compatible HTTP front beside it (server/http.py),
on the same event loop, engine worker and call gate.

`JaloraServer(engine, config)` runs on the caller's asyncio loop (`jalora serve`); `ServerThread(engine,
config)` runs one on a loop of its own in a background thread (tests, notebooks, embedding in a
synchronous program). `engine` is anything that implements the `Engine` protocol
(jalora/engine/interface.py); `config` is a `ServerConfig` (server/config.py), whose defaults apply
when it is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jalora.api import CHANNEL_OPTIONS
from jalora.api.v1 import jalora_pb2
from jalora.engine.interface import Engine
from server.config import ServerConfig
from server.engine_worker import EngineWorker
from server.frontend import Frontend
from server.metrics import ServerMetrics
from server.security import server_credentials, token_interceptor, token_policy
from server.servicer import JaloraServicer, add_to_server

logger = logging.getLogger(__name__)

# Seconds the calls failed at the end of a drain get to send their status before grpc cancels what is
# left (only a client that stopped reading its stream can hold one that long).
FAILED_CALLS_GRACE = 5.0

SERVICE_NAME = jalora_pb2.DESCRIPTOR.services_by_name["Jalora"].full_name  # "jalora.v1.Jalora"


def format_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The grpc channel arguments of a server with `config`."""
    options = [
        *CHANNEL_OPTIONS,
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        # Keep pinging while a call sends nothing (a long prefill, a queued request): by default a
        # server stops after two pings without data, and a dead client would then hold its requests.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
    ]
    if config.max_connection_age is not None:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace)),
        ]
    return options


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jalora")
    except Exception:
        return "0+unknown"


class JaloraServer:
    """The engine thread plus a grpc.aio server in front of it.

    `engine` implements jalora's engine interface; nobody else drives it once `start` has been called.
    """

    def __init__(self, engine: Engine, config: ServerConfig | None = None):
        self.config = ServerConfig() if config is None else config
        # Prometheus metrics (server/metrics.py), filled by the engine thread, when a metrics port is set.
        self.metrics = ServerMetrics() if self.config.metrics_port is not None else None
        self.worker = EngineWorker(
            engine, self.config.max_pending_requests, self.config.tokenizer_threads, observer=self.metrics
        )
        self.front = Frontend(self.worker, self.config)
        self.servicer = JaloraServicer(self.front, version=_version())
        self.health = health.aio.HealthServicer()
        # The TLS and token files are read once, here (their readability was checked by ServerConfig).
        self._credentials = server_credentials(self.config)
        self._interceptor = token_interceptor(self.config)
        self.http = None  # the HTTP front (server/http.py), with an http_port
        if self.config.http_port is not None:
            from server.http import HttpFront  # its libraries load only where it serves

            self.http = HttpFront(self.front, self.config, token_policy(self.config))
        self.port: int | None = None  # the bound port, once started
        self.metrics_port: int | None = None  # the metrics endpoint's bound port, once started
        self.http_port: int | None = None  # the HTTP front's bound port, once started
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None
        self._cut_grace: asyncio.Event | None = None

    @property
    def address(self) -> str:
        """host:port where the server listens (the bound port once started, so --port 0 shows the real one)."""
        return format_address(self.config.host, self.config.port if self.port is None else self.port)

    async def start(self) -> int:
        """Starts serving (and the metrics endpoint, with a metrics port, and the HTTP front, with an HTTP
        port); returns the bound port (useful with port=0; `metrics_port` and `http_port` hold the others')."""
        interceptors = [] if self._interceptor is None else [self._interceptor]
        server = grpc.aio.server(interceptors=interceptors, options=server_options(self.config))
        add_to_server(self.servicer, server)  # refuses unparsable request bytes with INVALID_ARGUMENT
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                server,
            )
        bind = format_address(self.config.host, self.config.port)
        try:  # older grpc returned port 0 on failure, newer ones raise
            if self._credentials is None:
                self.port = server.add_insecure_port(bind) or None
            else:
                self.port = server.add_secure_port(bind, self._credentials) or None
        except RuntimeError as e:
            raise OSError(f"could not bind {bind}: {e}") from None
        if self.port is None:
            raise OSError(f"could not bind {bind}")
        if self.metrics is not None:
            try:
                self.metrics_port = self.metrics.start_http(self.config.host, self.config.metrics_port)
            except OSError as e:
                await server.stop(None)
                where = format_address(self.config.host, self.config.metrics_port)
                raise OSError(f"could not bind the metrics port {where}: {e}") from None
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except OSError as e:
                await server.stop(None)
                if self.metrics is not None:
                    self.metrics.stop_http()
                where = format_address(self.config.host, self.config.http_port)
                raise OSError(f"could not bind the HTTP port {where}: {e}") from None
        self.worker.start()
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("jalora serving on %s", self.address)
        if self.metrics_port is not None:
            logger.info("metrics on http://%s/metrics", format_address(self.config.host, self.metrics_port))
        if self.http_port is not None:
            logger.info("OpenAI-compatible HTTP on %s", self.http_address)
        return self.port

    async def not_serving(self, reason: str) -> None:
        """Health NOT_SERVING for good (a multi-host engine lost a process), over gRPC and HTTP: load
        balancers stop sending calls; the calls that still come fail with the engine's error."""
        self.front.broken = reason
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def http_address(self) -> str | None:
        """host:port of the HTTP front once started (None without one)."""
        return None if self.http_port is None else format_address(self.config.host, self.http_port)

    async def stop(self, grace: float | None = None) -> None:
        """Drains, then stops: health turns NOT_SERVING, new calls get UNAVAILABLE ("server is shutting
        down"; 503 over HTTP, whose /health answers 503 too), running calls of both fronts get `grace`
        seconds (default: the config's) to finish; those still running then end with UNAVAILABLE (over
        HTTP an error event) and the server's own message, and the engine thread, gRPC and HTTP stop.
        A second call while the first drains ends the grace now (a second SIGTERM) and waits with it."""
        if self._stopping is None:
            self._cut_grace = asyncio.Event()
            self._stopping = asyncio.ensure_future(self._drain(self.config.grace if grace is None else grace))
        else:
            self._cut_grace.set()
        await asyncio.shield(self._stopping)

    async def _drain(self, grace: float) -> None:
        calls = self.servicer.calls
        # Refusing first, in this loop turn: whoever sees NOT_SERVING is sure to be refused.
        calls.drain()
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, watchers told
        if calls.num_calls:
            logger.info("draining: %d calls get up to %.1f s to finish", calls.num_calls, grace)
        waits = [asyncio.ensure_future(calls.wait_idle()), asyncio.ensure_future(self._cut_grace.wait())]
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        message = f"server is shutting down: the call did not finish within the {grace:g} s grace"
        if self._cut_grace.is_set():
            message = "server is shutting down: stopped at once (a second stop) before the call finished"
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.worker.stop(message=message))
        with contextlib.suppress(TimeoutError):  # the failed calls send their status
            await asyncio.wait_for(calls.wait_idle(), FAILED_CALLS_GRACE)
        if self._server is not None:
            await self._server.stop(0)
        if self.http is not None:
            await self.http.stop()
        if self.metrics is not None:  # blocks until the HTTP thread's poll notices (up to half a second)
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.stop_http)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class ServerThread:
    """A JaloraServer on its own event loop in a daemon thread.

        with ServerThread(engine, ServerConfig(port=0)) as s:
            Client(s.target).generate(...)
    """

    def __init__(self, engine: Engine, config: ServerConfig | None = None):
        self.server = JaloraServer(engine, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jalora-grpc", daemon=True)

    @property
    def target(self) -> str:
        """host:port for a client (the bound port)."""
        return self.server.address

    @property
    def http_url(self) -> str:
        """http(s)://host:port/v1 of the HTTP front: an OpenAI client's base_url (the server needs an
        http_port)."""
        assert self.server.http_address is not None, "the server has no http_port"
        scheme = "https" if self.server.config.tls_cert is not None else "http"
        return f"{scheme}://{self.server.http_address}/v1"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def stop(self, grace: float | None = None) -> None:
        """See JaloraServer.stop; then ends the loop and joins the thread."""
        if not self._thread.is_alive():
            return
        wait = (self.server.config.grace if grace is None else grace) + FAILED_CALLS_GRACE + 60
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(timeout=wait)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
