"""The engine thread: the only thread that touches the LLMEngine.

The asyncio side talks to it through one command queue (add, abort, call) and gets results back
through `loop.call_soon_threadsafe`, so the engine is driven from one thread while any number of
gRPC streams wait on it. Requests that arrive while a step runs join the next step: concurrent
streams are batched by the engine's scheduler, not by this thread.

Admission is bounded by `max_pending_requests` (requests submitted and not yet finished); past it,
`submit` raises ServerOverloadedError at once instead of letting a queue grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jalora.engine.interface import Engine
from jalora.outputs import FinishedRequest, RequestDelta
from server.errors import EngineFailure, ServerOverloadedError, ServerShuttingDownError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What the last delta of a request carries. Times are seconds since the server got the call."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    activation_index: int | None
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    prompt_logprobs: list[dict[int, float]] | None


@dataclass(frozen=True)
class Delta:
    """What one engine step added to one request: new token ids, their text and logprobs."""

    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    completion: Completion | None


class RequestStream:
    """The asyncio end of one request: deltas (or an exception) arrive here in order.

    Lives on the event loop; the engine thread only reaches it through `call_soon_threadsafe`.
    """

    def __init__(self, worker: EngineWorker, request_id: str):
        self.request_id = request_id
        self._worker = worker
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.done = False

    def _push(self, item: Delta | BaseException) -> None:
        if self.done:
            return
        if isinstance(item, BaseException) or item.completion is not None:
            self.done = True
            self._worker._release()
        self._queue.put_nowait(item)

    async def next(self) -> Delta:
        """The next delta; raises the request's error instead if it failed."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        """Asks the engine to drop the request (its blocks return to the pool). Idempotent."""
        if not self.done:
            self._worker._commands.put(("abort", self.request_id))


class _Tracker:
    """Engine-thread state of one request: what has been sent, so that each delta is only the new part."""

    def __init__(self, stream: RequestStream, received: float, loop: asyncio.AbstractEventLoop):
        self.stream = stream
        self.received = received
        self.loop = loop

    def delta(self, out: RequestDelta) -> Delta:
        completion = self._completion(out.finished) if out.finished is not None else None
        return Delta(out.token_ids, out.text, out.logprobs, completion)

    def _completion(self, out: FinishedRequest) -> Completion:
        m = out.metrics
        now = time.monotonic()

        def since(t: float | None) -> float:
            return max(0.0, (t if t is not None else now) - self.received)

        prompt_logprobs = None
        if out.prompt_logprobs is not None:
            # One logprob per prompt token (None for the first): as {token: logprob} like the rest.
            prompt_logprobs = [
                {tok: lp} if lp is not None else {}
                for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs)
            ]
        return Completion(
            finish_reason=out.finish_reason,
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=out.num_output_tokens,
            cached_tokens=out.num_cached_tokens,
            activation_index=out.activation_start,
            queue_seconds=since(getattr(m, "first_scheduled_time", None)),
            time_to_first_token_seconds=since(getattr(m, "first_token_time", None)),
            total_seconds=since(getattr(m, "finished_time", None)),
            prompt_logprobs=prompt_logprobs,
        )


_STOP = ("stop",)


class EngineWorker:
    """Runs an engine in its own thread; every other thread goes through `submit` and `call`."""

    def __init__(self, engine: Engine, max_pending_requests: int = 256):
        if max_pending_requests < 1:
            raise ValueError("max_pending_requests must be >= 1")
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self.num_pending = 0  # event-loop thread only
        # Engine-thread counters, read by tests and logs: steps run, the most requests one step
        # advanced (> 1 means concurrent streams shared steps), aborts that reached the engine.
        self.num_steps = 0
        self.max_outputs_per_step = 0
        self.num_aborted = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._trackers: dict[str, _Tracker] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="jalora-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Aborts what is in flight and joins the thread."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(
        self, request_id: str, prompt: str | list[int], params: Any, adapter: str | None
    ) -> RequestStream:
        """Queues a request for the engine. Must be called on the event loop that reads the stream.

        Raises ServerOverloadedError when `max_pending_requests` requests are already in flight.
        Engine validation errors (bad prompt, unknown adapter, ...) come out of the stream's first
        `next()`, since only the engine thread may call `add_request`.
        """
        if self.num_pending >= self.max_pending_requests:
            raise ServerOverloadedError(
                f"server is at capacity: {self.num_pending} requests in flight "
                f"(max_pending_requests={self.max_pending_requests}); retry later"
            )
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id)
        self.num_pending += 1
        self._commands.put(("add", request_id, prompt, params, adapter, stream, time.monotonic(), loop))
        return stream

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Runs `fn(engine)` on the engine thread between two steps and returns its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._commands.put(("call", fn, future, loop))
        return await future

    def _release(self) -> None:
        self.num_pending -= 1

    # ---- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception:  # a bug here must not silence every stream: log and go on
                logger.exception("engine loop iteration failed")

    def _iterate(self) -> bool:
        """One loop turn: take commands, then step if anything is in flight. False once stopped."""
        # Block while idle; once requests are in flight only take what is already queued.
        busy = bool(self._trackers) or self._engine_busy()
        try:
            command = self._commands.get(block=not busy)
        except queue.Empty:
            command = None
        while command is not None:
            if command is _STOP:
                self._abort_all(ServerShuttingDownError("the server is shutting down"))
                return False
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if self._trackers or self._engine_busy():
            self._step()
        return True

    def _engine_busy(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:  # a broken engine must not kill the thread
            logger.exception("has_unfinished_requests failed")
            return False

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, adapter, stream, received, loop = command
            try:
                self.engine.add_request(request_id, prompt, params, adapter=adapter)
            except Exception as exc:  # reported to that request only
                _post(loop, stream._push, exc)
                return
            self._trackers[request_id] = _Tracker(stream, received, loop)
        elif kind == "abort":
            request_id = command[1]
            if request_id in self._trackers:
                self.num_aborted += 1
                self._safe_abort(request_id)
        elif kind == "call":
            _, fn, future, loop = command
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # handed to the caller
                result, error = None, exc
            _post(loop, _resolve, future, result, error)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # fail this step's requests, keep serving
            logger.exception("engine step failed; failing the %d requests in flight", len(self._trackers))
            self._abort_all(EngineFailure(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        self.num_steps += 1
        self.max_outputs_per_step = max(self.max_outputs_per_step, len(outputs))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta | BaseException]]] = {}
        for out in outputs:
            tracker = self._trackers.get(out.request_id)
            if tracker is None:
                continue
            try:
                item: Delta | BaseException = tracker.delta(out)
            except Exception as exc:
                logger.exception("could not convert the output of %s", out.request_id)
                item = EngineFailure(f"bad engine output: {type(exc).__name__}: {exc}")
                self._safe_abort(out.request_id)
            if out.finished or isinstance(item, BaseException):
                del self._trackers[out.request_id]
            by_loop.setdefault(tracker.loop, []).append((tracker.stream, item))
        if self._trackers and not self._engine_busy():
            # The engine forgot requests without finishing them: do not leave their streams hanging.
            self._abort_all(EngineFailure("engine dropped the request"))
        for loop, items in by_loop.items():
            _post(loop, _deliver, items)

    def _safe_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("abort_request(%s) failed", request_id)

    def _abort_all(self, error: BaseException) -> None:
        for request_id, tracker in list(self._trackers.items()):
            self._safe_abort(request_id)
            _post(tracker.loop, tracker.stream._push, error)
        self._trackers.clear()
        # Drain the engine's own final outputs of the aborted requests so their blocks are freed.
        for _ in range(4):
            if not self._engine_busy():
                break
            try:
                self.engine.step()
            except Exception:
                logger.exception("engine step failed while draining aborted requests")
                break


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Schedules fn(*args) on `loop`; a loop that has closed (its caller is gone) is not an error."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        logger.debug("event loop closed; dropping a result")


def _deliver(items: list[tuple[RequestStream, Delta | BaseException]]) -> None:
    for stream, item in items:
        stream._push(item)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
