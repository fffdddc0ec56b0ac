"""The one place that turns an exception into a gRPC status code and message.

Every RPC handler funnels its failures through `status_for`, so a client sees the same code for the
same mistake whichever RPC it made, and an unexpected exception becomes INTERNAL for that call only.
Every message is cut to MAX_ERROR_MESSAGE_CHARS: it travels in trailing metadata, whose size gRPC
bounds (past the bound the call would end in RESOURCE_EXHAUSTED instead of its own status).
"""

from __future__ import annotations

import logging

import grpc

from jalora.api import FIELD_METADATA_KEY
from jalora.api.limits import MAX_ERROR_MESSAGE_CHARS
from jalora.errors import (
    AdapterNotFoundError,
    AdapterPathError,
    CapacityError,
    InvalidRequestError,
    PreconditionError,
)

logger = logging.getLogger(__name__)


class MalformedRequestError(Exception):
    """The bytes of a call are not its request message (INVALID_ARGUMENT, no field to name)."""


class ServerOverloadedError(CapacityError):
    """The admission bound of the server is reached (RESOURCE_EXHAUSTED)."""


class ServerShuttingDownError(RuntimeError):
    """The server stopped while the request ran (UNAVAILABLE: the client may retry elsewhere)."""


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the requests in that step are failed, the server goes on."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """Returns (code, message, field) for `exc`; field is the request field at fault, if known."""
    code, message, field = _classify(exc)
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        cut = " ... (cut)"
        message = message[: MAX_ERROR_MESSAGE_CHARS - len(cut)] + cut
    return code, message, field


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    # Subclasses first: PreconditionError, AdapterNotFoundError and AdapterPathError are InvalidRequestErrors.
    if isinstance(exc, AdapterPathError):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc), exc.field
    if isinstance(exc, PreconditionError):  # a missing invocation, an adapter still in use
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc), exc.field
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), exc.field
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field
    if isinstance(exc, MalformedRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server is at capacity", None
    if isinstance(exc, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), "path"
    if isinstance(exc, ServerShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, EngineFailure):
        return grpc.StatusCode.INTERNAL, str(exc), None
    logger.exception("unexpected error while serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", None


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status of `exc` (raises, as `context.abort` does)."""
    code, message, field = status_for(exc)
    if field is not None:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
    await context.abort(code, message)
