"""The steps on the device, and the tokens they sampled that the host has not read yet.

With async scheduling (chosen at construction) `LLMEngine.step()` enqueues step N+1 before it reads
step N back, so the host's work (scheduling, input building, dispatch, output handling) overlaps the
device's instead of adding to it. A token sampled by a step still on the device is *pending*: the
request counts it (`Request.num_tokens_with_pending`), the next step feeds it from that step's device
output instead of from the host, and it joins the request's token ids when the step is read back.
In synchronous mode every step is read back right after it is enqueued, and nothing is ever pending.

This class is the only writer of `Request.pending`, and of the advance of `Request.num_computed_tokens`
by a dispatched step (and its rollback); the scheduler positions `num_computed_tokens` when it admits
or preempts a request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import jax

from jalora.adapters.manager import AdapterStacks
from jalora.engine.model_runner import ModelRunner, StepOutputs, StepResult
from jalora.engine.request import Request, Status
from jalora.engine.scheduler import ScheduledBatch


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step whose results the host has not (fully) applied."""

    step_id: int
    requests: list[Request]
    num_tokens: list[int]  # tokens each request computes in the step
    starts: list[int]  # each request's num_computed_tokens before the step
    out: StepOutputs | None = None
    applied: int = 0  # leading rows whose results the host has applied


@dataclasses.dataclass(frozen=True)
class Row:
    """One request's part of a step that is read back."""

    request: Request
    index: int  # the request's row in the step's per-sequence outputs
    first_row: int  # the row of its first token in the step's per-token outputs
    start: int  # its num_computed_tokens before the step
    num_tokens: int
    sampled: bool  # the step sampled the request's next token (else it was a prefill chunk)


class QueuedStep(NamedTuple):
    """What the next step reads of the step still on the device (`StepPipeline.queued`)."""

    step_id: int  # the id that requests' pending tokens name (`Request.pending`)
    tokens: jax.Array  # i32[max_num_seqs] its sampled tokens, on the device (not waited for)


class StepPipeline:
    def __init__(self, runner: ModelRunner, async_scheduling: bool):
        self.runner = runner
        self.async_scheduling = async_scheduling
        self._queued: InFlightStep | None = None  # async: the step enqueued by the last step() call
        self._next_id = 0

    @property
    def busy(self) -> bool:
        """True while a step is on the device that a later step() call reads back."""
        return self._queued is not None

    @property
    def queued(self) -> QueuedStep | None:
        """The step the last `step()` call left on the device (async scheduling), read-only: its id and
        its sampled tokens, which the next step takes as `ModelRunner.prepare(batch, prev_step=step_id)`
        and `ModelRunner.launch(..., prev_tokens=tokens)`. None when no step is queued (synchronous
        mode, or idle). For tools that replay the next step outside the engine loop (bench/harness.py)."""
        q = self._queued
        return None if q is None or q.out is None else QueuedStep(q.step_id, q.out.tokens)

    def dispatch(self, batch: ScheduledBatch, adapters: AdapterStacks) -> InFlightStep | None:
        """Enqueues `batch` (its pending tokens fed by the queued step); None if the batch is empty.

        On failure nothing of the batch stays counted and the queued step stays queued."""
        if not batch.requests:
            return None
        self._next_id += 1
        starts = [r.num_computed_tokens for r in batch.requests]
        step = InFlightStep(self._next_id, batch.requests, batch.num_tokens, starts)
        prev = self._queued
        try:
            step.out = self.runner.dispatch(
                batch, adapters, None if prev is None else prev.out.tokens, None if prev is None else prev.step_id
            )
            # From here on the step's KV writes are queued on the device: count them as computed (the
            # next step is scheduled on top of them), and note the tokens it will sample.
            for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
                req.num_computed_tokens += n
                if req.num_computed_tokens >= req.num_tokens_with_pending:
                    req.pending.append((step.step_id, i))
        except BaseException:
            self._rollback(step)
            raise
        return step

    def take_ready(self, new: InFlightStep | None) -> list[InFlightStep]:
        """The steps to read back now: the queued one in async mode (`new` stays queued), else `new`."""
        if not self.async_scheduling:
            return [new] if new is not None else []
        prev, self._queued = self._queued, new
        return [prev] if prev is not None else []

    def read(self, step: InFlightStep) -> StepResult:
        """Waits for `step` and brings its results to the host."""
        return self.runner.fetch(step.out)

    def rows(self, step: InFlightStep) -> Iterator[Row]:
        """The rows of a read-back step whose request is still alive, in order, each marked applied
        once the caller asks for the next one."""
        first_row = 0
        for i, (req, n, start) in enumerate(zip(step.requests, step.num_tokens, step.starts)):
            step.applied = i
            row, first_row = first_row, first_row + n
            if req.status is Status.FINISHED:  # aborted, or ended while this step was queued
                continue
            sampled = bool(req.pending) and req.pending[0][0] == step.step_id
            if sampled:
                req.pending.pop(0)
            yield Row(req, i, row, start, n, sampled)
        step.applied = len(step.requests)

    def is_queued(self, step: InFlightStep) -> bool:
        return step is self._queued

    def drop(self, steps: list[InFlightStep]) -> None:
        """Forgets steps whose results will not be applied, newest first: their requests recompute
        those tokens (rows already applied keep their results)."""
        unique = {s.step_id: s for s in steps}
        for step in sorted(unique.values(), key=lambda s: -s.step_id):
            if step is self._queued:
                self._queued = None
            self._rollback(step)

    def _rollback(self, step: InFlightStep) -> None:
        rows = zip(step.requests[step.applied :], step.num_tokens[step.applied :], step.starts[step.applied :])
        for req, n, start in rows:
            req.pending = [p for p in req.pending if p[0] != step.step_id]
            if req.status is Status.RUNNING and req.num_computed_tokens == start + n:
                req.num_computed_tokens = start
