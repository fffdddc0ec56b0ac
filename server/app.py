"""Starts the gRPC server: jalora.v1.Jalora, grpc.health.v1.Health and server reflection.

`JaloraServer(engine, config)` runs on the caller's asyncio loop (`jalora serve`); `ServerThread(engine,
config)` runs one on a loop of its own in a background thread (tests, notebooks, embedding in a
synchronous program). `engine` is anything that implements the `Engine` protocol
(jalora/engine/interface.py); `config` is a `ServerConfig` (server/config.py), whose defaults apply
when it is left out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jalora.api import CHANNEL_OPTIONS
from jalora.api.v1 import jalora_pb2, jalora_pb2_grpc
from jalora.engine.interface import Engine
from server.config import ServerConfig
from server.engine_worker import EngineWorker
from server.servicer import JaloraServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = jalora_pb2.DESCRIPTOR.services_by_name["Jalora"].full_name  # "jalora.v1.Jalora"


def format_address(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        self.worker = EngineWorker(engine, self.config.max_pending_requests, self.config.tokenizer_threads)
        self.servicer = JaloraServicer(self.worker, self.config, version=_version())
        self.health = health.aio.HealthServicer()
        self.port: int | None = None  # the bound port, once started
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """host:port where the server listens (the bound port once started, so --port 0 shows the real one)."""
        return format_address(self.config.host, self.config.port if self.port is None else self.port)

    async def start(self) -> int:
        """Starts serving; returns the bound port (useful with port=0)."""
        server = grpc.aio.server(
            options=[
                *CHANNEL_OPTIONS,
                ("grpc.so_reuseport", 0),
            ]
        )
        jalora_pb2_grpc.add_JaloraServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        bind = format_address(self.config.host, self.config.port)
        try:
            self.port = server.add_insecure_port(bind) or None  # older grpc returned 0, newer ones raise
        except RuntimeError as e:
            raise OSError(f"could not bind {bind}: {e}") from None
        if self.port is None:
            raise OSError(f"could not bind {bind}")
        self.worker.start()
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("jalora serving on %s", self.address)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets running ones finish for `grace` seconds (default: the config's;
        0 cancels them at once), then stops the engine thread."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace if grace is None else grace)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

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

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def stop(self, grace: float | None = None) -> None:
        """See JaloraServer.stop; then ends the loop and joins the thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
