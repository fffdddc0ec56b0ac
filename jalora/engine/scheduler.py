"""Continuous batching: who runs this step and how many tokens each.

Running requests go first (decode tokens and unfinished prefill chunks), then waiting ones, all under
one token budget, so prefill chunks and decode tokens share a step. When blocks run out, the most
recently admitted running request is preempted: its blocks are released (their hashes stay in the
prefix cache) and it is recomputed later from its prompt plus what it generated so far.

With async scheduling the next step is scheduled while the previous one is still on the device: a
request whose token from that step is pending counts it as known (the step feeds it from the previous
step's output on the device), unless that token is bound to end the request by length. A preempted
request with a pending token waits until the token has come back before it is admitted again.

Adapters (jalora/adapters/manager.py): a waiting adapter request is admitted only once its adapter has
a device slot (`claim`, which may swap it in). When every slot is used by running requests it stays in
the queue and the requests behind it are considered meanwhile. So that it is not passed over forever,
once `max_num_seqs` requests have been admitted past it, the least recently claimed adapter admits no
new request until its running ones end and its slot is idle for the waiting one.
"""

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from jalora.engine.block_hasher import num_base_keyed_blocks
from jalora.engine.block_manager import BlockManager
from jalora.engine.request import Request, Status


@dataclasses.dataclass
class PrefixCacheCounters:
    """Prefix-cache lookups in tokens, counted once per request at its first admission (a preempted
    request's second lookup finds its own blocks again: counting it would inflate the hit rate)."""

    queries: int = 0  # tokens of the requests looked up
    hits: int = 0  # tokens whose KV was found (each request's num_cached_tokens)
    hits_base_keyed: int = 0  # found in base-keyed blocks (the base model's KV)
    hits_base_keyed_by_adapters: int = 0  # of those, found by adapter requests

    def record(self, req: Request, cached: int, block_size: int) -> None:
        base = block_size * num_base_keyed_blocks(
            cached // block_size, block_size, req.activation_start, req.adapter_identity
        )
        self.queries += req.num_tokens
        self.hits += cached
        self.hits_base_keyed += base
        if req.adapter_identity is not None:
            self.hits_base_keyed_by_adapters += base


class AdapterSlots(Protocol):
    """What admission needs of the adapter manager (jalora/adapters/manager.py)."""

    def claim(self, name: str, busy: set[int]) -> int | None: ...

    def slot_of(self, name: str) -> int | None: ...

    def least_recent(self) -> str | None: ...


@dataclasses.dataclass
class ScheduledBatch:
    requests: list[Request]
    num_tokens: list[int]  # new tokens of each request this step
    preempted: list[Request]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        adapters: AdapterSlots | None = None,
    ):
        self.bm = block_manager
        self.adapters = adapters  # None: requests keep the slot they were made with
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_admitted = 0  # admissions so far: how many passed a request held back for a slot
        self.prefix_cache = PrefixCacheCounters()
        # Called when nothing runs and the first waiting request cannot get its blocks, or a lone running one
        # cannot get its next chunk's: frees blocks that pipeline sessions retain (True if it freed any), so
        # retention never stalls the engine.
        self.reclaim: Callable[[], bool] | None = None
        # Whether a request continues a pipeline session that retains blocks: such a request waits for no
        # other, and may preempt running requests that do not (it needs few new blocks and frees many).
        self.favored: Callable[[Request], bool] | None = None

    def add(self, req: Request, first: bool = False) -> None:
        """Queues `req` last, or with `first` ahead of the waiting requests."""
        if first:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, req: Request) -> None:
        """Back to the waiting queue's front, blocks released; it is recomputed when scheduled again."""
        if req in self.running:
            self.running.remove(req)
        self._preempt(req)

    def _preempt(self, req: Request) -> None:
        self.bm.release(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [], [])
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_with_pending - req.num_computed_tokens, budget)
            if n <= 0 or req.ends_with_pending(self.max_model_len) or self.bm.is_loading(req):
                i += 1  # nothing to compute until its pending token is back (which may end it), or its
                continue  # KV from the host tier is written
            while not self.bm.allocate(req, req.num_computed_tokens + n):
                if self._alone_may_reclaim(req):
                    continue  # sessions let blocks go rather than the lone request preempt itself
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_tokens.append(n)
                budget -= n
                i += 1
        w, busy, draining, full = 0, None, None, False
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not batch.preempted:
            req = self.waiting[w]
            if req.pending:  # preempted with a token still on the device: admit it later
                break
            if req.adapter_name is not None and self.adapters is not None:
                if busy is None:
                    busy = {r.adapter_slot for r in self.running if r.adapter_name is not None}
                name = req.adapter_name
                if name == draining or (full and self.adapters.slot_of(name) is None):
                    slot = None  # (once one swap found no idle slot, none will this call: `busy` only grows)
                else:
                    slot = self.adapters.claim(name, busy)
                    full = full or slot is None
                if slot is None:  # every slot is in use: wait, and let the requests behind it in
                    if req.held_since is None:
                        req.held_since = self.num_admitted
                    if draining is None and self.num_admitted - req.held_since >= self.max_num_seqs:
                        draining = self.adapters.least_recent()  # passed over long enough: free it a slot
                    w += 1
                    continue
                req.adapter_slot, req.held_since = slot, None
            cached = self.bm.lookup(req)
            n = min(req.num_tokens - cached, budget)
            if not self.bm.allocate(req, cached + n):
                self.bm.release(req)
                if not self.running and self.bm.parked:
                    break  # blocks are free once the host tier's copies into them land: the engine waits for them
                if not self.running and self.reclaim is not None and self.reclaim():
                    continue  # sessions let blocks go: look it up again
                if self.favored is not None and self.favored(req) and self._preempt_for_favored(batch, w):
                    budget = self.max_num_batched_tokens - batch.total_tokens
                    w = 0  # it is at the head of the queue now
                    continue
                break
            del self.waiting[w]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = cached
                if self.bm.reads_cache(req):
                    self.prefix_cache.record(req, cached, self.bm.block_size)
            req.num_computed_tokens = cached
            req.status = Status.RUNNING
            self.running.append(req)
            self.num_admitted += 1
            if busy is not None and req.adapter_name is not None:
                busy.add(req.adapter_slot)
            if self.bm.is_loading(req):  # admitted (blocks and slot held); it runs once its KV is written
                continue
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        # Equal adapter slots side by side: the masked multi-LoRA kernel then walks fewer, longer runs.
        order = sorted(range(len(batch.requests)), key=lambda k: batch.requests[k].adapter_slot)
        batch.requests = [batch.requests[k] for k in order]
        batch.num_tokens = [batch.num_tokens[k] for k in order]
        return batch

    def _alone_may_reclaim(self, req: Request) -> bool:
        """`req` runs alone and its next chunk finds no blocks: True if pipeline sessions let some go. Without
        this, a prompt that fits the cache but not beside the retained blocks would be admitted chunk by chunk,
        preempt itself once the cache ran out, and be admitted again from its own cached prefix, forever (its
        first chunk fits, so the admission's reclaim never runs)."""
        return self.running == [req] and not self.bm.parked and self.reclaim is not None and self.reclaim()

    def _preempt_for_favored(self, batch: ScheduledBatch, w: int) -> bool:
        """Preempts the most recently admitted running request that is not favored (out of this step's
        batch if it was in it); the favored request (waiting[w]: requests held back for an adapter slot may
        be ahead of it) goes to the head of the queue, the preempted one right behind it."""
        victim = next((r for r in reversed(self.running) if not self.favored(r)), None)
        if victim is None:
            return False
        self.running.remove(victim)
        if victim in batch.requests:
            k = batch.requests.index(victim)
            del batch.requests[k], batch.num_tokens[k]
        head = self.waiting[w]
        del self.waiting[w]
        self._preempt(victim)
        self.waiting.appendleft(head)
        return True

    def finish(self, req: Request, reason: str) -> None:
        """Ends `req` (running or waiting) and returns its blocks at once."""
        req.finish_reason = reason
        req.status = Status.FINISHED
        req.metrics.finished_time = time.monotonic()
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.bm.release(req)
