"""Pure-jnp ragged paged attention: the oracle for the Pallas kernels and the CPU fallback.

A step's tokens are flattened: sequence `s` owns query rows `cu_q_lens[s]:cu_q_lens[s+1]`, which are
its *last* `q_len` tokens; its whole context (cached + new) is `kv_lens[s]` tokens stored in pages
`page_indices[s, :]` of the cache. Query row i of sequence s sits at absolute position
`kv_lens[s] - q_len + i` and attends causally to every position <= its own (and, with a sliding
window W, to positions > pos - W). Rows past `cu_q_lens[num_seqs]` are padding and come out zero.

Memory stays O(T * P * block_size) per sequence: the loop runs over sequences, not tokens, so a
long prefill chunk never materialises a per-token copy of the context.
"""

import jax
import jax.numpy as jnp


def write_kv_reference(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    k,  # [T, Hkv, D] new keys of this step
    v,  # [T, Hkv, D]
    slot_mapping,  # i32[T] flat slot (block * block_size + offset); -1 = padding, not written
):
    """Scatter this step's K/V into the paged cache. Returns the updated (k_pages, v_pages)."""
    n, b, h, d = k_pages.shape
    # -1 must not wrap around to the last slot: send it out of range and drop it.
    slots = jnp.where(slot_mapping < 0, n * b, slot_mapping)
    k_pages = k_pages.reshape(n * b, h, d).at[slots].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.reshape(n * b, h, d).at[slots].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages.reshape(n, b, h, d), v_pages.reshape(n, b, h, d)


def apply_rope(x, positions, inv_freq):
    """x [T, H, D] rotated in HF's rotate-half layout; positions i32[T]; inv_freq f32[D / 2]."""
    ang = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rot * sin).astype(x.dtype)


def write_kv_rope_reference(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    qkv,  # [T, q_size + 2 * Hkv * D] fused projection: q, then k, then v
    positions,  # i32[T]
    inv_freq,  # f32[D / 2]
    slot_mapping,  # i32[T]; -1 = padding, not written
    *,
    q_size: int,
    rotate_q: bool = False,
):
    """The keys of `qkv` rotated (`apply_rope`) and its values, written as `write_kv_reference` does; with
    `rotate_q`, also its queries rotated, [T, q_size]."""
    _, _, h, d = k_pages.shape
    t = qkv.shape[0]
    k = apply_rope(qkv[:, q_size : q_size + h * d].reshape(t, h, d), positions, inv_freq)
    v = qkv[:, q_size + h * d :].reshape(t, h, d)
    kv = write_kv_reference(k_pages, v_pages, k, v, slot_mapping)
    if not rotate_q:
        return kv
    return (*kv, apply_rope(qkv[:, :q_size].reshape(t, q_size // d, d), positions, inv_freq).reshape(t, q_size))


def ragged_paged_attention_reference(
    q,  # [T, Hq, D]
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    kv_lens,  # i32[S] context length of each sequence, this step's tokens included
    page_indices,  # i32[S, P] cache blocks of each sequence, in order
    cu_q_lens,  # i32[S + 1] query row offsets
    num_seqs,  # i32[] or i32[1] number of valid sequences (<= S)
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """Attention output [T, Hq, D] in q's dtype (softmax in float32)."""
    t, hq, d = q.shape
    _, bs, hkv, _ = k_pages.shape
    p = page_indices.shape[1]
    g = hq // hkv
    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    qf = q.astype(jnp.float32).reshape(t, hkv, g, d)
    rows = jnp.arange(t, dtype=jnp.int32)
    kv_pos = jnp.arange(p * bs, dtype=jnp.int32)

    def one_seq(s, out):
        start, end = cu_q_lens[s], cu_q_lens[s + 1]
        kv_len = kv_lens[s]
        k = k_pages[page_indices[s]].reshape(p * bs, hkv, d).astype(jnp.float32)
        v = v_pages[page_indices[s]].reshape(p * bs, hkv, d).astype(jnp.float32)
        q_pos = kv_len - (end - start) + (rows - start)  # [T]
        scores = jnp.einsum("thgd,khd->thgk", qf, k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        mask = (kv_pos[None, :] < kv_len) & (kv_pos[None, :] <= q_pos[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        m = jnp.max(scores, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.exp(scores - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("thgk,khd->thgd", e, v) / jnp.where(denom == 0, 1.0, denom)
        in_seq = (rows >= start) & (rows < end)
        return jnp.where(in_seq[:, None, None, None], o, out)

    out = jax.lax.fori_loop(0, num_seqs, one_seq, jnp.zeros_like(qf))
    return out.reshape(t, hq, d).astype(q.dtype)
