"""Which calls a server takes, and knowing when none is left (event-loop only).

One gate admits the calls of every front (gRPC and HTTP). Unary calls (Tokenize, GetServerInfo, the
adapter calls; over HTTP every call but a generation) are admitted up to `max_pending_calls` at
once, a bound of their own: a burst of them cannot use up Generate's (`max_pending_requests`, kept by
the engine worker), nor the other way round. Once the server starts draining (`drain`), every new call
fails at once with UNAVAILABLE ("server is shutting down"), and `wait_idle` tells the server when the
calls already running have all ended.
"""

from __future__ import annotations

import asyncio
import functools

from server.errors import ServerOverloadedError, ServerShuttingDownError, abort_with

SHUTTING_DOWN = "server is shutting down; retry on another server"


class CallGate:
    def __init__(self, max_pending_calls: int):
        self.max_pending_calls = max_pending_calls
        self.num_unary = 0  # unary calls running
        self.num_calls = 0  # every call running, Generate streams included
        self.draining = False
        self._idle: asyncio.Event | None = None  # made on the loop by the first wait_idle

    def admit(self, context, unary: bool = False) -> None:
        """Counts a gRPC call in until it terminates (its status sent, or cancelled: gRPC's done callback
        of `context`, so a drain that waits for it also waits for its status), or raises as `enter`."""
        release = self.enter(unary)
        context.add_done_callback(lambda _: release())

    def enter(self, unary: bool = False):
        """Counts a call in until the returned function is called (once; later calls do nothing), or
        raises: ServerShuttingDownError while draining, ServerOverloadedError for a unary call past
        `max_pending_calls`."""
        if self.draining:
            raise ServerShuttingDownError(SHUTTING_DOWN)
        if unary:
            if self.num_unary >= self.max_pending_calls:
                raise ServerOverloadedError(
                    f"server is at capacity: {self.num_unary} unary calls in flight "
                    f"(max_pending_calls={self.max_pending_calls}); retry later"
                )
            self.num_unary += 1
        self.num_calls += 1
        if self._idle is not None:
            self._idle.clear()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(unary)

        return release

    def _release(self, unary: bool) -> None:
        self.num_unary -= unary
        self.num_calls -= 1
        if self.num_calls == 0 and self._idle is not None:
            self._idle.set()

    def drain(self) -> None:
        """From now on every new call is refused."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Returns once no admitted call is running."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if self.num_calls == 0:
            self._idle.set()
        await self._idle.wait()


def unary_call(handler):
    """Wraps a unary RPC handler of a servicer that has a `calls` CallGate: the call is admitted first,
    or refused with the status of the refusal."""

    @functools.wraps(handler)
    async def admitted(self, request, context):
        try:
            self.calls.admit(context, unary=True)
        except Exception as exc:
            await abort_with(context, exc)
        return await handler(self, request, context)

    return admitted
