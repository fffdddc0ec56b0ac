"""Python client of the jalora gRPC server (jalora.v1.Jalora), blocking and asyncio.

Imports only grpc and the generated API code (jalora.api), never JAX: a client process stays light.
"""

from jalora.api import read_token_file
from jalora.client.client import (
    TLS,
    AdapterInfo,
    AsyncClient,
    Client,
    GenerateChunk,
    GenerateResult,
    PipelineJudge,
    PipelineStage,
    ServerError,
    ServerInfo,
    Timings,
    Usage,
    generate_request,
    pipeline_request,
    with_invocation,
)

__all__ = [
    "TLS",
    "AdapterInfo",
    "AsyncClient",
    "Client",
    "GenerateChunk",
    "GenerateResult",
    "PipelineJudge",
    "PipelineStage",
    "ServerError",
    "ServerInfo",
    "Timings",
    "Usage",
    "generate_request",
    "pipeline_request",
    "read_token_file",
    "with_invocation",
]
