"""The one place that turns an exception into a status: a gRPC status code (`status_for`) and, for the
HTTP front, the HTTP status and OpenAI error type that go with that code (`http_status_for`).

Every RPC handler funnels its failures through `status_for`, so a client sees the same code for the
same mistake whichever RPC it made, and an unexpected exception becomes INTERNAL for that call only.
The HTTP front classifies through the same function, so both fronts agree on what a failure is.
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
    InvocationNotFoundError,
    PreconditionError,
    SessionNotFoundError,
)

logger = logging.getLogger(__name__)


class MalformedRequestError(Exception):
    """The bytes of a call are not its request message (INVALID_ARGUMENT, no field to name)."""


class RequestTooLargeError(MalformedRequestError):
    """A request body over the HTTP front's size bound (HTTP 413; gRPC bounds message sizes itself)."""


class ServerOverloadedError(CapacityError):
    """The admission bound of the server is reached (RESOURCE_EXHAUSTED)."""


class RequestCancelledError(Exception):
    """The call ended (its client went away, its deadline passed) before its request reached the engine:
    CANCELLED, HTTP 499 (the client closed the request). Not a server error: no traceback is logged."""


class ServerShuttingDownError(RuntimeError):
    """The server stopped while the request ran (UNAVAILABLE: the client may retry elsewhere)."""


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the requests in that step are failed, the server goes on."""


class EngineUnavailable(EngineFailure):
    """The engine can step no more (a multi-host engine lost a process): UNAVAILABLE, health NOT_SERVING."""


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
    if isinstance(exc, AdapterNotFoundError | SessionNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), exc.field
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field
    if isinstance(exc, MalformedRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), None
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server is at capacity", None
    if isinstance(exc, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc), "path"
    if isinstance(exc, RequestCancelledError):
        return grpc.StatusCode.CANCELLED, str(exc), None
    if isinstance(exc, ServerShuttingDownError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, EngineUnavailable):  # a lost host: another server may answer
        return grpc.StatusCode.UNAVAILABLE, str(exc), None
    if isinstance(exc, EngineFailure):
        return grpc.StatusCode.INTERNAL, str(exc), None
    logger.exception("unexpected error while serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", None


# gRPC code -> (HTTP status, OpenAI error type).
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.CANCELLED: (499, "client_closed_request"),  # (nginx's status: nobody reads the body)
}


def http_status_of(code: grpc.StatusCode) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a gRPC status code."""
    return _HTTP.get(code, (500, "server_error"))


def http_status_for(exc: BaseException) -> tuple[int, str, str, str, str | None]:
    """(HTTP status, OpenAI error type, code, message, field) for `exc`: the gRPC classification above,
    told in HTTP's terms; `code` is the gRPC status name in lower case.

    Two refinements where HTTP has a closer status: a prompt without its aLoRA invocation is the
    request's fault (400, not 409: the request, not the server's state, must change), and a full set of
    adapter slots is a conflict with the server's state (409), not overload (429 asks to retry the same
    request later)."""
    code, message, field = status_for(exc)
    status, kind = http_status_of(code)
    if isinstance(exc, RequestTooLargeError):
        status = 413
    elif isinstance(exc, InvocationNotFoundError):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, CapacityError) and not isinstance(exc, ServerOverloadedError):
        status, kind = 409, "conflict_error"
    return status, kind, code.name.lower(), message, field


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status of `exc` (raises, as `context.abort` does)."""
    code, message, field = status_for(exc)
    if field is not None:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, field),))
    await context.abort(code, message)
