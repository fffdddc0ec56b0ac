"""Input validation and step metadata shared by the ragged paged attention kernels."""

import jax.numpy as jnp
import numpy as np


def validate_inputs(
    q,  # [T, Hq, D]
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    kv_lens,  # i32[S]
    page_indices,  # i32[S, P]
    cu_q_lens,  # i32[S + 1]
    num_seqs,  # i32[] or i32[1]
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
):
    """Static shape/dtype checks; raises ValueError naming the offending argument.

    Only static facts are checked (this runs under jit): the values of kv_lens, cu_q_lens and
    page_indices are the caller's contract (cu_q_lens non-decreasing, q_len <= kv_len, every used
    page index in [0, num_blocks)).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [num_blocks, block_size, Hkv, D], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} must equal k_pages dtype {k_pages.dtype}")
    t, hq, d = q.shape
    _, _, hkv, dk = k_pages.shape
    if dk != d:
        raise ValueError(f"k_pages head_dim {dk} must equal q head_dim {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k_pages kv heads ({hkv})")
    if kv_lens.ndim != 1 or kv_lens.dtype != jnp.int32:
        raise ValueError(f"kv_lens must be i32[S], got {kv_lens.dtype}{list(kv_lens.shape)}")
    s = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != s or page_indices.dtype != jnp.int32:
        raise ValueError(
            f"page_indices must be i32[{s}, P], got {page_indices.dtype}{list(page_indices.shape)}"
        )
    if cu_q_lens.shape != (s + 1,) or cu_q_lens.dtype != jnp.int32:
        raise ValueError(f"cu_q_lens must be i32[{s + 1}], got {cu_q_lens.dtype}{list(cu_q_lens.shape)}")
    if np.size(num_seqs) != 1 or jnp.result_type(num_seqs) not in (jnp.int32, jnp.int64):
        raise ValueError(f"num_seqs must be an int32 scalar or i32[1], got {jnp.result_type(num_seqs)}")
    if not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool):
        raise ValueError(f"sm_scale must be a Python float, got {type(sm_scale).__name__}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, (int, float)) or soft_cap <= 0):
        raise ValueError(f"soft_cap must be a positive float or None, got {soft_cap!r}")


def validate_write_inputs(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    k,  # [T, Hkv, D]
    v,  # [T, Hkv, D]
    slot_mapping,  # i32[T]
):
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages/v_pages must both be [num_blocks, block_size, Hkv, D], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    want = (slot_mapping.shape[0],) + tuple(k_pages.shape[2:]) if slot_mapping.ndim == 1 else None
    if k.shape != want:
        raise ValueError(f"k must be [T, Hkv, D] = {want}, got {k.shape}")
    if v.shape != want:
        raise ValueError(f"v must be [T, Hkv, D] = {want}, got {v.shape}")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[T], got {slot_mapping.dtype}{list(slot_mapping.shape)}")


def validate_write_rope_inputs(k_pages, v_pages, qkv, positions, inv_freq, slot_mapping, *, q_size, rotate_q=False):
    """Static checks of `write_kv_rope`'s arguments; raises ValueError naming the offending argument."""
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages/v_pages must both be [num_blocks, block_size, Hkv, D] of one dtype, got "
                         f"{k_pages.dtype}{list(k_pages.shape)} and {v_pages.dtype}{list(v_pages.shape)}")
    _, _, h, d = k_pages.shape
    if d % 2:
        raise ValueError(f"k_pages head_dim must be even (rotate-half RoPE), got {d}")
    if not isinstance(q_size, int) or isinstance(q_size, bool) or q_size < 0:
        raise ValueError(f"q_size must be an int >= 0, got {q_size!r}")
    if rotate_q and q_size % d:
        raise ValueError(f"q_size must be a multiple of head_dim {d} to rotate the queries (rotate_q), got {q_size}")
    if qkv.ndim != 2 or qkv.shape[1] != q_size + 2 * h * d:
        raise ValueError(f"qkv must be [T, q_size + 2 * Hkv * D] = [T, {q_size + 2 * h * d}], got {list(qkv.shape)}")
    t = qkv.shape[0]
    for name, x in (("positions", positions), ("slot_mapping", slot_mapping)):
        if x.shape != (t,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be i32[{t}], got {x.dtype}{list(x.shape)}")
    if inv_freq.shape != (d // 2,) or inv_freq.dtype != jnp.float32:
        raise ValueError(f"inv_freq must be f32[{d // 2}], got {inv_freq.dtype}{list(inv_freq.shape)}")


def q_block_metadata(
    kv_lens,  # i32[S]
    cu_q_lens,  # i32[S + 1]
    num_seqs,  # i32[] or i32[1]
    *,
    block_q: int,  # query tokens per block
    num_blocks: int,  # static upper bound on the number of blocks
):
    """Split every sequence's query rows into blocks of `block_q` tokens that never cross sequences.

    Returns (blk_seq i32[num_blocks], blk_q0 i32[num_blocks]): the sequence of each block (-1 for
    unused blocks) and its first query row. `num_blocks >= cdiv(T, block_q) + min(S, T)` always
    suffices: each non-empty sequence adds at most one partial block.
    """
    s = kv_lens.shape[0]
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    nblk = jnp.where(jnp.arange(s) < n, (q_lens + block_q - 1) // block_q, 0)
    cum = jnp.cumsum(nblk)  # inclusive
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all: one fused compare-and-count. The default binary-search "scan" is an XLA while loop,
    # which on GPU syncs with the host every iteration (measured ~100 us per call at batch 8..256).
    seq = jnp.searchsorted(cum, b, side="right", method="compare_all")
    seq = jnp.minimum(seq, s - 1).astype(jnp.int32)
    first_blk = cum[seq] - nblk[seq]
    q0 = cu_q_lens[seq] + (b - first_blk) * block_q
    valid = b < cum[-1]
    return jnp.where(valid, seq, -1).astype(jnp.int32), jnp.where(valid, q0, 0).astype(jnp.int32)


def zero_padding_rows(out, cu_q_lens, num_seqs):
    """Rows past cu_q_lens[num_seqs] are padding: force them to exactly zero."""
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)
    return jnp.where((rows < cu_q_lens[n])[:, None, None], out, jnp.zeros((), out.dtype))
