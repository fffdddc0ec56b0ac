"""Starts the gRPC server: jalora.v1.Jalora, grpc.health.v1.Health and server reflection.

`JaloraServer` runs on the caller's asyncio loop (`jalora serve`); `ServerThread` runs one on a
loop of its own in a background thread (tests, notebooks, embedding in a synchronous program).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jalora.api import CHANNEL_OPTIONS, DEFAULT_PORT
from jalora.api.v1 import jalora_pb2, jalora_pb2_grpc
from jalora.engine.interface import Engine
from server.engine_worker import EngineWorker
from server.servicer import JaloraServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = jalora_pb2.DESCRIPTOR.services_by_name["Jalora"].full_name  # "jalora.v1.Jalora"


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

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        adapter_roots: Sequence[str] = (),
        max_pending_requests: int = 256,
        model_name: str = "",
    ):
        self.host = host
        self.requested_port = port
        self.worker = EngineWorker(engine, max_pending_requests=max_pending_requests)
        self.servicer = JaloraServicer(
            self.worker, model_name=model_name, adapter_roots=adapter_roots, version=_version()
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

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
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        self.worker.start()
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("jalora serving on %s:%d", self.host, self.port)
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stops taking calls, lets running ones finish for `grace` seconds, then stops the engine thread."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class ServerThread:
    """A JaloraServer on its own event loop in a daemon thread; `with ServerThread(engine) as s: s.port`."""

    def __init__(self, engine: Engine, **kwargs: Any):
        self.server = JaloraServer(engine, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jalora-grpc", daemon=True)
        self.port: int | None = None

    @property
    def target(self) -> str:
        return f"{self.server.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def run(self, coro: Any, timeout: float | None = 60) -> Any:
        """Runs a coroutine on the server's loop (e.g. to read servicer state without races)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
