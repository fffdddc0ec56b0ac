"""One sequence's prefill chunk split into prefix and self attention, merged by log-sum-exp
(pallas_kernels/ragged_paged_attention/split_prefill.py), against the ragged reference.

The jnp form (impl="reference") runs the same split, gather and merge as the cuDNN form; cuDNN itself needs
an NVIDIA GPU (bench/attention.py checks it there against cuDNN's dense attention)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference, split_prefill_attention

HQ, HKV, D, BS, NB, T, P = 4, 2, 16, 8, 24, 32, 12
SCALE = D**-0.5


def step(n: int, p0: int, dtype=jnp.float32, seed=0):
    """A cache holding one sequence of p0 + n keys (pages scattered), the chunk's n query rows padded to T."""
    rng = np.random.default_rng(seed)
    k_pages = jnp.asarray(rng.standard_normal((NB, BS, HKV, D)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((NB, BS, HKV, D)), dtype)
    q = jnp.asarray(rng.standard_normal((T, HQ, D)), dtype)
    pages = rng.permutation(NB)[:P].astype(np.int32)
    pos = p0 + np.arange(n)
    slots = np.full(T, -1, np.int32)
    slots[:n] = pages[pos // BS] * BS + pos % BS
    meta = (jnp.array([p0 + n, 0], jnp.int32), jnp.asarray(np.stack([pages, np.zeros(P, np.int32)])),
            jnp.array([0, n, n], jnp.int32), jnp.array([1], jnp.int32))  # fmt: skip
    return q, k_pages, v_pages, meta, jnp.asarray(slots)


@functools.cache
def _split():
    return jax.jit(functools.partial(split_prefill_attention, sm_scale=SCALE, impl="reference"))


@functools.cache
def _ref():
    return jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=SCALE))


@pytest.mark.parametrize("n,p0", [(1, 0), (7, 0), (32, 0), (5, 3), (16, 8), (20, 37), (32, 48), (1, 90)])
def test_split_equals_the_ragged_reference(n, p0):
    q, k, v, meta, slots = step(n, p0, seed=n * 100 + p0)
    got = np.asarray(_split()(q, k, v, *meta, slots))
    want = np.asarray(_ref()(q, k, v, *meta))
    np.testing.assert_allclose(got[:n], want[:n], rtol=2e-5, atol=2e-5)
    assert not got[n:].any()  # padding rows are zero


def test_bf16_cache_and_queries():
    q, k, v, meta, slots = step(24, 40, jnp.bfloat16, seed=3)
    got = np.asarray(_split()(q, k, v, *meta, slots), np.float32)
    want = np.asarray(_ref()(q, k, v, *meta), np.float32)
    assert got.dtype == np.float32 and _split()(q, k, v, *meta, slots).dtype == jnp.bfloat16
    np.testing.assert_allclose(got[:24], want[:24], rtol=2e-2, atol=2e-2)


def test_arguments_are_checked_by_name():
    q, k, v, meta, slots = step(4, 4)
    with pytest.raises(ValueError, match="impl"):
        split_prefill_attention(q, k, v, *meta, slots, sm_scale=SCALE, impl="triton")
    with pytest.raises(ValueError, match="slot_mapping"):
        split_prefill_attention(q, k, v, *meta, slots[:4], sm_scale=SCALE, impl="reference")
    with pytest.raises(ValueError, match="k_pages"):
        split_prefill_attention(q, k[..., :8], v, *meta, slots, sm_scale=SCALE, impl="reference")


def test_the_last_sequence_of_a_mixed_step():
    """Decode rows and a short chunk first, the split chunk last: split (its rows) + the reference over the
    others (num_seqs - 1) is the reference over all; the split leaves the other rows zero."""
    rng = np.random.default_rng(9)
    k = jnp.asarray(rng.standard_normal((NB, BS, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((NB, BS, HKV, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((T, HQ, D)), jnp.float32)
    pages = rng.permutation(NB)[: 3 * 8].reshape(3, 8).astype(np.int32)
    q_lens, kv_lens = [1, 5, 20], [30, 15, 33]  # the last: 20 rows after a prefix of 13
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    slots = np.full(T, -1, np.int32)
    for s in range(3):
        pos = kv_lens[s] - q_lens[s] + np.arange(q_lens[s])
        slots[cu[s] : cu[s + 1]] = pages[s][pos // BS] * BS + pos % BS
    meta = [jnp.asarray(kv_lens, jnp.int32), jnp.asarray(pages), jnp.asarray(cu)]
    split = np.asarray(_split()(q, k, v, *meta, jnp.array([3], jnp.int32), jnp.asarray(slots)))
    others = np.asarray(_ref()(q, k, v, *meta, jnp.array([2], jnp.int32)))
    want = np.asarray(_ref()(q, k, v, *meta, jnp.array([3], jnp.int32)))
    assert not split[: cu[2]].any() and not split[cu[3] :].any()
    np.testing.assert_allclose(split + others, want, rtol=2e-5, atol=2e-5)
