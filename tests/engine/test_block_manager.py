"""The block manager: refcounts, the prefix cache and eviction order."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jalora import SamplingParams
from jalora.engine.block_manager import COPY_AHEAD_MAX, BlockManager
from jalora.engine.host_tier import HostKVTier
from jalora.engine.request import Request


def make_request(rid, ids, max_tokens=4):
    return Request(str(rid), ids, SamplingParams(max_tokens=max_tokens), seed=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_block_manager_refcounts_return_to_total(ops):
    """Allocate, share prefixes, register and release in any order: every block comes back."""
    bm = BlockManager(num_blocks=24, block_size=4, enable_prefix_caching=True)
    live = []
    for i, (n, prefix_kind, release_early) in enumerate(ops):
        ids = [prefix_kind] * n  # equal token runs make prefixes shared between requests
        req = make_request(i, ids)
        cached = bm.lookup(req)
        assert cached % 4 == 0 and cached <= n - 1
        if not bm.allocate(req, n):
            bm.release(req)
            continue
        req.num_computed_tokens = n
        bm.register(req)
        live.append(req)
        if release_early:
            bm.release(live.pop(0))
        held = {b for r in live for b in r.block_ids}
        assert bm.num_free_blocks() == 24 - len(held)
    for req in live:
        bm.release(req)
    assert bm.num_free_blocks() == 24
    assert all(c == 0 for c in bm.ref_count)


def test_blocks_holding_nothing_findable_are_evicted_before_cached_prefixes():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])  # one full block (cached) + a partial one (nothing to find)
    assert bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.register(a)
    bm.release(a)
    c = make_request("c", [7, 8, 9])
    assert bm.lookup(c) == 0 and bm.allocate(c, 3)
    c.num_computed_tokens = 3
    bm.register(c)
    bm.release(c)
    d = make_request("d", [4, 5, 6, 7])  # needs two blocks: must take the two partial ones
    assert bm.lookup(d) == 0 and bm.allocate(d, 4)
    bm.release(d)
    again = make_request("a2", [1, 2, 3])
    assert bm.lookup(again) == 2  # a's prefix survived
    bm.release(again)




class _Tier:
    """The host tier's side of the block manager's calls: holds every hash the test gives it."""

    def __init__(self, hashes):
        self.held, self.copies, self.loading = set(hashes), [], set()

    def find(self, h):
        return h if h in self.held else None

    def pin(self, hb):
        pass

    def copy_back(self, block, h, hb):
        self.copies.append(block)
        self.loading.add(block)

    def keep(self, block, h):
        self.held.add(h)


def test_blocks_on_their_way_from_the_host_are_free_only_once_written():
    """A request released (aborted, preempted) while its copy back is on its way: those blocks stay out
    of the free list until the tier has written them, so no other request gets a block a late copy
    would overwrite; retained and unretained meanwhile, the same."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    req = make_request("a", list(range(9)))  # 2 full blocks on the host + 1 token
    bm.host_tier = _Tier(req.update_block_hashes(4)[:2])
    assert bm.lookup(req) == 8 and bm.allocate(req, 9)
    assert bm.is_loading(req) and bm.host_tier.copies == req.block_ids[:2]
    first, second = bm.host_tier.copies
    bm.retain(first)
    assert bm.num_free_blocks() == 1
    bm.release(req)
    assert bm.num_free_blocks() == 2  # and the third block: the second is parked, the first retained
    bm.unretain(first)
    assert bm.num_free_blocks() == 2
    bm.host_tier.loading.clear()
    bm.landed([first, second])
    assert bm.num_free_blocks() == 4
    again = make_request("b", list(range(9)))
    assert bm.lookup(again) == 8 and again.block_ids == [first, second]  # written: found on the device


def test_blocks_on_their_way_are_waited_for_not_reclaimed_from_sessions():
    """Nothing runs, the head request does not fit, and some blocks are parked for a copy back on its way:
    the scheduler admits nothing this pass (the engine then waits for the copy) instead of ending
    pipeline sessions for blocks that are about to be free; once written, the request fits."""
    from jalora.engine.scheduler import Scheduler

    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    loading = make_request("l", list(range(9)))
    bm.host_tier = _Tier(loading.update_block_hashes(4)[:2])
    sched.add(loading)
    assert not sched.schedule().requests and loading in sched.running  # admitted, not run: loading
    sched.finish(loading, "abort")
    assert bm.parked and bm.num_free_blocks() == 2 and bm.num_used_blocks() == 0
    reclaimed = []
    sched.reclaim = lambda: reclaimed.append(1) or False
    sched.add(make_request("w", list(range(100, 113))))  # 4 blocks
    assert not sched.schedule().requests and not reclaimed
    bm.host_tier.loading.clear()
    bm.landed(list(bm.parked))
    assert bm.num_free_blocks() == 4 and sched.schedule().requests and not reclaimed


def test_host_hits_need_free_blocks_even_when_the_device_hits_are_retained():
    """A lookup whose device hits are retained by a session (refcount 0, out of the free list) and whose
    next block is on the host, with no free block left: it stops before the host hit instead of taking a
    block from the empty free list (pipeline C with the host tier and sessions once crashed so)."""
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    first = make_request("a", list(range(13)))  # 3 full blocks + 1 token
    assert bm.lookup(first) == 0 and bm.allocate(first, 13)
    first.num_computed_tokens = 13
    bm.register(first)
    for block in first.block_ids[:3]:
        bm.retain(block)  # a session keeps the three full blocks
    bm.release(first)
    filler = make_request("b", [99] * 4)
    assert bm.allocate(filler, 4) and bm.num_free_blocks() == 0
    longer = make_request("c", list(range(17)) + [50])  # the same 3 blocks, a 4th on the host, 1 more token
    bm.host_tier = _Tier([longer.update_block_hashes(4)[3]])
    assert bm.lookup(longer) == 12  # the three retained blocks; the host block waits for a free one
    assert bm.host_tier.copies == []
    bm.release(longer)
    bm.release(filler)
    assert bm.lookup(longer) == 16 and len(bm.host_tier.copies) == 1  # with a free block, it comes back


def _cache_and_free(bm, rid, n_blocks, first_token):
    """A request of n_blocks full blocks (and one more token) computed, registered and released."""
    req = make_request(rid, list(range(first_token, first_token + 4 * n_blocks + 1)))
    assert bm.lookup(req) == 0 and bm.allocate(req, req.num_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.register(req)
    blocks = list(req.block_ids[:n_blocks])
    bm.release(req)
    return req, blocks


def test_copy_ahead_copies_the_next_evictions_before_they_happen():
    """The host tier's copies out are made before the evictions: none while the cached blocks are few and
    far from the head of the free list, at most COPY_AHEAD_MAX a step once there are enough, the rest once
    one comes close; the evictions then copy nothing, and what comes back is each block's own KV."""
    tier = HostKVTier(256, (1,), np.float32)
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True, host_tier=tier)
    kv = np.arange(64, dtype=np.float32)[:, None]  # a stand-in for the device cache: block b holds b
    gather = lambda blocks: kv[blocks].copy()  # noqa: E731
    written = {}
    scatter = lambda blocks, data: written.update(zip(blocks.tolist(), data[:, 0].tolist()))  # noqa: E731
    put = np.copy  # (the device placement of a copy back: none here)
    first, first_blocks = _cache_and_free(bm, "a", 12, 0)  # 12 cached blocks behind 52 that hold nothing
    assert bm.copy_ahead() == 0 and not tier.has_moves  # fewer than a batch, none close to the head
    second, second_blocks = _cache_and_free(bm, "b", 8, 100)  # 20 cached now, still far from the head
    assert bm.copy_ahead() == COPY_AHEAD_MAX and bm.copy_ahead() == 0  # 16 this step; 4 left, far
    tier.issue(gather, put)  # (the engine issues a step's copies before launching it)
    filler = make_request("f", [999] * (4 * 48))
    assert bm.allocate(filler, filler.num_tokens)  # 4 cached blocks overwritten (already copied: no copy)
    assert not tier.has_moves and bm.copy_ahead() == 4  # the last 4 are within 16 of the head now
    tier.issue(gather, put)
    tier.drain()
    assert tier.counters.blocks_to_host == 20 and bm.copy_ahead() == 0
    more = make_request("m", [998] * (4 * 16))
    assert bm.allocate(more, more.num_tokens)  # overwrites all 20 cached blocks
    assert bm.num_evictions == 20 and not tier.has_moves  # nothing left to copy
    bm.release(filler)
    for req, blocks in ((first, first_blocks), (second, second_blocks)):
        again = make_request("again", req.prompt_token_ids)
        assert bm.lookup(again) == 4 * len(blocks)
        tier.issue(gather, put)
        bm.landed(tier.land_loads(scatter, wait=True))
        assert [written[b] for b in again.block_ids] == [float(b) for b in blocks]  # each block's own KV
