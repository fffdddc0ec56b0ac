"""Python client of the jalora gRPC server (jalora.v1.Jalora), blocking and asyncio.

Imports only grpc and the generated API code (jalora.api), never JAX: a client process stays light.
"""

from jalora.client.client import (
    AdapterInfo,
    AsyncClient,
    Client,
    GenerateChunk,
    GenerateResult,
    ServerError,
    ServerInfo,
    Timings,
    Usage,
    generate_request,
    with_invocation,
)

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "Client",
    "GenerateChunk",
    "GenerateResult",
    "ServerError",
    "ServerInfo",
    "Timings",
    "Usage",
    "generate_request",
    "with_invocation",
]
