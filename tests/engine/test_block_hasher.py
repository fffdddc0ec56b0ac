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


def chain(tokens, block_size, activation, identity):
    """The oracle chain: hash_block over each full block in turn, keyed by block_key."""
    out, prev = [], SEED
    for j in range(len(tokens) // block_size):
        key = block_key(j, block_size, activation, identity)
        prev = hash_block(prev, tokens[j * block_size : (j + 1) * block_size], key)
        out.append(prev)
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
    want = chain(tokens, block_size, activation, identity)
    got = []
    for cut in [*sorted(cuts), len(tokens)]:
        extend_block_hashes(got, tokens[:cut], block_size, activation, identity)
    assert got == want


KEYS = st.sampled_from([(None, None), (None, ID), (0, ID), (5, ID), (6, ID), (13, ID), (6, b"other"), (60, ID)])


@settings(max_examples=300, deadline=None)
@given(
    donors=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), KEYS), min_size=1, max_size=4),
    length=st.integers(0, 40),
    keys=KEYS,
    block_size=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 3),
)
def test_hashes_taken_from_donors_are_the_chain_of_the_request(donors, length, keys, block_size, seed):
    """Requests whose tokens agree with a donor's up to some point (a base answer and its judge, two judges
    of one context, unrelated prompts): whatever donors are offered, each request's hashes are its own
    chain, and its hashed bytes the int64 bytes of the tokens hashed."""
    import numpy as np

    from jalora.engine.block_hasher import HashDonors

    rng = np.random.default_rng(seed)
    common = rng.integers(0, 50, 80).tolist()
    pool = HashDonors(block_size, capacity=3, min_blocks=1)
    for same, extra, (a, identity) in donors:  # the first `same` tokens shared, then its own
        tokens = common[:same] + rng.integers(50, 99, extra).tolist()
        got, hashed = [], bytearray()
        extend_block_hashes(got, tokens, block_size, a, identity, hashed, pool)
        assert got == chain(tokens, block_size, a, identity)
        pool.add(got, hashed, a, identity)
    a, identity = keys
    tokens = common[:length] + [7, 7]
    got, hashed = [], bytearray()
    extend_block_hashes(got, tokens, block_size, a, identity, hashed, pool)
    extend_block_hashes(got, tokens + [1, 2, 3], block_size, a, identity, hashed, pool)  # extended: donors unused
    assert got == chain(tokens + [1, 2, 3], block_size, a, identity)
    assert bytes(hashed) == np.asarray(tokens + [1, 2, 3], np.int64)[: len(got) * block_size].tobytes()


def test_a_judge_takes_its_base_blocks_from_the_base_request_and_a_lora_none():
    """What the donors are for: an aLoRA judge of a base answer hashes only the blocks from its activation
    on; a plain LoRA request (every block adapter-keyed) and an unrelated prompt take nothing; a second
    judge of the same adapter and activation takes every block the first hashed."""
    from jalora.engine.block_hasher import HashDonors

    pool = HashDonors(B, min_blocks=2)
    base = list(range(1000, 1042))  # 10 full blocks (and 2 tokens)
    got, hashed = [], bytearray()
    extend_block_hashes(got, base, B, None, None, hashed, pool)
    assert pool.num_given == 0
    pool.add(got, hashed, None, None)
    judge = base + [7, 8]  # 11 full blocks, activated at 42: blocks 0..9 base-keyed
    j_hashes, j_hashed = [], bytearray()
    extend_block_hashes(j_hashes, judge, B, 42, ID, j_hashed, pool)
    assert pool.num_given == 10 and j_hashes == chain(judge, B, 42, ID)
    pool.add(j_hashes, j_hashed, 42, ID)
    extend_block_hashes([], judge, B, 0, ID, bytearray(), pool)  # plain LoRA: no block keyed like a donor's
    extend_block_hashes([], [5] + base, B, None, None, bytearray(), pool)  # another first token
    assert pool.num_given == 10
    again = []
    extend_block_hashes(again, judge + [9, 9], B, 42, ID, bytearray(), pool)  # the same judge, 2 more tokens
    assert pool.num_given == 21 and again == chain(judge + [9, 9], B, 42, ID)
