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
        extend_block_hashes(got, tokens[: same + extra // 2], block_size, a, identity, hashed, pool)
        pool.add(got, hashed, a, identity)
        extend_block_hashes(got, tokens, block_size, a, identity, hashed, pool)  # it grows once offered
        assert got == chain(tokens, block_size, a, identity)
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


def test_the_block_manager_offers_a_request_on_admission_and_again_on_release():
    """A base request whose judge arrives after 16 other long requests were admitted (the pool's capacity; the
    base the oldest when released), and one whose prompt was too short to offer at admission, hand their
    blocks to the judge once released: a release makes a request the newest donor, its answer hashed. The
    judge's hashes are its own chain (the answer runs through its straddling block) and its lookup finds the
    base's blocks."""
    from jalora import SamplingParams
    from jalora.adapters.peft import ResolvedAdapter
    from jalora.engine.block_manager import BlockManager
    from jalora.engine.request import Request

    params = SamplingParams(max_tokens=64)
    for prompt_len in (100, 6):  # 25 blocks, or 1 (under min_blocks: not offered at admission)
        bm = BlockManager(num_blocks=400, block_size=B, enable_prefix_caching=True)
        prompt = list(range(1000, 1000 + prompt_len))
        base = Request("base", prompt, params, seed=0)
        bm.lookup(base)
        answer = list(range(5000, 5042))
        assert bm.allocate(base, prompt_len + len(answer))
        base.all_token_ids.extend(answer)
        base.num_computed_tokens = prompt_len + len(answer)
        bm.register(base)
        others = [Request(f"o{i}", [7 + i] * 40, params, seed=0) for i in range(16)]
        for other in others[:15]:
            bm.lookup(other)
        offered = list(bm.donors.entries)
        assert offered.index(id(base.block_hashes)) == 0 if prompt_len == 100 else len(offered) == 15
        bm.release(base)
        bm.lookup(others[15])  # the pool's 17th: its oldest goes, no longer the base
        a = prompt_len + 40  # activated inside the answer: the answer's last 2 tokens in a straddling block
        ids = prompt + answer + [9, 9]
        judge = Request("judge", ids, params, seed=0, adapter_name="j", adapter=ResolvedAdapter(0, ID, a))
        given_before = bm.donors.num_given
        reused = bm.lookup(judge)
        assert judge.block_hashes == chain(ids, B, a, ID)
        assert bm.donors.num_given - given_before == a // B  # every block before the activation
        assert reused == a // B * B  # the base's blocks: found


def test_a_request_whose_hashes_were_cut_is_no_donor():
    """The donors compare token bytes that must line up with the hashes: cut hashes empty the bytes for good."""
    from jalora.engine.block_hasher import HashDonors

    pool = HashDonors(B, min_blocks=1)
    hashes, hashed = [], bytearray()
    extend_block_hashes(hashes, TOKENS, B, None, None, hashed, pool)
    assert len(hashed) == 5 * B * 8
    del hashes[2:]
    extend_block_hashes(hashes, TOKENS + [1, 2, 3, 4], B, None, None, hashed, pool)
    assert hashed == bytearray() and hashes == chain(TOKENS + [1, 2, 3, 4], B, None, None)
    pool.add(hashes, hashed, None, None)
    assert not pool.entries


def test_a_donor_that_shares_a_system_prompt_gives_its_blocks_and_no_more():
    from jalora.engine.block_hasher import HashDonors

    pool = HashDonors(B, min_blocks=1)
    system = list(range(12))  # 3 blocks
    for i in range(3):  # unrelated long requests after the same system prompt
        tokens = system + [100 + i] * 400
        hashes, hashed = [], bytearray()
        extend_block_hashes(hashes, tokens, B, None, None, hashed, pool)
        pool.add(hashes, hashed, None, None)
    assert pool.num_given == 2 * 3  # (the second and third took the system prompt's from the first)
    mine = system + [1, 2, 3, 4, 5, 6, 7, 8] + [99] * 400
    hashes = []
    extend_block_hashes(hashes, mine, B, None, None, bytearray(), pool)
    assert pool.num_given == 3 * 3 and hashes == chain(mine, B, None, None)
