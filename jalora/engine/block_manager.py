"""KV-cache blocks: refcounts, the prefix cache (hash -> block) and LRU eviction.

A block with refcount 0 keeps its KV and its hash until it is reused for something else, so a later
request with the same prefix finds it. Free blocks sit in one ordered dict in eviction order: blocks
that hold nothing findable first, then cached blocks least recently used first; a finished request
releases its blocks tail first, so the leaves of a hash chain go before its root.

With a host tier (jalora/engine/host_tier.py) an overwritten cached block's KV moves to host RAM under
its hash, and a lookup continues there where the device misses: each block found on the host gets a
fresh device block, registered at once, whose KV the tier copies back before the next step runs.
Copies out are made ahead of the evictions (`copy_ahead`, once per step): the cached blocks nearest the
head of the free list are the next to be overwritten; up to COPY_AHEAD_MAX of them are copied per step,
before the step that needs their blocks rather than on its way, and an eviction of a block copied ahead
copies nothing. Per step, not in bursts: on the H200 the copies cost per byte (bench/host_tier_cost.py),
and 32 blocks copied at once every 16 steps stalled steps more than 2 every step.

Pipeline sessions (jalora/engine/sessions.py) *retain* blocks: a retained block stays out of the free
list even at refcount 0, so it is never evicted and admission does not count it as free; `retain` and
`unretain` count the sessions holding each block, and the block returns to the free list when the last
one lets it go.
"""

from collections import OrderedDict
from itertools import islice

from jalora.engine.block_hasher import HashDonors
from jalora.engine.host_tier import MAX_MOVE_BLOCKS, HostKVTier
from jalora.engine.request import BlockIds, Request

# Copy-ahead: the free-list positions looked at (at most half the host pool, so that copies made ahead
# cannot push each other out of it), and when their cached blocks not yet on the host are copied: once
# there are COPY_AHEAD_BATCH of them, or as soon as one is within COPY_AHEAD_SOON positions of the head;
# at most COPY_AHEAD_MAX per step, nearest the head first.
COPY_AHEAD_WINDOW = 2 * MAX_MOVE_BLOCKS
COPY_AHEAD_BATCH = 16
COPY_AHEAD_SOON = 16
COPY_AHEAD_MAX = 16


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool, host_tier: HostKVTier | None = None
    ):
        self.host_tier = host_tier if enable_prefix_caching else None
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.num_evictions = 0  # cached blocks overwritten by new KV (a counter, never reset)
        self.retained: dict[int, int] = {}  # block -> sessions retaining it (kept out of `free`)
        # Blocks released while the host tier's copy back into them is on its way: out of `free` until it
        # is written (`landed`), so that no other request gets them before.
        self.parked: set[int] = set()
        self.donors = HashDonors(block_size)  # recent requests' hashes, for the next with the same leading tokens

    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (refcount 0, cached or not)."""
        return len(self.free)

    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def num_used_blocks(self) -> int:
        """Blocks held by requests (refcount > 0); a retained block that no request holds is neither used nor free,
        nor is one parked for a copy back on its way."""
        unheld = sum(1 for b in self.retained if self.ref_count[b] == 0) + len(self.parked)
        return self.num_blocks - len(self.free) - unheld

    def reads_cache(self, req: Request) -> bool:
        """Whether `lookup` looks `req` up at all (a request that wants prompt logprobs computes every token)."""
        return self.enable_prefix_caching and not req.params.prompt_logprobs

    def num_retained_blocks(self) -> int:
        return len(self.retained)

    def _take(self, block: int) -> None:
        if self.ref_count[block] == 0 and block not in self.retained:
            self._unfree(block)
        self.ref_count[block] += 1

    def _new_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
                self.num_evictions += 1
                if self.host_tier is not None:  # its KV moves to host RAM (copied before the next step)
                    self.host_tier.keep(block, h)  # (nothing to copy if copy_ahead did already)
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def copy_ahead(self) -> int:
        """Host tier: records copies of the cached blocks about to be overwritten (see the module's text);
        returns how many. The engine calls it once per step, after scheduling."""
        tier = self.host_tier
        if tier is None:
            return 0
        due, soon = [], False
        for pos, block in enumerate(islice(self.free, min(COPY_AHEAD_WINDOW, tier.capacity // 2))):
            h = self.block_hash[block]
            if h is not None and self.cached.get(h) == block and tier.find(h) is None:
                due.append((block, h))
                soon = soon or pos < COPY_AHEAD_SOON
        if len(due) < COPY_AHEAD_BATCH and not soon:
            return 0
        for block, h in due[:COPY_AHEAD_MAX]:
            tier.keep(block, h)
        return min(len(due), COPY_AHEAD_MAX)

    def lookup(self, req: Request) -> int:
        """Attaches the longest cached prefix of `req`'s tokens; returns the number of tokens reused.

        At least one token is always left to compute, so the step has a row to sample from.
        """
        if not self.reads_cache(req):
            return 0
        hashes = req.update_block_hashes(self.block_size, self.donors)
        req.offer_hashes(self.donors)
        max_blocks = (req.num_tokens - 1) // self.block_size
        if self.host_tier is None:  # device hits only: one pass (a 64k judge's 4096 hits)
            ids = []
            get = self.cached.get
            for h in hashes[:max_blocks]:
                block = get(h)
                if block is None:
                    break
                self._take(block)
                ids.append(block)
        else:
            ids = self._take_with_tier(hashes[:max_blocks])
        req.block_ids = BlockIds(ids)
        req.num_registered_blocks = len(ids)
        return len(ids) * self.block_size

    def _take_with_tier(self, hashes: list[bytes]) -> list[int]:
        """`lookup`'s blocks where a host tier is attached: the longest prefix of `hashes` found on the device
        or, where it misses, in the tier (each such block registered at once on a fresh device block)."""
        tier = self.host_tier
        chain = []  # (hash, its device block or None, its host-tier block where the device has none)
        for h in hashes:
            block = self.cached.get(h)
            hb = None if block is not None else tier.find(h)
            if block is None and hb is None:
                break
            chain.append((h, block, hb))
        # Each block copied back takes a fresh block: as many as stay free once the device hits are taken.
        # (A retained device hit at refcount 0 is not in the free list: taking it costs no free block.)
        room = len(self.free) - sum(1 for _, b, _ in chain if b is not None and b in self.free)
        for i, (_, block, hb) in enumerate(chain):
            if block is None:
                if room <= 0:
                    del chain[i:]
                    break
                room -= 1
                tier.pin(hb)  # (before any eviction below can reuse its host slot)
        for _, block, _ in chain:
            if block is not None:
                self._take(block)
        ids = []
        for h, block, hb in chain:
            if block is None:  # registered now: the tier copies its KV back before the next step runs
                block = self._new_block()
                self.cached[h] = block
                self.block_hash[block] = h
                tier.copy_back(block, h, hb)
            ids.append(block)
        return ids

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids))

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grows `req`'s block table to hold `num_tokens` tokens; False (nothing changed) if full."""
        need = self.blocks_needed(req, num_tokens)
        if need > len(self.free):
            return False
        req.block_ids.extend(self._new_block() for _ in range(need))
        return True

    def register(self, req: Request, upto: int | None = None) -> None:
        """Publishes `req`'s newly completed full blocks to the prefix cache: those within its first
        `upto` tokens (default: all it has computed) whose token ids the host knows."""
        if not self.enable_prefix_caching:
            return
        done = req.num_computed_tokens if upto is None else min(upto, req.num_computed_tokens)
        full = min(done, req.num_tokens) // self.block_size
        if full <= req.num_registered_blocks:
            return
        hashes = req.update_block_hashes(self.block_size, self.donors)
        for j in range(req.num_registered_blocks, full):
            h, block = hashes[j], req.block_ids[j]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
        req.num_registered_blocks = full

    def is_loading(self, req: Request) -> bool:
        """Whether one of `req`'s blocks waits for the host tier's copy back (no step may read it yet)."""
        loading = self.host_tier.loading if self.host_tier is not None else None
        return bool(loading) and not loading.isdisjoint(req.block_ids)

    def landed(self, blocks: list[int]) -> None:
        """The host tier wrote `blocks`: those released meanwhile are free now."""
        for block in blocks:
            if block in self.parked:
                self.parked.discard(block)
                self._free(block)

    def _free(self, block: int) -> None:
        self.free[block] = None
        if self.block_hash[block] is None:  # holds nothing findable: reuse it before any cached block
            self.free.move_to_end(block, last=False)

    def _let_go(self, block: int) -> None:
        """`block` is no longer held or retained: free, or parked while the host tier's copy into it is on its way."""
        if self.host_tier is not None and block in self.host_tier.loading:
            self.parked.add(block)
        else:
            self._free(block)

    def _unfree(self, block: int) -> None:
        """`block` is held or retained again: out of the free list, or no longer parked (its copy lands anyway)."""
        if block in self.parked:
            self.parked.discard(block)
        else:
            del self.free[block]

    def release(self, req: Request) -> None:
        """Drops `req`'s references, tail first; its cached blocks stay findable until evicted."""
        for block in reversed(req.block_ids):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0 and block not in self.retained:
                self._let_go(block)
        req.block_ids = BlockIds()
        req.num_registered_blocks = 0
        if self.enable_prefix_caching:  # (its answer hashed by now: the newest donor, for its judges)
            req.offer_hashes(self.donors)

    def findable_block(self, h: bytes) -> int | None:
        """The block a lookup finds for hash `h` (None if none)."""
        return self.cached.get(h)

    def retain(self, block: int) -> None:
        """One more session keeps `block` (which must hold findable KV) out of the free list."""
        n = self.retained.get(block, 0)
        if n == 0 and self.ref_count[block] == 0:
            self._unfree(block)  # (parked: unretain parks it again if its copy is still on its way)
        self.retained[block] = n + 1

    def unretain(self, block: int) -> None:
        """A session lets `block` go; at refcount 0 and no session left it is free again (most recently
        used, as a finished request's blocks are)."""
        n = self.retained.pop(block) - 1
        if n:
            self.retained[block] = n
        elif self.ref_count[block] == 0:
            self._let_go(block)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block, on the device and in the host tier."""
        for block in list(self.cached.values()):
            self.block_hash[block] = None
        self.cached.clear()
        if self.host_tier is not None:
            self.host_tier.reset()  # (copies back still on their way are never written)
            self.landed(list(self.parked))
