"""The server's logs: one access line per Generate call, request ids on every line of a call, JSON lines
on request (`jalora serve --log-format json`), and repeated errors rate-limited.

- `log_access` writes the access line to the `jalora.access` logger (INFO): the call's request id, the
  adapter, prompt / completion / cached tokens, the finish reason, the gRPC status and the duration since
  the server received the call.
- `REQUEST_ID` holds the request id of the call being served (a context variable, so each RPC's task
  has its own); `RequestIdFilter` copies it onto every record logged within the call.
- `JsonFormatter` writes a record as one JSON object per line: time, level, logger, message, the
  request id, the fields a call passed as `extra=`, and the traceback if any.
- `RateLimitFilter` lets the first `burst` records of one message (its logger, level and format string)
  through per `period` seconds and drops the rest, counting them; the first record let through after a
  period with drops says how many were dropped (`suppressed` in JSON).

`configure` installs them on the root logger's handler (the `jalora` command calls it); `say` writes a
progress line of `jalora serve` as text or, in JSON mode, as a log record.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from jalora.outputs import FinishedRequest

if TYPE_CHECKING:  # the `jalora` command imports this module before it needs grpc
    import grpc

ACCESS_LOGGER = "jalora.access"
STATUS_LOGGER = "jalora.cli"  # serve's progress lines (loading, adapters, shutting down) in JSON mode
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("jalora_request_id", default=None)
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_access = logging.getLogger(ACCESS_LOGGER)
# What every LogRecord has; anything else on a record came from `extra=` (or a filter) and goes into JSON.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def log_access(
    request_id: str,
    adapter: str | None,
    finished: FinishedRequest | None,
    status: str,
    duration: float,
    rpc: str = "Generate",
) -> None:
    """One line for a finished generation call (`rpc`: Generate over gRPC, the route over HTTP);
    `finished` is None for a call that ended without a final record (a rejected request, a cancelled
    or failed call)."""
    if not _access.isEnabledFor(logging.INFO):
        return
    fields = {
        "request_id": request_id,
        "rpc": rpc,
        "status": status,
        "adapter": adapter,
        "prompt_tokens": None if finished is None else len(finished.prompt_token_ids),
        "completion_tokens": None if finished is None else finished.num_output_tokens,
        "cached_tokens": None if finished is None else finished.num_cached_tokens,
        "activation_index": None if finished is None else finished.activation_start,
        "finish_reason": None if finished is None else finished.finish_reason,
        "duration_s": round(duration, 6),
    }
    if finished is None:
        text = "-"
    else:
        text = (
            f"prompt={fields['prompt_tokens']} completion={fields['completion_tokens']} "
            f"cached={fields['cached_tokens']} finish={fields['finish_reason']}"
        )
    _access.info(
        "%s %s id=%s adapter=%s %s %.3fs", rpc, status, request_id, adapter or "-", text, duration, extra=fields
    )


def call_status(context: grpc.aio.ServicerContext, ending: BaseException | None) -> str:
    """The gRPC status name of a call whose handler is ending with `ending` (None: it returned): the code
    it aborted with, else DEADLINE_EXCEEDED or CANCELLED for a handler cancelled under it (a passed
    deadline, a client gone: grpc cancels the task, and `context.cancelled()` does not say so yet), else OK."""
    code = context.code()
    if code is not None:
        return getattr(code, "name", str(code))  # a grpc.StatusCode
    if isinstance(ending, asyncio.CancelledError | GeneratorExit):
        left = context.time_remaining()
        return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    return "OK" if ending is None else "UNKNOWN"


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` from `REQUEST_ID` where the record has none (the logging call's context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class RateLimitFilter(logging.Filter):
    """Lets at most `burst` records of one message through per `period` seconds, from `level` up.

    A message is its logger, level and format string (`record.msg`, before the arguments are put in),
    so one error repeated with different ids or counts is one message. Windows are fixed: a message's
    window opens with its first record; once `period` has passed, the next record opens a new one and,
    if records were dropped in the last, says how many (`record.suppressed`, and in the text).
    `clock` is time.monotonic unless a caller needs another.
    """

    def __init__(
        self, burst: int = 5, period: float = 60.0, level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic, max_messages: int = 1024,
    ):  # fmt: skip
        super().__init__()
        if burst < 1 or period <= 0:
            raise ValueError(f"burst must be >= 1 and period > 0, got {burst}, {period}")
        self.burst, self.period, self.level, self.clock = burst, period, level, clock
        self.max_messages = max_messages
        self._windows: dict[tuple, list] = {}  # message -> [window start, records let through, records dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg))
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period:
            dropped = 0 if window is None else window[2]
            if window is None and len(self._windows) >= self.max_messages:
                self._forget_closed(now)
            self._windows[key] = [now, 1, 0]
            if dropped:
                record.suppressed = dropped
                record.msg = f"{record.msg} [{dropped} more like this suppressed in the last {self.period:g}s]"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def suppressed(self) -> int:
        """Records dropped in the open windows (not yet reported)."""
        return sum(w[2] for w in self._windows.values())

    def _forget_closed(self, now: float) -> None:
        """Bounds the memory: messages whose window has closed go (their drop counts are lost)."""
        self._windows = {k: w for k, w in self._windows.items() if now - w[0] < self.period}
        while len(self._windows) >= self.max_messages:  # all still open: the oldest goes
            del self._windows[min(self._windows, key=lambda k: self._windows[k][0])]


def configure(level: int = logging.WARNING, log_format: str = "text", access_log: bool = False) -> None:
    """The process's logging for the `jalora` command: one stderr handler on the root logger, in
    `log_format`, with request ids and the rate limit; `access_log` shows the access lines (INFO) whatever
    `level` is."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RateLimitFilter())
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where the root logger has handlers already
    if access_log:
        _access.setLevel(logging.INFO)
    if log_format == "json":
        logging.getLogger(STATUS_LOGGER).setLevel(logging.INFO)  # `say`'s lines, shown as in text mode
        logging.captureWarnings(True)  # Python warnings as records too, not lines of their own


def say(message: str) -> None:
    """A progress line for the operator (the model loads, the server stops): printed to stderr, or, once
    `configure` set up JSON logs, logged (INFO on `jalora.cli`) so that stderr stays JSON lines."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        logging.getLogger(STATUS_LOGGER).info(message)
    else:
        print(message, file=sys.stderr, flush=True)
