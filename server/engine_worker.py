"""The engine thread: the only thread that touches the engine.

The asyncio side talks to it through one queue of typed commands (`AddRequest`, `AbortRequest`,
`EngineCall`, `LimitSteps`, `Stop`) and gets results back through `loop.call_soon_threadsafe`, so the
engine is driven from one thread while any number of gRPC streams wait on it. The thread only uses
the `Engine` protocol (jalora/engine/interface.py). Requests that arrive while a step runs join the
next step: concurrent streams are batched by the engine's scheduler, not by this thread.

Each `RequestDelta` of a step goes to its request's `RequestStream` as the engine made it; turning it
into a message (and measuring timings) is server/convert.py's job.

The engine thread runs only what is cheap per step: admitting a request whose prompt is already token
ids, installing an adapter already read, steps, aborts, small calls. Work whose cost grows with what a
client sends runs beside it, on host threads, through the engine's thread-safe methods
(jalora/engine/interface.py): a text prompt is tokenized (`Engine.encode_prompt`) on the host pool
(`tokenizer_threads` threads, so at most that many tokenizations run at once) before its `AddRequest` is
queued, and callers run Tokenize, chat templates (`run_host`) and adapter file reads (`prepare_adapter`,
one thread of its own) there too. A request that waits for a tokenization of its own thus never holds
up the streams already running, nor the requests behind it.

Admission is bounded by `max_pending_requests` (requests submitted and not yet finished, tokenizing
ones included); past it, `submit` raises ServerOverloadedError at once instead of letting a queue grow
without bound. After `stop`, every command, submission and host job fails with ServerShuttingDownError,
and so does everything still waiting on one.

An optional `StepObserver` (the server's metrics, server/metrics.py) gets the engine's `stats()` after
every step, request added and abort, with the deltas of the step, on this thread and before the deltas
go out: whatever a client has received is already counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from jalora.engine.interface import EncodedPrompt, Engine, EngineStats
from jalora.errors import EngineLostError, InvalidRequestError
from jalora.outputs import RequestDelta
from jalora.sampling_params import SamplingParams
from server.errors import (
    EngineFailure,
    EngineUnavailable,
    RequestCancelledError,
    ServerOverloadedError,
    ServerShuttingDownError,
)

if TYPE_CHECKING:
    from jalora.adapters.manager import PreparedAdapter

logger = logging.getLogger(__name__)

T = TypeVar("T")

SHUTTING_DOWN = "the server is shutting down"


class RequestStream:
    """The asyncio end of one request: its deltas (or an exception) arrive here in order.

    Lives on the event loop that submitted it; the engine thread only reaches it through
    `call_soon_threadsafe`.
    """

    def __init__(self, worker: EngineWorker, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self._worker = worker
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self.done = False
        self.aborted = False  # event-loop thread only: abort() was called

    def _push(self, item: RequestDelta | BaseException) -> None:
        if self.done:
            return
        if isinstance(item, BaseException) or item.finished is not None:
            self.done = True
            self._worker._release()
        self._queue.put_nowait(item)

    def next_ready(self) -> RequestDelta | None:
        """The next delta if one has arrived already, else None (never waits); raises like `next`."""
        if self._queue.empty():
            return None
        item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item

    async def next(self) -> RequestDelta:
        """The next delta (the last one has `finished` set); raises the request's error if it failed."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        """Asks the engine to drop the request (its blocks return to the pool), or, while its prompt is
        still being tokenized, not to admit it at all. Idempotent."""
        if not self.done and not self.aborted:
            self.aborted = True
            try:
                self._worker._put(AbortRequest(self.request_id))
            except ServerShuttingDownError:
                pass  # the engine thread is stopping: it fails (and frees) every request itself


# ---- commands: what the event-loop side (or a test) asks of the engine thread ---------------------


@dataclasses.dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: EncodedPrompt
    params: SamplingParams
    adapter: str | None
    stream: RequestStream
    session: dict | None = None  # Engine.add_request's session keywords, when the request names a session


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclasses.dataclass(frozen=True)
class EngineCall:
    """Runs `fn(engine)` between two steps; its result (or exception) resolves `future` on its loop."""

    fn: Callable[[Engine], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclasses.dataclass(frozen=True)
class LimitSteps:
    """From now on run at most `steps` more engine steps (None: no limit); see EngineWorker.limit_steps."""

    steps: int | None


@dataclasses.dataclass(frozen=True)
class Stop:
    """Fail what is in flight with `error` (a ServerShuttingDownError) and end the thread."""

    error: BaseException


Command = AddRequest | AbortRequest | EngineCall | LimitSteps | Stop


class StepObserver(Protocol):
    def observe(self, stats: EngineStats, deltas: Sequence[RequestDelta], now: float) -> None:
        """Called on the engine thread: `stats` just taken, `deltas` the step's (empty after an add or
        an abort), `now` time.monotonic() when the step returned. Must be quick: the engine waits."""


class EngineWorker:
    """Runs an engine in its own thread; every other thread goes through `submit` and `call`."""

    def __init__(
        self,
        engine: Engine,
        max_pending_requests: int,
        tokenizer_threads: int = 4,
        observer: StepObserver | None = None,
    ):
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self.observer = observer
        self.num_pending = 0  # event-loop thread only
        # Engine-thread counters, read by tests and logs: steps run, the most requests one step
        # advanced (> 1 means concurrent streams shared steps), aborts that reached the engine.
        self.num_steps = 0
        self.max_outputs_per_step = 0
        self.num_aborted = 0
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only: requests in the engine
        self._steps_left: int | None = None  # engine thread only; see limit_steps
        self._thread = threading.Thread(target=self._run, name="jalora-engine", daemon=True)
        self._host = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="jalora-host")
        self._adapter_io = ThreadPoolExecutor(1, thread_name_prefix="jalora-adapter-io")
        # Guards `_closed` and `_waiting`: no command is queued after Stop, no host job starts after stop().
        self._lock = threading.Lock()
        self._closed = False
        self._waiting: set[tuple[asyncio.Future, asyncio.AbstractEventLoop]] = set()  # host jobs awaited

    # ---- any thread --------------------------------------------------------------------------------

    def start(self) -> None:
        self._observe()  # (before the thread: the metrics hold the engine's state from the start on)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0, message: str = SHUTTING_DOWN) -> None:
        """Fails what is in flight (requests in the engine, calls and host jobs waited on) with
        ServerShuttingDownError(message), and joins the engine thread. Idempotent."""
        error = ServerShuttingDownError(message)
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._commands.put(Stop(error))
            waiting, self._waiting = self._waiting, set()
        for future, loop in waiting:
            _post(loop, _resolve, future, None, error)
        self._host.shutdown(wait=False, cancel_futures=True)
        self._adapter_io.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _put(self, command: Command) -> None:
        with self._lock:
            if self._closed:
                raise ServerShuttingDownError(SHUTTING_DOWN)
            self._commands.put(command)

    def limit_steps(self, steps: int | None) -> None:
        """Lets the engine thread run at most `steps` more steps; None lifts the limit (the default).

        A test seam: while the limit is spent, the thread still takes commands (adds, aborts, calls
        such as GetServerInfo) but runs no step, so no request can advance or finish. Tests use it to
        make an event certain instead of racing it, e.g. that a request is still running when its
        cancellation reaches the engine. Commands are taken in order, so a limit set before a request
        is submitted holds from that request's first step.
        """
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be None or an integer >= 0, got {steps!r}")
        with contextlib.suppress(ServerShuttingDownError):  # stopped: no step will run again anyway
            self._put(LimitSteps(steps))

    # ---- event-loop side -------------------------------------------------------------------------

    def submit(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, adapter: str | None,
        session: dict | None = None, max_tokens_check: tuple[str, int] | None = None,
    ) -> RequestStream:  # fmt: skip
        """Queues a request for the engine. Must be called on the event loop that reads the stream.

        Raises ServerOverloadedError when `max_pending_requests` requests are already in flight (or
        ServerShuttingDownError after `stop`). A text prompt is tokenized on the host pool first; token
        ids are checked here, their length before their values. Prompt errors and the engine's
        validation errors (unknown adapter, ...) come out of the stream's first `next()`. `session`: the
        keywords `session`, `session_ttl`, `end_session` of `Engine.add_request`. With `max_tokens_check` (the
        caller's name of an explicit max_tokens, and max_model_len), a prompt that fits but leaves less room than
        max_tokens is refused naming it, once the prompt is encoded (as OpenAI's API does; without, the request
        ends at max_model_len, "length").
        """
        if self._closed:
            raise ServerShuttingDownError(SHUTTING_DOWN)
        if self.num_pending >= self.max_pending_requests:
            raise ServerOverloadedError(
                f"server is at capacity: {self.num_pending} requests in flight "
                f"(max_pending_requests={self.max_pending_requests}); retry later"
            )
        stream = RequestStream(self, request_id, asyncio.get_running_loop())

        def _room(encoded):
            if max_tokens_check is None:
                return encoded
            field, limit = max_tokens_check
            room = limit - len(encoded.token_ids)
            if 0 < room < params.max_tokens:  # (no room at all: the prompt's own error)
                raise InvalidRequestError(field, f"is {params.max_tokens}, but the prompt's {len(encoded.token_ids)} "
                                          f"tokens leave room for {room} within max_model_len {limit}")  # fmt: skip
            return encoded

        truncate = params.truncate_prompt_tokens
        self.num_pending += 1  # from here on every outcome reaches the stream, which releases it
        try:
            if isinstance(prompt, str):
                # Skipped if the call ends while the job waits for a thread: nobody wants the tokens then.
                def encode_prompt():
                    return None if stream.aborted else _room(self.engine.encode_prompt(prompt, truncate))

                encode = self._offload(self._host, encode_prompt)
                encode.add_done_callback(lambda job: self._admit(job, request_id, params, adapter, stream, session))
            else:
                encoded = _room(self.engine.encode_prompt(prompt, truncate))
                self._put(AddRequest(request_id, encoded, params, adapter, stream, session))
        except Exception as exc:  # the prompt's error, or a stop: that request's alone
            stream._push(exc)
        return stream

    def _admit(self, job: asyncio.Future, request_id: str, params, adapter, stream: RequestStream, session) -> None:
        """Event loop: queues a request whose prompt the host pool encoded, unless its call has ended
        (checked on this loop, where abort() runs: no AbortRequest can precede the add)."""
        try:
            encoded = job.result()
            if stream.aborted:
                raise RequestCancelledError("the call ended before its prompt was tokenized")
            self._put(AddRequest(request_id, encoded, params, adapter, stream, session))
        except Exception as exc:  # the prompt's error, or a stop: that request's alone
            stream._push(exc)

    def call_nowait(self, fn: Callable[[Engine], Any]) -> None:
        """Queues `fn(engine)` between two steps (after every command queued before it) without waiting;
        its result or error is dropped. For clean-up that must not wait (a cancelled call's finally)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._put(EngineCall(fn, future, loop))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Runs `fn(engine)` on the engine thread between two steps and returns its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._put(EngineCall(fn, future, loop))
        return await future

    async def run_host(self, fn: Callable[[Engine], T]) -> T:
        """Runs `fn(engine)` on the host pool and returns its result: for work whose cost grows with the
        request (tokenizing, rendering a chat template) through the engine's thread-safe methods only."""
        return await self._offload(self._host, lambda: fn(self.engine))

    async def prepare_adapter(self, path: str, roots: Sequence[str] | None = None) -> PreparedAdapter:
        """Reads and validates an adapter directory on a thread of its own (`Engine.prepare_adapter`), so
        that neither the engine thread nor tokenization waits on its files; the engine thread then only
        installs it (`call(lambda e: e.load_adapter(name, prepared))`)."""
        return await self._offload(self._adapter_io, lambda: self.engine.prepare_adapter(path, roots))

    def _offload(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> asyncio.Future:
        """A future of this loop that `fn()` on `executor` resolves (or `stop` fails)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = (future, loop)

        def job() -> None:
            try:
                result, error = fn(), None
            except Exception as exc:  # handed to the caller
                result, error = None, exc
            _post(loop, _resolve, future, result, error)

        with self._lock:
            if self._closed:
                raise ServerShuttingDownError(SHUTTING_DOWN)
            self._waiting.add(key)
            executor.submit(job)
        future.add_done_callback(lambda _: self._forget(key))
        return future

    def _forget(self, key: tuple[asyncio.Future, asyncio.AbstractEventLoop]) -> None:
        with self._lock:
            self._waiting.discard(key)

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

    def _should_step(self) -> bool:
        return self._steps_left != 0 and (bool(self._streams) or self._engine_busy())

    def _iterate(self) -> bool:
        """One loop turn: take commands, then step if anything is in flight. False once stopped."""
        # Block while there is nothing to step (waking when an idle pipeline session is due to expire);
        # otherwise only take what is already queued.
        block = not self._should_step()
        try:
            wait = self._expire_sessions() if block else None
            command: Command | None = self._commands.get(block=block, timeout=wait)
        except queue.Empty:
            command = None
        while command is not None:
            if isinstance(command, Stop):
                self._abort_all(command.error)
                return False
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if self._should_step():
            self._step()
            if self._steps_left is not None:
                self._steps_left -= 1
        return True

    def _expire_sessions(self) -> float | None:
        """Ends the engine's pipeline sessions idle past their TTL; seconds until the next may expire."""
        expire = getattr(self.engine, "expire_sessions", None)  # (test doubles of an engine may lack it)
        try:
            ended, wait = expire() if expire is not None else (0, None)
        except Exception:  # a broken engine must not kill the thread
            logger.exception("expire_sessions failed")
            return None
        if ended:
            self._observe()  # the metrics see them gone
        return wait

    def _engine_busy(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:  # a broken engine must not kill the thread
            logger.exception("has_unfinished_requests failed")
            return False

    def _handle(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            try:
                kw = command.session or {}  # only a request with a session passes them
                self.engine.add_request(
                    command.request_id, command.prompt, command.params, adapter=command.adapter, **kw
                )
            except Exception as exc:  # reported to that request only
                _post(command.stream.loop, command.stream._push, exc)
                return
            self._streams[command.request_id] = command.stream
            self._observe()
        elif isinstance(command, AbortRequest):
            if command.request_id in self._streams:
                self.num_aborted += 1
                self._safe_abort(command.request_id)
                self._observe()
        elif isinstance(command, EngineCall):
            try:
                result, error = command.fn(self.engine), None
            except Exception as exc:  # handed to the caller
                result, error = None, exc
            _post(command.loop, _resolve, command.future, result, error)
        elif isinstance(command, LimitSteps):
            self._steps_left = command.steps
        else:
            raise TypeError(f"unknown engine command {command!r}")

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except Exception as exc:  # fail this step's requests, keep serving
            logger.exception("engine step failed; failing the %d requests in flight", len(self._streams))
            failure = EngineUnavailable if isinstance(exc, EngineLostError) else EngineFailure
            self._abort_all(failure(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        self.num_steps += 1
        self.max_outputs_per_step = max(self.max_outputs_per_step, len(deltas))
        self._observe(deltas)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestDelta]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finished is not None:
                del self._streams[delta.request_id]
            by_loop.setdefault(stream.loop, []).append((stream, delta))
        if self._streams and not self._engine_busy():
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
        for request_id, stream in list(self._streams.items()):
            self._safe_abort(request_id)
            _post(stream.loop, stream._push, error)
        self._streams.clear()
        # Drain the engine's own final deltas of the aborted requests so their blocks are freed.
        for _ in range(4):
            if not self._engine_busy():
                break
            try:
                self._observe(self.engine.step())
            except Exception:
                logger.exception("engine step failed while draining aborted requests")
                break

    def _observe(self, deltas: Sequence[RequestDelta] = ()) -> None:
        if self.observer is None:
            return
        now = time.monotonic()
        try:
            self.observer.observe(self.engine.stats(), deltas, now)
        except Exception:  # metrics must never stop the engine
            logger.exception("recording engine stats failed")


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Schedules fn(*args) on `loop`; a loop that has closed (its caller is gone) is not an error."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        logger.debug("event loop closed; dropping a result")


def _deliver(items: list[tuple[RequestStream, RequestDelta]]) -> None:
    for stream, delta in items:
        stream._push(delta)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller gave up (cancelled), or stop() failed it first
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
