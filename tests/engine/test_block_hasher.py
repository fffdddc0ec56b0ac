"""The base-aligned hashing rule (docs/architecture.md, "Prefix reuse"), block by block."""

from hypothesis import given, settings
from hypothesis import strategies as st

from jalora.engine.block_hasher import SEED, block_key, extend_block_hashes, hash_block, num_base_keyed_blocks

B = 4
TOKENS = list(range(100, 120))  # 5 full blocks
ID = b"adapter-identity"


def hashes(tokens, a, identity):
    out = []
    extend_block_hashes(out, tokens, B, a, identity)
    return out


def test_chain_is_reproducible_and_starts_from_the_fixed_seed():
    base = hashes(TOKENS, None, None)
    assert len(base) == 5
    assert base[0] == hash_block(SEED, TOKENS[:4], None)
    assert base[1] == hash_block(base[0], TOKENS[4:8], None)
    assert hashes(TOKENS, None, None) == base


def test_blocks_before_activation_are_base_blocks_and_the_rest_adapter_keyed():
    base = hashes(TOKENS, None, None)
    a = 10  # block 2 (tokens 8..11) straddles the activation index
    alora = hashes(TOKENS, a, ID)
    assert alora[:2] == base[:2]  # blocks ending at or before a: shared with the base model
    assert all(x != y for x, y in zip(alora[2:], base[2:]))
    assert block_key(1, B, a, ID) is None and block_key(2, B, a, ID) is not None
    assert hashes(TOKENS, 8, ID)[:2] == base[:2]  # a on a boundary: block 1 ends exactly at a


def test_plain_lora_keys_every_block():
    base = hashes(TOKENS, None, None)
    lora = hashes(TOKENS, 0, ID)
    assert all(x != y for x, y in zip(lora, base))


def test_activation_offset_inside_the_straddling_block_is_part_of_its_key():
    # The same tokens activated at 9 or at 10 hold different KV in block 2 and everything after it.
    h9, h10 = hashes(TOKENS, 9, ID), hashes(TOKENS, 10, ID)
    assert h9[:2] == h10[:2]
    assert all(x != y for x, y in zip(h9[2:], h10[2:]))


def test_identity_is_part_of_every_adapted_block():
    assert all(x != y for x, y in zip(hashes(TOKENS, 6, ID)[1:], hashes(TOKENS, 6, b"other")[1:]))


def test_extension_hashes_only_new_full_blocks():
    out = []
    extend_block_hashes(out, TOKENS[:6], B, None, None)
    assert len(out) == 1
    extend_block_hashes(out, TOKENS, B, None, None)
    assert out == hashes(TOKENS, None, None)


def test_base_keyed_block_count_follows_block_key():
    """The prefix-cache metrics split hits by key with this count: it must be block_key's rule."""
    for a, identity in [(None, None), (0, ID), (3, ID), (4, ID), (10, ID), (19, ID), (40, ID)]:
        for n in range(6):
            want = sum(block_key(j, B, a, identity) is None for j in range(n))
            assert num_base_keyed_blocks(n, B, a, identity) == want, (a, n)


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**40), max_size=80),
    block_size=st.sampled_from([1, 2, 3, 4, 16]),
    activation=st.one_of(st.none(), st.integers(0, 90)),
    identity=st.sampled_from([None, ID]),
    cuts=st.lists(st.integers(0, 80), max_size=3),
)
def test_extending_in_any_pieces_gives_the_block_by_block_chain(tokens, block_size, activation, identity, cuts):
    """The oracle: hash_block over each full block in turn, keyed by block_key (what the engine keeps
    for a request as its tokens arrive in pieces: the prompt, then generated tokens)."""
    want, prev = [], SEED
    for j in range(len(tokens) // block_size):
        key = block_key(j, block_size, activation, identity)
        prev = hash_block(prev, tokens[j * block_size : (j + 1) * block_size], key)
        want.append(prev)
    got = []
    for cut in [*sorted(cuts), len(tokens)]:
        extend_block_hashes(got, tokens[:cut], block_size, activation, identity)
    assert got == want
