"""Base-aligned chained block hashes (the rule is described in docs/architecture.md, "Prefix reuse").

hash_j = H(hash_{j-1}, tokens[jB:(j+1)B], key_j), chained from a fixed seed with SHA-256 so hashes
are reproducible across processes. key_j is None when the whole block precedes the activation index
`a` ((j+1)*B <= a): such a block holds base-model KV and is shared by the base model and every aLoRA
adapter. Otherwise key_j is the adapter's content-bound identity.
"""

import hashlib
from collections import deque

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
    converting block by block took three times as long). `hashed`, if given, gets the int64 bytes of the
    blocks hashed (what `HashDonors` compares); with `donors`, a request's first hashes are taken from a
    recent request with the same leading tokens where they are the same (`HashDonors.give`)."""
    first, end = len(hashes), len(token_ids) // block_size
    if first >= end:
        return
    data = np.asarray(token_ids[first * block_size : end * block_size], dtype=np.int64).tobytes()
    step = block_size * 8
    if hashed is not None:
        hashed += data
    if first == 0 and donors is not None:
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


class HashDonors:
    """Recent requests whose leading block hashes a new request with the same leading tokens takes instead
    of computing them again.

    An adapter's prompt in a pipeline is its base request's prompt and answer plus the invocation: at 64k
    tokens, 4096 of its 4112 blocks, whose SHA-256 chain (~2-7 ms on one CPU core) would run on the
    engine's thread between the request's arrival and its first step. Block j's hash depends only on the
    tokens of blocks 0..j and their keys (`block_key`), so a donor's hashes are the new request's for every
    leading block whose tokens are the same and whose key is the same for both: all blocks when the two
    have the same adapter identity and activation index (or are both base requests), else those that both
    key None (wholly before either's activation index). A donor is a request hashed lately (the last
    `capacity`, of at least `min_blocks` full blocks); it is read by
    reference, so its entry follows its hashes as its outputs extend them. The tokens are compared as the
    int64 bytes the hasher made of them (`Request.hashed_tokens`), with one memcmp where all are the same.
    """

    def __init__(self, block_size: int, capacity: int = 16, min_blocks: int = 4):
        self.block_size = block_size
        self.min_blocks = min_blocks
        # (hashes, their tokens' bytes, activation index, adapter identity), oldest first
        self.entries: deque[tuple[list[bytes], bytearray, int | None, bytes | None]] = deque(maxlen=capacity)
        self.num_given = 0  # block hashes taken from donors (a counter, never reset)

    def add(self, hashes: list[bytes], hashed: bytearray, activation_start, adapter_identity) -> None:
        """Offers a request's hashes (`hashed` their tokens' bytes) to the requests that come after it."""
        if len(hashes) < self.min_blocks or any(e[0] is hashes for e in self.entries):
            return
        self.entries.append((hashes, hashed, activation_start, adapter_identity))

    def give(self, hashes: list[bytes], data: bytes, activation_start, adapter_identity) -> int:
        """Appends to the empty `hashes` the longest run of leading block hashes a donor has for the full
        blocks whose int64 token bytes are `data`; returns how many it appended."""
        step = self.block_size * 8
        want = len(data) // step
        if want < self.min_blocks:
            return 0
        mine = _key_pair(activation_start, adapter_identity)
        own_base = num_base_keyed_blocks(want, self.block_size, activation_start, adapter_identity)
        best, best_hashes = 0, None
        for d_hashes, d_hashed, d_act, d_id in self.entries:
            n = min(want, len(d_hashes), len(d_hashed) // step)
            if _key_pair(d_act, d_id) != mine:  # the same keys for both only where both key None
                n = min(n, own_base, num_base_keyed_blocks(n, self.block_size, d_act, d_id))
            if n <= best or d_hashed[:step] != data[:step]:
                continue
            shared = d_hashed[: n * step]  # (a copy: the donor's bytes grow with its outputs)
            if shared != data[: n * step]:  # the first differing token ends the shared blocks
                differ = np.frombuffer(data, np.int64, n * self.block_size) != np.frombuffer(shared, np.int64)
                n = int(np.flatnonzero(differ)[0]) // self.block_size
            if n > best:
                best, best_hashes = n, d_hashes
        if best:
            hashes.extend(best_hashes[:best])
            self.num_given += best
        return best


def _key_pair(activation_start: int | None, adapter_identity: bytes | None) -> tuple:
    """What `block_key` keys a request's blocks by: (None, None) for a base request."""
    if adapter_identity is None or activation_start is None:
        return (None, None)
    return (activation_start, adapter_identity)
