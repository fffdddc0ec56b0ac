"""Ragged paged attention kernels (GPU kernel in interpret mode, TPU kernel in TPU interpret mode)
against the pure-jnp reference, on random ragged batches drawn by hypothesis.

Shapes are static per case (one compile each); hypothesis draws the ragged values: number of
sequences, query lengths (empty, one-token decode rows, prefill chunks), kv_lens (on page
boundaries, maximal pages, anything in between) and page tables.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.ragged_paged_attention import (
    GpuAttentionTuning,
    TpuAttentionTuning,
    gpu_attention_tuning,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    tpu_attention_tuning,
    write_kv,
    write_kv_rope,
    write_kv_rope_reference,
)
from pallas_kernels.ragged_paged_attention.tuning import (
    DEFAULT_GPU_ATTENTION_TUNING,
    DEFAULT_TPU_ATTENTION_TUNING,
    H200_GPU_ATTENTION_TUNING,
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
    # the splits merged by XLA (the tuning's combine_kernel off; the cases above merge them with the kernel,
    # programs of 64 rows over 5 * 8 here: one partial program), soft cap, bf16; and 3 static splits, window,
    # programs of 16 rows through the kernel
    "g8_cap_decode_xla_combine": dict(t=5, s=6, p=5, bs=16, hq=8, hkv=1, d=64, cap=5.0, dtype=jnp.bfloat16,
                                      tuning=(("block_k", 16), ("tuning", GpuAttentionTuning(combine_kernel=False)))),
    # the merge's programs: 64 rows x 32 columns, and its default tiling (16 x 64, one program per head's
    # columns); the cases above are small enough for its small tiling (8 x 16)
    "g8_cap_decode_combine_rows64": dict(t=5, s=6, p=5, bs=16, hq=8, hkv=1, d=64, cap=5.0, dtype=jnp.bfloat16,
                                         tuning=(("block_k", 16), ("tuning", GpuAttentionTuning(
                                             combine_block_rows=64, combine_block_cols=32,
                                             combine_small_max_tokens=0)))),
    "g8_cap_decode_combine_default_tiling": dict(t=5, s=6, p=5, bs=16, hq=8, hkv=1, d=64, cap=5.0, dtype=jnp.bfloat16,
                                                 tuning=(("block_k", 16), ("tuning", GpuAttentionTuning(
                                                     combine_small_max_tokens=0)))),
    # the merge with the splits as a tensor axis: 12 splits padded to 16 (decode, dynamic: some of them
    # neutral), and 3 static splits with a window over 128-wide heads (programs of 16 x 128 columns)
    "g4_decode_dynamic_splits_axis_combine": dict(t=4, s=8, p=12, bs=16, hq=8, hkv=2, d=64, tuning=(
        ("block_k", 16), ("tuning", GpuAttentionTuning(combine_axis_min_splits=1)))),
    "g4_d128_bs32_window_split_axis_combine": dict(t=16, s=3, p=3, bs=32, hq=8, hkv=2, d=128, window=20, tuning=(
        ("num_kv_splits", 3), ("block_k", 16), ("tuning", GpuAttentionTuning(combine_axis_min_splits=1)))),
    # 32 static splits over 40 kv tiles: the default tuning's merge takes them as a tensor axis
    # (combine_axis_min_splits, as for the long grid's 64)
    "g4_32_splits_default_axis_combine": dict(t=4, s=8, p=40, bs=16, hq=8, hkv=2, d=64, tuning=(
        ("num_kv_splits", 32), ("block_k", 16))),
    "g4_d128_bs32_window_split_xla_combine": dict(
        t=16, s=3, p=3, bs=32, hq=8, hkv=2, d=128, window=20,
        tuning=(("num_kv_splits", 3), ("block_k", 16), ("tuning", GpuAttentionTuning(combine_kernel=False)))),
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


def _np_write_kv(k_pages, v_pages, k, v, slots):
    """The oracle of a K/V write: a copy of each cache with token t's rows at flat slot slots[t] (-1: none)."""
    out = []
    for pages, x in ((k_pages, k), (v_pages, v)):
        flat = np.array(pages).reshape(-1, *pages.shape[2:])
        for t, slot in enumerate(np.asarray(slots)):
            if slot >= 0:
                flat[slot] = np.asarray(x[t])
        out.append(flat.reshape(pages.shape))
    return out


def _np_rope(x, positions, inv_freq):
    """Rotate-half RoPE in float64: x [T, heads, D] at positions [T]."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    ang = np.asarray(positions, np.float64)[:, None, None] * np.asarray(inv_freq, np.float64)[None, None, :]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def test_write_kv_skips_padding_slots():
    """A padding slot (-1) writes nothing: not the last slot (where -1 would wrap to), not slot 0; no real
    token writes either, so a wrapped write would show."""
    rng = np.random.default_rng(0)
    k_pages = jnp.asarray(rng.standard_normal((3, 4, 2, 8)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((3, 4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    slots = jnp.array([5, -1, 6], jnp.int32)
    nk, nv = jax.jit(write_kv, donate_argnums=(0, 1))(k_pages + 0, v_pages + 0, k, v, slots)
    ok, ov = _np_write_kv(k_pages, v_pages, k, v, slots)
    np.testing.assert_array_equal(nk, ok)
    np.testing.assert_array_equal(nv, ov)
    np.testing.assert_array_equal(nk[2, 3], k_pages[2, 3])  # the last slot
    np.testing.assert_array_equal(nk[1, 1], k[0])


@pytest.mark.parametrize("hkv,d,dtype,q_heads", [(2, 16, jnp.float32, 4), (3, 16, jnp.bfloat16, 6),
                                                 (2, 16, jnp.float32, 5)])  # fmt: skip
def test_write_kv_rope_kernel_equals_the_reference(hkv, d, dtype, q_heads):
    """The one-launch kernel (interpret mode) rotates the keys of the fused projection and writes them and
    the values where the reference does, and nothing else: a row of Hkv * D = 48 columns (not a power of
    two), a bf16 cache, a padding slot (-1 must not land on the last row or on row 0, which no token
    writes), positions far from 0 (the rotation matters). With rotate_q the queries too, in blocks of Hkv * D
    columns (5 heads of 16 over blocks of 32: the last block half past q)."""
    rng = np.random.default_rng(0)
    t, q_size = 4, q_heads * d
    k_pages = jnp.asarray(rng.standard_normal((3, 4, hkv, d)), dtype)
    v_pages = jnp.asarray(rng.standard_normal((3, 4, hkv, d)), dtype)
    qkv = jnp.asarray(rng.standard_normal((t, q_size + 2 * hkv * d)), dtype)
    positions = jnp.array([7, 0, 1000, 33], jnp.int32)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    slots = jnp.array([5, -1, 6, 2], jnp.int32)
    kernel = functools.partial(write_kv_rope, q_size=q_size, impl="gpu", interpret=True)
    nk, nv = jax.jit(kernel, donate_argnums=(0, 1))(k_pages + 0, v_pages + 0, qkv, positions, inv_freq, slots)
    rk, rv = write_kv_rope_reference(k_pages, v_pages, qkv, positions, inv_freq, slots, q_size=q_size)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # cos/sin of the kernel's lowering: one ulp of the cache
    # rotate_q: the same caches, and every row's queries rotated as apply_rope does (the padding row's too)
    kernel_q = functools.partial(kernel, rotate_q=True)
    *kv_q, q = jax.jit(kernel_q, donate_argnums=(0, 1))(k_pages + 0, v_pages + 0, qkv, positions, inv_freq, slots)
    *ref_kv_q, ref_q = write_kv_rope_reference(k_pages, v_pages, qkv, positions, inv_freq, slots, q_size=q_size,
                                               rotate_q=True)  # fmt: skip
    assert q.shape == (t, q_size) and q.dtype == dtype
    np.testing.assert_allclose(np.asarray(q, np.float32), np.asarray(ref_q, np.float32), rtol=tol, atol=tol)
    heads = _np_rope(qkv[:, :q_size].reshape(t, q_size // d, d).astype(jnp.float32), positions, inv_freq)
    # (float64 angles against float32 ones: at position 1000 the f32 angle is off by up to half an ulp of 1000)
    np.testing.assert_allclose(np.asarray(ref_q, np.float32), heads.reshape(t, q_size), atol=max(tol, 1e-4))
    assert not np.allclose(np.asarray(q[2], np.float32), np.asarray(qkv[2, :q_size], np.float32), atol=0.1)
    for a, b in ((kv_q[0], nk), (kv_q[1], nv), (ref_kv_q[0], rk), (ref_kv_q[1], rv)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.asarray(nk, np.float32), np.asarray(rk, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(nv, rv)
    np.testing.assert_array_equal(nv[1, 2], qkv[2, q_size + hkv * d:].reshape(hkv, d))
    assert not np.allclose(np.asarray(nk[1, 2], np.float32),
                           np.asarray(qkv[2, q_size:q_size + hkv * d].reshape(hkv, d), np.float32), atol=0.1)
    untouched = np.ones(12, bool)
    untouched[[5, 6, 2]] = False
    assert untouched[0] and untouched[11]
    for new, old in ((nk, k_pages), (nv, v_pages)):
        np.testing.assert_array_equal(np.asarray(new).reshape(12, hkv, d)[untouched],
                                      np.asarray(old).reshape(12, hkv, d)[untouched])  # fmt: skip


def test_write_kv_rope_refuses_bad_arguments_by_name():
    k = jnp.zeros((3, 4, 2, 16), jnp.float32)
    qkv = jnp.zeros((4, 32 + 64), jnp.float32)
    pos, slots, inv = jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32), jnp.zeros(8, jnp.float32)
    for kw, field in ((dict(qkv=qkv[:, 1:]), "qkv"), (dict(positions=pos[:3]), "positions"),
                      (dict(slot_mapping=slots.astype(jnp.float32)), "slot_mapping"),
                      (dict(inv_freq=inv[:4]), "inv_freq"), (dict(impl="tpu"), "impl"),
                      (dict(impl="gpu", interpret=False), "impl='gpu'")):  # fmt: skip
        args = dict(k_pages=k, v_pages=k, qkv=qkv, positions=pos, inv_freq=inv, slot_mapping=slots) | kw
        with pytest.raises(ValueError, match=field):
            write_kv_rope(**args, q_size=32)
    with pytest.raises(ValueError, match="q_size must be a multiple of head_dim 16"):  # (queries of whole heads)
        write_kv_rope(k, k, jnp.zeros((4, 24 + 64), jnp.float32), pos, inv, slots, q_size=24, rotate_q=True)


def test_decode_split_rule():
    from pallas_kernels.ragged_paged_attention.gpu import decode_grid_splits, split_rule

    tu = GpuAttentionTuning()  # the default rule
    assert [int(split_rule(n, tu)) for n in (8, 64, 65, 256, 512, 1024, 1025)] == [16, 16, 4, 4, 2, 2, 1]
    assert int(split_rule(jnp.int32(32), tu)) == 16  # traced form, as in the kernel
    assert decode_grid_splits(16, 8, max_kv=65536, block_k=64, tuning=tu) == 16  # bucket 16 may hold one sequence
    assert decode_grid_splits(64, 8, max_kv=65536, block_k=64, tuning=tu) == 2  # > 32 sequences
    assert decode_grid_splits(16, 8, max_kv=128, block_k=64, tuning=tu) == 2  # never more splits than key tiles


def test_dynamic_splits_use_fewer_programs_than_the_grid():
    """16 kv heads x 6 sequences = 96 programs: split_rule wants 4 of the 8 splits the grid holds, so
    half the split programs get empty ranges; the combine must still equal the reference."""
    cfg = dict(t=8, s=8, p=8, bs=16, hq=16, hkv=16, d=16, tuning=(("block_k", 16),))
    _check("gpu", (6, [1, 1, 1, 1, 1, 1], [128, 1, 77, 16, 100, 33], 3), cfg, cfg["tuning"])


# ----------------------------------------------------------------------------- tuning records


def test_split_rule_follows_the_given_tuning():
    from pallas_kernels.ragged_paged_attention.gpu import decode_grid_splits, default_num_kv_splits, split_rule

    wide = GpuAttentionTuning(split_rule=(64, ((16, 48), (64, 12), (256, 2), (1024, 1))))
    programs = (1, 16, 17, 64, 65, 256, 257, 1024, 1025)
    assert [split_rule(n, wide) for n in programs] == [64, 64, 16, 16, 4, 4, 2, 2, 1]
    assert [int(split_rule(jnp.int32(n), wide)) for n in programs] == [64, 64, 16, 16, 4, 4, 2, 2, 1]
    small = GpuAttentionTuning(split_rule=(8, ((32, 4), (128, 3))))
    assert [split_rule(n, small) for n in (1, 32, 33, 128, 129)] == [8, 8, 4, 4, 1]
    assert [split_rule(n, GpuAttentionTuning(split_rule=(1, ()))) for n in (1, 10**6)] == [1, 1]
    # the grid takes the most a bucket may want, capped by the key tiles
    assert decode_grid_splits(16, 1, max_kv=65536, block_k=64, tuning=wide) == 64
    assert decode_grid_splits(16, 8, max_kv=65536, block_k=64, tuning=wide) == 64  # 8 programs
    assert decode_grid_splits(16, 8, max_kv=1024, block_k=64, tuning=wide) == 16  # 16 key tiles
    # the static heuristic reads the SM count and its caps from the record
    assert default_num_kv_splits(8, 8, 8, 2, 65536, GpuAttentionTuning()) == 8  # 64 programs, 264 wanted
    assert default_num_kv_splits(8, 8, 8, 2, 65536, GpuAttentionTuning(num_sms=16)) == 1
    assert default_num_kv_splits(8, 8, 8, 2, 65536, GpuAttentionTuning(static_max_splits=2)) == 2
    assert default_num_kv_splits(8, 8, 8, 2, 1024, GpuAttentionTuning(static_min_keys_per_split=256)) == 4


def test_tuning_records_are_hashable_and_checked():
    a = GpuAttentionTuning(split_rule=[4, [[8, 2]]])  # lists in: stored as tuples
    assert a.split_rule == (4, ((8, 2),))
    assert hash(a) == hash(GpuAttentionTuning(split_rule=(4, ((8, 2),))))
    assert GpuAttentionTuning() == DEFAULT_GPU_ATTENTION_TUNING
    with pytest.raises(ValueError, match="split_rule"):
        GpuAttentionTuning(split_rule=(4, ((8, 2), (16, 2))))  # would reach zero splits
    with pytest.raises(ValueError, match="increasing"):
        GpuAttentionTuning(split_rule=(16, ((64, 2), (8, 2))))
    with pytest.raises(ValueError, match="combine_block_rows"):
        GpuAttentionTuning(combine_block_rows=24)
    with pytest.raises(ValueError, match="num_sms"):
        GpuAttentionTuning(num_sms=0)
    with pytest.raises(ValueError, match="combine_small_max_splits"):
        GpuAttentionTuning(combine_small_max_splits=-1)
    with pytest.raises(ValueError, match="combine_small_block_cols"):
        GpuAttentionTuning(combine_small_block_cols=12)
    with pytest.raises(ValueError, match="tile_keys"):
        TpuAttentionTuning(tile_keys=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.num_sms = 1


def test_combine_tiling_is_small_only_within_both_bounds():
    """The merge's (rows, columns, warps): the small tiling for a step of at most combine_small_max_tokens
    tokens and combine_small_max_splits splits (batch-1 decode: the 16-token bucket, 16 splits), the default one
    past either bound (batch 64's bucket; the long grid's 64 splits where they are unrolled); 0 tokens turns the
    small one off. From combine_axis_min_splits splits on (the long grid's 64), the split-axis merge's tiling:
    16 rows, columns within combine_axis_elems elements over every split, 16 at least."""
    from pallas_kernels.ragged_paged_attention.gpu import combine_tiling, split_axis_merge

    t = GpuAttentionTuning()
    assert combine_tiling(16, 16, t) == (8, 16, 1)
    assert combine_tiling(64, 2, t) == combine_tiling(32, 4, t) == (16, 64, 4)
    assert combine_tiling(5, 3, dataclasses.replace(t, combine_small_max_tokens=0)) == (16, 64, 4)
    assert [split_axis_merge(s, t) for s in (2, 16, 31, 32, 64)] == [False, False, False, True, True]
    assert combine_tiling(16, 64, t) == combine_tiling(32, 64, t) == (16, 16, 4)  # (the long grid's merge)
    unrolled = dataclasses.replace(t, combine_axis_min_splits=0)  # (0: never)
    assert not split_axis_merge(64, unrolled) and combine_tiling(16, 64, unrolled) == (16, 64, 4)
    axis = dataclasses.replace(t, combine_axis_min_splits=1)
    assert [combine_tiling(16, s, axis) for s in (3, 16, 64)] == [(16, 128, 4), (16, 32, 4), (16, 16, 4)]


def test_tuning_table_lookup():
    assert gpu_attention_tuning("NVIDIA H200") is H200_GPU_ATTENTION_TUNING
    assert gpu_attention_tuning("NVIDIA H100 80GB HBM3") is H200_GPU_ATTENTION_TUNING
    assert gpu_attention_tuning("Some Other GPU") is DEFAULT_GPU_ATTENTION_TUNING
    assert gpu_attention_tuning() is DEFAULT_GPU_ATTENTION_TUNING  # CPU: device kind "cpu"
    assert tpu_attention_tuning("TPU v5 lite") is DEFAULT_TPU_ATTENTION_TUNING
    # the H200 entry is today's measured choice
    h200 = gpu_attention_tuning("NVIDIA H200")
    assert h200.split_rule == (16, ((64, 12), (256, 2), (1024, 1)))
    assert (h200.min_tiles_per_split, h200.dynamic_splits, h200.num_sms) == (1, True, 132)
    assert (h200.decode_block_m, h200.prefill_block_m, h200.decode_block_k, h200.prefill_block_k) == (16, 128, 64, 64)
    assert (h200.num_warps, h200.decode_num_stages, h200.prefill_num_stages) == (4, 2, 3)


def _kernel_grids(fn, *args):
    """The grid of every pallas_call in fn's jaxpr (the kernel's launch shape under a tuning)."""
    grids = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for value in eqn.params.values():  # sub-jaxprs (jit, cond, ...)
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


def test_tuning_reaches_the_gpu_kernel():
    """Decode-shaped step (T=4 <= S=8), 12 key tiles of 16: the record sets the split grid."""
    cfg = dict(t=4, s=8, p=12, bs=16, hq=8, hkv=2, d=64)
    args, _ = _make_inputs((3, [1, 1, 1], [190, 17, 64], 1), **cfg, dtype=jnp.float32)

    def grid(tuning, **knobs):
        fn = functools.partial(ragged_paged_attention, sm_scale=0.125, impl="gpu", interpret=True,
                               tuning=tuning, block_k=16, **knobs)
        g = _kernel_grids(fn, *args)[0]  # the attention kernel (the split merge launches after it)
        return g[2]

    assert grid(None) == 12  # default rule wants 16, capped by the 12 tiles
    assert grid(GpuAttentionTuning(split_rule=(4, ((8, 2),)))) == 4
    assert grid(GpuAttentionTuning(dynamic_splits=False)) == 1  # static: max_kv 192 // 512 keys
    assert grid(GpuAttentionTuning(dynamic_splits=False, static_min_keys_per_split=32)) == 6
    assert grid(GpuAttentionTuning(split_rule=(4, ((8, 2),))), num_kv_splits=3) == 3  # per-call knob wins
    assert grid(GpuAttentionTuning(split_rule=(4, ((8, 2),))), max_kv_splits=8) == 8


def test_long_context_takes_the_long_rule_and_its_grid():
    """long_context=True on a decode-shaped step: the grid and the working splits come from
    long_split_rule (here 8 splits for <= 4 programs, 2 past), the result is the reference's; a
    prefill-shaped step and a tuning without a long rule ignore the hint."""
    from pallas_kernels.ragged_paged_attention.gpu import wants_long_grid

    long = GpuAttentionTuning(split_rule=(2, ()), long_split_rule=(8, ((4, 6),)), long_context_keys=100,
                              decode_block_k=16)  # fmt: skip
    cfg = dict(t=4, s=8, p=12, bs=16, hq=8, hkv=2, d=64)
    args, _ = _make_inputs((2, [1, 1], [190, 17], 4), **cfg, dtype=jnp.float32)

    def grid(tuning, **knobs):
        fn = functools.partial(ragged_paged_attention, sm_scale=0.125, impl="gpu", interpret=True, tuning=tuning,
                               **knobs)  # fmt: skip
        g = _kernel_grids(fn, *args)[0]  # the attention kernel (the split merge launches after it)
        return g[2]

    assert grid(long) == 2 and grid(long, long_context=True) == 8
    assert grid(dataclasses.replace(long, long_split_rule=None), long_context=True) == 2
    tu = (("tuning", long), ("long_context", True))
    _check("gpu", (2, [1, 1], [190, 17], 4), cfg, tu)  # 4 programs: all 8 splits work
    _check("gpu", (3, [1, 1, 1], [190, 100, 33], 5), cfg, tu)  # 6 programs: 2 of the 8 work
    _check("gpu", (4, [1, 9, 1, 2], [96, 40, 3, 9], 6), dict(cfg, t=16, s=4, p=6), tu)  # prefill-shaped
    # when the engine asks for it: a long rule, the threshold reached, more splits than the default rule
    assert wants_long_grid(long, num_seqs=1, num_kv_heads=2, max_kv_len=100)
    assert not wants_long_grid(long, num_seqs=1, num_kv_heads=2, max_kv_len=99)
    assert not wants_long_grid(long, num_seqs=3, num_kv_heads=2, max_kv_len=10**6)  # 6 programs: 2 = 2
    assert not wants_long_grid(dataclasses.replace(long, long_split_rule=None), 1, 2, 10**6)
    assert not wants_long_grid(dataclasses.replace(long, dynamic_splits=False), 1, 2, 10**6)  # (reads no rule)
    h200 = gpu_attention_tuning("NVIDIA H200")
    assert [wants_long_grid(h200, n, 8, 65536) for n in (1, 2, 3)] == [True, True, False]
    assert not wants_long_grid(h200, 1, 8, 16384)
    with pytest.raises(ValueError, match="long_split_rule"):
        GpuAttentionTuning(long_split_rule=(4, ((8, 4),)))


def test_long_chunk_takes_query_blocks_of_the_bucket_and_the_long_grid():
    """long_chunk=True on a decode-shaped step: query blocks of the bucket's rows (here 16 tokens x the GQA
    group of 4 = 64 rows, so a 9-row chunk is one block: its context read once, not once per 4 tokens), the
    long rule with its whole grid (as for one sequence); the result is the reference's, with several chunks,
    chunks longer than a block, windows and soft caps; a prefill-shaped step ignores the hint."""
    from pallas_kernels.ragged_paged_attention.gpu import wants_long_chunk

    long = GpuAttentionTuning(split_rule=(2, ()), long_split_rule=(8, ((4, 6),)), long_context_keys=100,
                              decode_block_k=16, long_chunk_max_rows=16)  # fmt: skip
    cfg = dict(t=16, s=16, p=12, bs=16, hq=8, hkv=2, d=64)
    args, _ = _make_inputs((2, [9, 1], [190, 17], 21), **cfg, dtype=jnp.float32)

    def grid(tuning, **knobs):
        fn = functools.partial(ragged_paged_attention, sm_scale=0.125, impl="gpu", interpret=True, tuning=tuning,
                               **knobs)  # fmt: skip
        return _kernel_grids(fn, *args)[0]  # the attention kernel (the split merge launches after it)

    # blocks of 4 tokens: 16 / 4 + 16 blocks, the decode rule's 2 splits; of 16 tokens: 1 + 16, all 8 splits
    assert grid(long) == (20, 2, 2) and grid(long, long_chunk=True) == (17, 2, 8)
    assert grid(dataclasses.replace(long, long_split_rule=None), long_chunk=True) == (20, 2, 2)
    tu = (("tuning", long), ("long_chunk", True))
    _check("gpu", (2, [9, 1], [190, 17], 21), cfg, tu)  # 4 programs: all 8 splits work
    _check("gpu", (3, [1, 12, 3], [180, 100, 33], 22), dict(cfg, window=50, cap=20.0), tu)  # 6 programs: 2 work
    _check("gpu", (2, [1, 20], [64, 190], 23), dict(cfg, t=24, s=24), tu)  # a 20-row chunk in a block of 32
    # blocks capped at prefill_block_m = 32 rows (8 tokens): chunks of 20 rows over 3 blocks, window and cap
    capped = (("tuning", dataclasses.replace(long, prefill_block_m=32)), ("long_chunk", True))
    _check("gpu", (2, [1, 20], [64, 190], 26), dict(cfg, t=24, s=24), capped)
    _check("gpu", (3, [3, 20, 1], [150, 190, 70], 27), dict(cfg, t=24, s=24, window=60, cap=15.0), capped)
    _check("gpu", (1, [16], [192], 24), dict(cfg, dtype=jnp.bfloat16), tu)  # one chunk filling the bucket
    _check("gpu", (4, [1, 9, 1, 2], [96, 40, 3, 9], 25), dict(cfg, t=16, s=4, p=6), tu)  # prefill-shaped
    # when the engine asks for it: a long rule, a bucket of at most long_chunk_max_rows, the threshold reached, a
    # chunk longer than a decode block holds (decode_block_m 16 / group 4 = 4 tokens)
    assert wants_long_chunk(long, rows=16, max_kv_len=100, longest_chunk=5, group=4)
    assert not wants_long_chunk(long, rows=16, max_kv_len=100, longest_chunk=4, group=4)
    assert not wants_long_chunk(long, rows=16, max_kv_len=99, longest_chunk=9, group=4)
    assert not wants_long_chunk(long, rows=32, max_kv_len=10**6, longest_chunk=9, group=4)
    assert not wants_long_chunk(dataclasses.replace(long, long_split_rule=None), 16, 10**6, 9, 4)
    assert not wants_long_chunk(dataclasses.replace(long, dynamic_splits=False), 16, 10**6, 9, 4)
    on = gpu_attention_tuning("NVIDIA H200")  # (32 rows: on since measured on an H100)
    off = dataclasses.replace(on, long_chunk_max_rows=0)
    assert not any(wants_long_chunk(off, rows, 65536, 18, 4) for rows in (16, 32, 64))
    assert gpu_attention_tuning("NVIDIA H100 80GB HBM3") == on
    assert [wants_long_chunk(on, rows, 65536, 18, 4) for rows in (16, 32, 64)] == [True, True, False]
    assert not wants_long_chunk(on, 32, 16384, 18, 4)
    with pytest.raises(ValueError, match="long_chunk_max_rows"):
        GpuAttentionTuning(long_chunk_max_rows=-1)


NON_DEFAULT_GPU_TUNINGS = {
    # another rule: 4 splits up to 16 programs, 2 past; a floor of 3 key tiles per working split
    "rule4_min3": GpuAttentionTuning(split_rule=(4, ((16, 2),)), min_tiles_per_split=3, decode_block_k=16),
    # the wide rule of bench/results/attention_split_grid.json (64 splits, capped by the key tiles)
    "rule64_min2": GpuAttentionTuning(split_rule=(64, ((16, 48), (64, 12), (256, 2), (1024, 1))),
                                      min_tiles_per_split=2, decode_block_k=16),
    # dynamic splits off: the static heuristic, made to split by a small SM count and key floor
    "static": GpuAttentionTuning(dynamic_splits=False, num_sms=8, static_min_keys_per_split=32,
                                 decode_block_k=16, prefill_block_k=16),
    # other tiles and pipeline depths for both step shapes
    "tiles": GpuAttentionTuning(decode_block_m=32, prefill_block_m=32, decode_block_k=32, prefill_block_k=32,
                                num_warps=2, decode_num_stages=1, prefill_num_stages=2),
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT_GPU_TUNINGS))
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_gpu_kernel_with_non_default_tuning_matches_reference(name, shape):
    tu = (("tuning", NON_DEFAULT_GPU_TUNINGS[name]),)
    if shape == "decode":  # T <= S: the dynamic split path
        cfg = dict(t=5, s=6, p=12, bs=16, hq=8, hkv=2, d=64, window=150)
        _check("gpu", (5, [1, 1, 0, 1, 1], [190, 17, 5, 64, 33], 11), cfg, tu)
    else:  # T > S: prefill chunks and decode rows
        cfg = dict(t=40, s=4, p=6, bs=16, hq=8, hkv=2, d=64, cap=20.0)
        _check("gpu", (4, [1, 24, 1, 9], [96, 40, 3, 9], 12), cfg, tu)


def test_tpu_kernel_with_non_default_tuning_matches_reference():
    tu = (("tuning", TpuAttentionTuning(decode_block_q=16, prefill_block_rows=32, min_block_q=8, tile_keys=32)),)
    cfg = dict(t=24, s=4, p=4, bs=16, hq=4, hkv=2, d=64, window=40)
    _check("tpu", (4, [1, 16, 0, 5], [64, 20, 3, 50], 5), cfg, tu)
    cfg = dict(t=3, s=4, p=4, bs=16, hq=4, hkv=2, d=64)  # decode-shaped: decode_block_q rows per step
    _check("tpu", (3, [1, 1, 1], [64, 20, 3], 6), cfg, tu)


def test_wrong_tuning_type_is_refused():
    q = jnp.zeros((4, 4, 64), jnp.float32)
    kv = jnp.zeros((3, 16, 2, 64), jnp.float32)
    args = (q, kv, kv, jnp.array([4], jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.array([0, 4], jnp.int32),
            jnp.int32(1))
    with pytest.raises(ValueError, match="GpuAttentionTuning"):
        ragged_paged_attention(*args, sm_scale=0.1, impl="gpu", interpret=True, tuning=TpuAttentionTuning())
    with pytest.raises(ValueError, match="TpuAttentionTuning"):
        ragged_paged_attention(*args, sm_scale=0.1, impl="tpu", interpret=True, tuning=GpuAttentionTuning())
