"""The host-memory KV tier: KV blocks evicted from the device kept in host RAM, and copied back on a hit.

When the block manager overwrites a cached block (refcount 0, LRU first), the block's KV is copied to
a slot of a host pool under the same base-aligned hash; a later prefix-cache lookup that misses on the
device but finds the hash here gets a fresh device block and the KV copied back into it instead of
recomputing those tokens. The pool is LRU too: a block evicted from the device goes to its most
recently used end (it was on the device until now), a hit touches it, and a full pool drops its least
recently used block. A block copied back stays in the pool as well, so evicting it from the device
again costs no copy.

Ordering is by the device's queue. The block manager only records what moves (`keep`, `copy_back`)
while the scheduler runs; `issue` starts the copies, in the order recorded, right after scheduling and
before the step is launched. A device->host gather of evicted blocks is enqueued before the step that
overwrites them and so reads their old KV (one device queue runs its work in order, and the step
donates the cache only after the gather's read); the device moves its result to pinned host memory (the
runner's `gather_kv_blocks`) and one worker thread copies it into the pool. A copy back is the worker's
job too (the pool slots gathered and put on the device), off the engine's thread: its device blocks are
`loading` until `land_loads` writes them into the cache, and the scheduler runs no request that holds a
loading block (jalora/engine/scheduler.py), so no step reads a block before its KV is written. The
worker takes its jobs in order, so a copy back of a block whose copy out has not landed yet runs after
that landing. (A slot freed while an older copy is still on its way to it gets that copy first and its
new block's copy after, and a block is read only once its own copy has landed.)
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

# Largest number of blocks one gather or scatter moves: a run of more is split, so the copy functions
# compile for the powers of two up to this (ModelRunner warms them up) and no larger.
MAX_MOVE_BLOCKS = 64
GIB = 1 << 30


@dataclasses.dataclass(eq=False)
class HostBlock:
    """One pool slot's block. `arriving` is the gather whose host copy has not been put into the pool yet
    (None once it is there, or once the block is dropped); `pins` counts copies back recorded but not
    issued (the slot must not be reused before they read it)."""

    slot: int
    arriving: _Arriving | None = None
    pins: int = 0


@dataclasses.dataclass(eq=False)
class _Arriving:
    hashes: list[bytes]
    blocks: list[HostBlock]
    landed: Future | None = None  # the worker's landing of the gather's host copy into the pool


@dataclasses.dataclass(eq=False)
class _Load:
    """A copy back on its way: the worker gathers the blocks' pool slots and puts them on the device
    (`future`: the device array); the engine's thread then writes them into `device_blocks`."""

    device_blocks: np.ndarray
    blocks: list[HostBlock]
    future: Future


@dataclasses.dataclass
class HostTierCounters:
    hit_blocks: int = 0  # blocks copied back to serve a lookup
    blocks_to_host: int = 0
    blocks_to_device: int = 0


class HostKVTier:
    """Host RAM for `capacity` KV blocks of `block_shape` ([layers, 2, block_size, kv heads, head_dim]:
    K and V of every layer, every KV head, whatever the device sharding) and `dtype`."""

    def __init__(self, capacity: int, block_shape: tuple[int, ...], dtype):
        self.capacity = capacity
        self.block_shape = tuple(block_shape)
        self.dtype = np.dtype(dtype)
        self.block_bytes = int(np.prod(block_shape)) * self.dtype.itemsize
        # np.empty takes address space only: pages are committed as blocks land in them. The pool holds the
        # blocks' bytes as unsigned integers of the dtype's width: numpy copies those with its plain loops,
        # while an extension dtype such as bfloat16 goes element by element through the dtype's functions
        # (measured on a CPU: gathering 64 Granite-8B blocks from the pool took 507 ms as bfloat16, 33 ms
        # as uint16, on the engine's thread).
        self._raw = np.dtype(f"u{self.dtype.itemsize}")
        self.pool = np.empty((capacity, *block_shape), self._raw)
        self.blocks: OrderedDict[bytes, HostBlock] = OrderedDict()  # least recently used first
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._moves: list[tuple[str, int, bytes, HostBlock]] = []  # ("out" | "in", device block, hash, block)
        self._arriving: list[_Arriving] = []
        self._loads: list[_Load] = []  # copies back on their way, in the order issued
        self.loading: set[int] = set()  # device blocks whose KV is on its way: no step may read them yet
        self._lander = ThreadPoolExecutor(1, thread_name_prefix="jalora-host-kv")
        self.counters = HostTierCounters()

    @staticmethod
    def capacity_for(gib: float, block_bytes: int) -> int:
        return int(gib * GIB // block_bytes)

    def num_used_blocks(self) -> int:
        return len(self.blocks)

    # -- the block manager's side (host bookkeeping only; nothing touches a device) ----------------------

    def keep(self, device_block: int, block_hash: bytes) -> None:
        """A cached device block is about to be overwritten, or will be soon: keep its KV (copied when
        `issue` runs). Its KV never changes while it holds `block_hash`, so a copy made ahead of the
        eviction serves as well as one made at it."""
        held = self.blocks.get(block_hash)
        if held is not None:  # its KV is here already (copied back from here, or out before)
            self.blocks.move_to_end(block_hash)
            return
        slot = self._take_slot()
        if slot is None:  # every slot is pinned by a copy back of this scheduling pass: keep nothing
            return
        hb = HostBlock(slot)
        self.blocks[block_hash] = hb
        self._moves.append(("out", device_block, block_hash, hb))

    def find(self, block_hash: bytes) -> HostBlock | None:
        return self.blocks.get(block_hash)

    def pin(self, hb: HostBlock) -> None:
        hb.pins += 1

    def unpin(self, hb: HostBlock) -> None:
        hb.pins -= 1

    def copy_back(self, device_block: int, block_hash: bytes, hb: HostBlock) -> None:
        """`hb` (pinned by the caller) is copied into `device_block` when `issue` runs; the pin is released then."""
        self.blocks.move_to_end(block_hash)
        self.counters.hit_blocks += 1
        self._moves.append(("in", device_block, block_hash, hb))
        self.loading.add(device_block)  # (from now: the scheduler admits the request without running it)

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for h, hb in self.blocks.items():  # least recently used first
            if hb.pins == 0:
                del self.blocks[h]
                hb.arriving = None
                return hb.slot
        return None

    def reset(self) -> None:
        """Forgets every block (the device's prefix cache was reset: none of them may be found again)."""
        for hb in self.blocks.values():
            hb.arriving = None
        self.blocks.clear()
        self._moves.clear()
        self._arriving.clear()
        self._loads.clear()  # (what is still on its way is never written)
        self.loading.clear()
        self._free_slots = list(range(self.capacity - 1, -1, -1))

    # -- the engine's side: the copies ----------------------------------------------------------------

    @property
    def has_moves(self) -> bool:
        return bool(self._moves)

    @property
    def num_loads(self) -> int:
        return len(self._loads)

    def issue(self, gather: Callable[[np.ndarray], object], put: Callable[[np.ndarray], object]) -> None:
        """Starts the recorded copies in order (runs of one direction batched, in pieces of a power of two
        up to MAX_MOVE_BLOCKS blocks): `gather(device blocks)` enqueues a device gather [n, *block_shape]
        (its result on its way to host memory), which the worker thread lands in the pool; a copy back is
        handed to the worker too, which gathers the pool slots and calls `put(host array)` to place them
        on the device; `land_loads` writes them into the cache. The worker takes its jobs in order, so a
        copy back of a block whose copy out has not landed yet runs after that landing."""
        moves, self._moves = self._moves, []
        i = 0
        while i < len(moves):
            kind = moves[i][0]
            j = i
            while j < len(moves) and moves[j][0] == kind and j - i < MAX_MOVE_BLOCKS:
                j += 1
            run = moves[i : i + (1 << ((j - i).bit_length() - 1))]  # a power of two: few compiled sizes
            j = i + len(run)
            blocks = np.asarray([b for _, b, _, _ in run], np.int32)
            if kind == "out":
                array = gather(blocks)
                arriving = _Arriving([h for _, _, h, _ in run], [hb for _, _, _, hb in run])
                for hb in arriving.blocks:
                    hb.arriving = arriving
                arriving.landed = self._lander.submit(self._land, arriving, array)
                self._arriving.append(arriving)
                self.counters.blocks_to_host += len(run)
            else:
                hbs = [hb for _, _, _, hb in run]
                self._loads.append(_Load(blocks, hbs, self._lander.submit(self._load, hbs, put)))
            i = j

    def land_loads(self, scatter: Callable[[np.ndarray, object], None], wait: bool = False) -> list[int]:
        """Writes the copies back that have reached the device into the cache, in the order issued
        (`scatter(device blocks, device array)`, enqueued ahead of any later step); with `wait`, all of
        them, waiting. Returns the device blocks written (no longer loading). A copy that failed raises
        its error (the engine then resets the cache and both tiers)."""
        landed = []
        while self._loads and (wait or self._loads[0].future.done()):
            load = self._loads[0]
            scatter(load.device_blocks, load.future.result())
            del self._loads[0]
            done = load.device_blocks.tolist()
            self.loading.difference_update(done)
            for hb in load.blocks:
                self.unpin(hb)
            self.counters.blocks_to_device += len(done)
            landed += done
        return landed

    def poll(self) -> None:
        """Forgets the landings that are done (never waits); the blocks of a copy that failed are dropped
        (a copy back that waited for one fails with its error)."""
        for arriving in [a for a in self._arriving if a.landed.done()]:
            self._arriving.remove(arriving)
            if arriving.landed.exception() is None:
                continue
            for h, hb in zip(arriving.hashes, arriving.blocks):
                if self.blocks.get(h) is hb and hb.pins == 0:
                    del self.blocks[h]
                    hb.arriving = None
                    self._free_slots.append(hb.slot)

    def drain(self) -> None:
        """Waits until every copy issued has landed (or failed)."""
        for arriving in list(self._arriving):
            arriving.landed.exception()
        self.poll()

    def close(self) -> None:
        """Stops the worker thread (copies not landed yet are dropped)."""
        self._lander.shutdown(wait=False, cancel_futures=True)

    def _load(self, blocks: list[HostBlock], put: Callable[[np.ndarray], object]):
        """On the worker thread: the pool slots of a copy back, gathered and put on the device. Runs
        after every landing issued before it; a block whose own landing failed fails the copy."""
        for hb in blocks:
            arriving = hb.arriving  # (read once: the engine's thread may clear it meanwhile, in a reset)
            if arriving is not None:
                arriving.landed.result()  # (done: issued earlier on this thread) raises its error
        return put(self.pool[[hb.slot for hb in blocks]].view(self.dtype))

    def _land(self, arriving: _Arriving, array) -> None:
        """On the worker thread: waits for the gather's host copy and puts its blocks into their slots
        (those not dropped meanwhile)."""
        host = np.asarray(array).view(self._raw)
        live = [i for i, hb in enumerate(arriving.blocks) if hb.arriving is arriving]
        self.pool[[arriving.blocks[i].slot for i in live]] = host if len(live) == len(host) else host[live]
        for i in live:
            arriving.blocks[i].arriving = None
