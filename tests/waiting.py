"""Waiting for an event that a test has made certain (a step it controls, a request that cannot finish).

HANG only ends a run that would otherwise hang: it is never a margin an event has to beat."""

from __future__ import annotations

import time
from collections.abc import Callable

HANG = 120.0  # seconds: a wait for a certain event that lasts this long is a hang


def until(condition: Callable[[], bool], what: str, timeout: float = HANG, poll: float = 0.01) -> None:
    """Returns once `condition()` holds; fails the test, naming `what`, if it still does not after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
