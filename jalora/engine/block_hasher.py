"""Base-aligned chained block hashes (the rule is described in docs/architecture.md, "Prefix reuse").

hash_j = H(hash_{j-1}, tokens[jB:(j+1)B], key_j), chained from a fixed seed with SHA-256 so hashes
are reproducible across processes. key_j is None when the whole block precedes the activation index
`a` ((j+1)*B <= a): such a block holds base-model KV and is shared by the base model and every aLoRA
adapter. Otherwise key_j is the adapter's content-bound identity.
"""

import hashlib

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
) -> None:
    """Appends to `hashes` the hash of every full block of `token_ids` not hashed yet (O(new blocks)).

    The same hashes as `hash_block` over each block in turn; the new blocks' tokens are converted to
    bytes in one call (a 64k-token prompt is 4096 blocks, hashed on the engine's thread as it arrives:
    converting block by block took three times as long)."""
    first, end = len(hashes), len(token_ids) // block_size
    if first >= end:
        return
    data = np.asarray(token_ids[first * block_size : end * block_size], dtype=np.int64).tobytes()
    step = block_size * 8
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
