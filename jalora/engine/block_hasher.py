"""Base-aligned chained block hashes (the rule is described in docs/architecture.md, "Prefix reuse").

hash_j = H(hash_{j-1}, tokens[jB:(j+1)B], key_j), chained from a fixed seed with SHA-256 so hashes
are reproducible across processes. key_j is None when the whole block precedes the activation index
`a` ((j+1)*B <= a): such a block holds base-model KV and is shared by the base model and every aLoRA
adapter. Otherwise key_j is the adapter's content-bound identity.
"""

import hashlib
from collections import OrderedDict

import numpy as np

SEED = hashlib.sha256(b"jalora/block-hash/v1").digest()


def block_key(j: int, block_size: int, activation_start: int | None, adapter_identity: bytes | None):
    """The key of block j: None for base KV, else the adapter identity.

    The block that straddles the activation index also carries the offset of `a` inside it: the same
    tokens activated at another offset hold other KV (an invocation can occur twice in one block).
    Every later block inherits the distinction through the chain.
    """
    if adapter_identity is None or activation_start is None:
        return None
    start = j * block_size
    if start + block_size <= activation_start:
        return None
    if start < activation_start:
        return adapter_identity + (activation_start - start).to_bytes(4, "little")
    return adapter_identity


def num_base_keyed_blocks(
    num_blocks: int, block_size: int, activation_start: int | None, adapter_identity: bytes | None
) -> int:
    """How many of the first `num_blocks` blocks `block_key` keys None (base-model KV): all of a base
    request's, those wholly before the activation index of an aLoRA request's, none of a plain LoRA's."""
    if adapter_identity is None or activation_start is None:
        return num_blocks
    return min(num_blocks, activation_start // block_size)


def hash_block(prev: bytes, tokens, key: bytes | None) -> bytes:
    h = hashlib.sha256(prev)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(b"\x00" if key is None else b"\x01" + key)
    return h.digest()


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: list[int],
    block_size: int,
    activation_start: int | None,
    adapter_identity: bytes | None,
    hashed: bytearray | None = None,
    donors: "HashDonors | None" = None,
) -> None:
    """Appends to `hashes` the hash of every full block of `token_ids` not hashed yet (O(new blocks)).

    The same hashes as `hash_block` over each block in turn; the new blocks' tokens are converted to
    bytes in one call (a 64k-token prompt is 4096 blocks, hashed on the engine's thread as it arrives:
    converting block by block took three times as long). `hashed`, if given, holds the int64 bytes of the
    blocks hashed (what `HashDonors` compares; emptied for good if it ever stops matching `hashes`); with
    `donors`, a request's first hashes are taken from a recent request where they are the same
    (`HashDonors.give`)."""
    first, end = len(hashes), len(token_ids) // block_size
    if first >= end:
        return
    data = np.asarray(token_ids[first * block_size : end * block_size], dtype=np.int64).tobytes()
    step, hashed_from, new = block_size * 8, first, data
    if first == 0 and donors is not None:
        if donors.block_size != block_size:
            raise ValueError(f"donors hold blocks of {donors.block_size} tokens, not {block_size}")
        first = donors.give(hashes, data, activation_start, adapter_identity)
        data = data[first * step :]
    prev = hashes[-1] if first else SEED
    sha256 = hashlib.sha256
    suffix, suffix_until = b"\x00", end  # the key's bytes, the same for every block up to suffix_until
    if adapter_identity is not None and activation_start is not None:
        suffix_until = min(end, activation_start // block_size)  # blocks wholly before the activation
    for j in range(first, end):
        if j >= suffix_until:
            key = block_key(j, block_size, activation_start, adapter_identity)
            suffix, suffix_until = b"\x01" + key, end if key == adapter_identity else j + 1
        offset = (j - first) * step
        prev = sha256(prev + data[offset : offset + step] + suffix).digest()  # (= hash_block's three updates)
        hashes.append(prev)
    if hashed is not None:  # (after the hashes: the bytes never run ahead of them)
        if len(hashed) == hashed_from * step:
            hashed += new
        else:  # out of step with the hashes (a caller cut them): this request is no donor any more
            hashed.clear()


class HashDonors:
    """Recent requests whose leading block hashes a new request with the same leading tokens takes instead
    of computing them again.

    An adapter's prompt in a pipeline is its base request's prompt and answer plus the invocation: at 64k
    tokens, 4096 of its 4112 blocks, whose SHA-256 chain (~2-7 ms on one CPU core) would run on the
    engine's thread between the request's arrival and its first step. Block j's hash depends only on the
    tokens of blocks 0..j and their keys (`block_key`), so a donor's hashes are the new request's for every
    leading block whose tokens are the same and whose key is the same for both: all blocks when the two
    have the same adapter identity and activation index (or are both base requests), else those that both
    key None (wholly before either's activation index).

    The block manager offers a request when it is admitted and again when it is released (finished or
    preempted: its answer hashed by then), which makes it the newest donor; the pool keeps the `capacity`
    most recently offered of at least `min_blocks` full blocks, within `max_bytes` of token bytes. An entry
    is read by reference, so it follows the request's hashes as its outputs extend them. The tokens are
    compared as the int64 bytes the hasher made of them (`Request.hashed_tokens`), newest donor first: one
    memcmp where all agree, and where they do not, prefixes of doubling length until one differs, then the
    first differing token within the last doubling (a donor that shares only a system prompt costs a few
    blocks' comparison, not the whole prompt's).
    """

    def __init__(self, block_size: int, capacity: int = 16, min_blocks: int = 4, max_bytes: int = 64 << 20):
        self.block_size = block_size
        self.capacity = capacity
        self.min_blocks = min_blocks
        self.max_bytes = max_bytes
        # id(hashes) -> (hashes, their tokens' bytes, activation index, adapter identity), oldest first
        self.entries: OrderedDict[int, tuple[list[bytes], bytearray, int | None, bytes | None]] = OrderedDict()
        self.num_given = 0  # block hashes taken from donors (a counter, never reset)

    def add(self, hashes: list[bytes], hashed: bytearray, activation_start, adapter_identity) -> None:
        """Offers a request's hashes (`hashed` their tokens' bytes) to the requests that come after it, as the
        newest donor; the oldest go beyond `capacity` entries or `max_bytes`."""
        key = id(hashes)
        if len(hashed) // (self.block_size * 8) < self.min_blocks:
            self.entries.pop(key, None)
            return
        self.entries[key] = (hashes, hashed, activation_start, adapter_identity)
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity or (
            len(self.entries) > 1 and sum(len(e[1]) for e in self.entries.values()) > self.max_bytes
        ):
            self.entries.popitem(last=False)

    def give(self, hashes: list[bytes], data: bytes, activation_start, adapter_identity) -> int:
        """Appends to the empty `hashes` the longest run of leading block hashes a donor has for the full
        blocks whose int64 token bytes are `data`; returns how many it appended."""
        step = self.block_size * 8
        want = len(data) // step
        if want < self.min_blocks or not self.entries:
            return 0
        mine = _key_pair(activation_start, adapter_identity)
        own_base = num_base_keyed_blocks(want, self.block_size, activation_start, adapter_identity)
        best, best_hashes = 0, None
        for d_hashes, d_hashed, d_act, d_id in reversed(self.entries.values()):
            n = min(want, len(d_hashes), len(d_hashed) // step)
            if _key_pair(d_act, d_id) != mine:  # other keys: the same only where both key None
                n = min(n, own_base, num_base_keyed_blocks(n, self.block_size, d_act, d_id))
            if n <= best:
                continue
            n = self._shared_blocks(d_hashed, data, n)
            if n > best:
                best, best_hashes = n, d_hashes
                if best == want:
                    break  # (no donor can give more)
        if best:
            hashes.extend(best_hashes[:best])
            self.num_given += best
        return best

    def _shared_blocks(self, theirs: bytearray, data: bytes, n: int) -> int:
        """How many of the first `n` blocks of `data` a donor's token bytes hold too."""
        step, view = self.block_size * 8, memoryview(data)
        lo, k = 0, 1  # blocks [0, lo) agree
        while True:
            k = min(k, n)
            if not theirs.startswith(view[: k * step]):
                break
            if k == n:
                return n
            lo, k = k, 2 * k
        # the first difference lies in blocks [lo, k): find its token
        ours = np.frombuffer(data, np.int64, (k - lo) * self.block_size, lo * step)
        differ = ours != np.frombuffer(bytes(theirs[lo * step : k * step]), np.int64)
        return lo + int(np.flatnonzero(differ)[0]) // self.block_size


def _key_pair(activation_start: int | None, adapter_identity: bytes | None) -> tuple:
    """What `block_key` keys a request's blocks by: (None, None) for a base request."""
    if adapter_identity is None or activation_start is None:
        return (None, None)
    return (activation_start, adapter_identity)
