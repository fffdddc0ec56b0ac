"""Ragged paged attention kernels (GPU kernel in interpret mode, TPU kernel in TPU interpret mode)
against the pure-jnp reference, on random ragged batches drawn by hypothesis.

Shapes are static per case (one compile each); hypothesis draws the ragged values: number of
sequences, query lengths (empty, one-token decode rows, prefill chunks), kv_lens (on page
boundaries, maximal pages, anything in between) and page tables.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)


@functools.cache
def _jitted(impl, sm_scale, sliding_window, soft_cap, tuning=()):
    if impl == "reference":
        fn = functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    else:
        fn = functools.partial(ragged_paged_attention, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, impl=impl, interpret=True, **dict(tuning))
    return jax.jit(fn)


@st.composite
def ragged_batch(draw, *, t, s, p, bs):
    """Values of one step: (num_seqs, q_lens, kv_lens, page table seed)."""
    num_seqs = draw(st.integers(0, s))
    budget = t
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["empty", "decode", "chunk", "chunk"]))
        if kind == "empty" or budget == 0:
            q = 0
        elif kind == "decode":
            q = 1
        else:
            q = draw(st.integers(1, min(budget, p * bs)))
        budget -= q
        kv_kind = draw(st.sampled_from(["exact", "boundary", "max", "any"]))
        if kv_kind == "exact":  # first chunk of a fresh prompt
            kv = max(q, 1)
        elif kv_kind == "boundary":
            kv = bs * draw(st.integers(max(1, -(-q // bs)), p))
        elif kv_kind == "max":
            kv = p * bs
        else:
            kv = draw(st.integers(max(q, 1), p * bs))
        q_lens.append(q)
        kv_lens.append(kv)
    seed = draw(st.integers(0, 2**31 - 1))
    return num_seqs, q_lens, kv_lens, seed


def _make_inputs(batch, *, t, s, p, bs, hq, hkv, d, dtype):
    num_seqs, q_lens, kv_lens, seed = batch
    rng = np.random.default_rng(seed)
    num_blocks = s * p + 3
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    used = sum(q_lens)
    q[used:] = np.nan  # padding rows may hold anything; they must come out zero
    k = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    kl = np.zeros(s, np.int32)
    kl[:num_seqs] = kv_lens
    kl[num_seqs:] = rng.integers(0, p * bs + 1, s - num_seqs)  # garbage past num_seqs
    cu = np.full(s + 1, used, np.int32)
    cu[0] = 0
    cu[1 : num_seqs + 1] = np.cumsum(q_lens)
    pages = rng.permutation(num_blocks)[: s * p].reshape(s, p).astype(np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kl),
            jnp.asarray(pages), jnp.asarray(cu), jnp.int32(num_seqs)), used


def _check(impl, batch, cfg, tuning=()):
    t, s, p, bs, hq, hkv, d = (cfg[x] for x in ("t", "s", "p", "bs", "hq", "hkv", "d"))
    dtype = cfg.get("dtype", jnp.float32)
    args, used = _make_inputs(batch, t=t, s=s, p=p, bs=bs, hq=hq, hkv=hkv, d=d, dtype=dtype)
    sm_scale = 1.0 / d**0.5
    window, cap = cfg.get("window"), cfg.get("cap")
    ref = np.asarray(_jitted("reference", sm_scale, window, cap)(*args), np.float32)
    out = np.asarray(_jitted(impl, sm_scale, window, cap, tuning)(*args), np.float32)
    assert out.shape == (t, hq, d)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[used:], 0.0)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out[:used], ref[:used], atol=tol, rtol=tol)
    if used:
        assert np.abs(ref[:used]).max() > 0.05  # the comparison is not between two zeros


GPU_CASES = {
    # GQA ratio 1, head_dim 64, block size 16
    "g1_d64_bs16": dict(t=24, s=4, p=4, bs=16, hq=2, hkv=2, d=64),
    # GQA 4, head_dim 128, block size 32, sliding window, context split in 3
    "g4_d128_bs32_window_split": dict(t=16, s=3, p=3, bs=32, hq=8, hkv=2, d=128, window=20,
                                      tuning=(("num_kv_splits", 3), ("block_k", 16))),
    # GQA 8, soft cap, decode-shaped (T <= S) path
    "g8_cap_decode": dict(t=5, s=6, p=5, bs=16, hq=8, hkv=1, d=64, cap=5.0),
    # GQA 4, block size 128, bf16, window + cap
    "g4_bs128_bf16": dict(t=32, s=3, p=2, bs=128, hq=4, hkv=1, d=64, window=100, cap=10.0,
                          dtype=jnp.bfloat16),
    # decode-shaped with no split count given: the grid has 12 splits, the device uses
    # split_rule(num_seqs * Hkv) of them (empty ranges write neutral partials)
    "g4_decode_dynamic_splits": dict(t=4, s=8, p=12, bs=16, hq=8, hkv=2, d=64, tuning=(("block_k", 16),)),
    # GQA 6 (not a power of two), tiles of 32 keys over pages of 16
    "g6_bs16_bk32": dict(t=12, s=3, p=4, bs=16, hq=6, hkv=1, d=64, tuning=(("block_k", 32),)),
}

TPU_CASES = {
    "g1_d64_bs16": dict(t=24, s=4, p=4, bs=16, hq=2, hkv=2, d=64, tuning=(("pages_per_tile", 2),)),
    "g4_d128_bs32_window": dict(t=16, s=3, p=3, bs=32, hq=8, hkv=2, d=128, window=20,
                                tuning=(("block_q", 4), ("pages_per_tile", 1))),
    "g8_bs128_cap_bf16": dict(t=8, s=4, p=2, bs=128, hq=8, hkv=1, d=64, cap=5.0, dtype=jnp.bfloat16),
}


def _case_test(impl, cases, max_examples):
    @pytest.mark.parametrize("name", sorted(cases))
    @settings(max_examples=max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def test(name, data):
        cfg = cases[name]
        batch = data.draw(ragged_batch(t=cfg["t"], s=cfg["s"], p=cfg["p"], bs=cfg["bs"]))
        _check(impl, batch, cfg, cfg.get("tuning", ()))

    return test


test_gpu_kernel_interpret = _case_test("gpu", GPU_CASES, max_examples=12)
test_tpu_kernel_interpret = _case_test("tpu", TPU_CASES, max_examples=6)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_full_batch_prefill_and_decode(impl):
    """Every edge at once: empty seq, decode rows, a chunk ending on a page boundary, a maximal one."""
    cfg = dict(t=40, s=6, p=4, bs=16, hq=8, hkv=2, d=64, window=33)
    q_lens = [0, 1, 16, 1, 20, 2]
    kv_lens = [5, 64, 48, 17, 64, 2]
    _check(impl, (6, q_lens, kv_lens, 7), cfg)


def test_dispatch_and_validation():
    q = jnp.zeros((4, 4, 64), jnp.float32)
    kv = jnp.zeros((3, 16, 2, 64), jnp.float32)
    kl = jnp.array([4], jnp.int32)
    pi = jnp.zeros((1, 2), jnp.int32)
    cu = jnp.array([0, 4], jnp.int32)
    out = ragged_paged_attention(q, kv, kv, kl, pi, cu, jnp.int32(1), sm_scale=0.1)
    assert out.shape == q.shape  # CPU: reference
    with pytest.raises(ValueError, match="interpret"):
        ragged_paged_attention(q, kv, kv, kl, pi, cu, jnp.int32(1), sm_scale=0.1, impl="gpu")
    with pytest.raises(ValueError, match="kv_lens"):
        ragged_paged_attention(q, kv, kv, kl.astype(jnp.float32), pi, cu, 1, sm_scale=0.1)
    with pytest.raises(ValueError, match="cu_q_lens"):
        ragged_paged_attention(q, kv, kv, kl, pi, cu[:1], 1, sm_scale=0.1)
    with pytest.raises(ValueError, match="multiple"):
        ragged_paged_attention(q[:, :3], kv, kv, kl, pi, cu, 1, sm_scale=0.1)
    with pytest.raises(ValueError, match="page_indices"):
        ragged_paged_attention(q, kv, kv, kl, pi[0], cu, 1, sm_scale=0.1)


def test_write_kv_skips_padding_slots():
    rng = np.random.default_rng(0)
    k_pages = jnp.asarray(rng.standard_normal((3, 4, 2, 8)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((3, 4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    slots = jnp.array([5, -1, 11], jnp.int32)
    nk, nv = jax.jit(write_kv, donate_argnums=(0, 1))(k_pages + 0, v_pages + 0, k, v, slots)
    rk, rv = write_kv_reference(k_pages, v_pages, k, v, slots)
    np.testing.assert_array_equal(nk, rk)
    np.testing.assert_array_equal(nv, rv)
    np.testing.assert_array_equal(nk[1, 1], k[0])
    np.testing.assert_array_equal(nk[2, 3], k[2])
    np.testing.assert_array_equal(nk[2, 3 - 1], k_pages[2, 2])  # neighbours untouched


def test_decode_split_rule():
    from pallas_kernels.ragged_paged_attention.gpu import decode_grid_splits, split_rule

    assert [int(split_rule(n)) for n in (8, 64, 65, 256, 512, 1024, 1025)] == [16, 16, 4, 4, 2, 2, 1]
    assert int(split_rule(jnp.int32(32))) == 16  # traced form, as in the kernel
    assert decode_grid_splits(16, 8, max_kv=65536, block_k=64) == 16  # bucket 16 may hold one sequence
    assert decode_grid_splits(64, 8, max_kv=65536, block_k=64) == 2  # > 32 sequences
    assert decode_grid_splits(16, 8, max_kv=128, block_k=64) == 2  # never more splits than key tiles


def test_dynamic_splits_use_fewer_programs_than_the_grid():
    """16 kv heads x 6 sequences = 96 programs: split_rule wants 4 of the 8 splits the grid holds, so
    half the split programs get empty ranges; the combine must still equal the reference."""
    cfg = dict(t=8, s=8, p=8, bs=16, hq=16, hkv=16, d=16, tuning=(("block_k", 16),))
    _check("gpu", (6, [1, 1, 1, 1, 1, 1], [128, 1, 77, 16, 100, 33], 3), cfg, cfg["tuning"])
