"""A step's last sequence, a prefill chunk, through cuDNN's flash attention: its prefix and its own keys apart.

A prefill chunk (n query rows at context positions [p0, p0 + n), p0 keys already cached) is a large causal
attention, compute-bound: where the Triton-lowered kernel (gpu.py) reaches about half of cuDNN's TFLOP/s.
`split_prefill_attention` computes the rows of the step's LAST sequence only (zeros elsewhere): the caller
runs the kernel over the other sequences (num_seqs - 1: their rows come first) and adds the two.

cuDNN, as JAX calls it, masks causally from the top-left corner only
(query i sees keys <= i): right for n queries over their own n keys, wrong for a chunk after a prefix. So the
chunk runs as two attentions over disjoint keys, each returning its log-sum-exp, merged exactly:

- prefix: the p0 cached keys, every query sees all of them: cuDNN's paged attention over the sequence's
  cache blocks (kv length p0, padding mask; no copy of the prefix).
- self: the chunk's own n keys, gathered from the cache by the step's slots (n rows), causal.
- merge: o = (o_p e^{l_p} + o_s e^{l_s}) / (e^{l_p} + e^{l_s}) in f32; a chunk without a prefix (p0 = 0)
  takes o_s (the prefix call then runs over one key and its weight is zero).

`impl="reference"` runs the same split with jnp attention (f32 scores), so the split, the gather and the
merge are tested on a CPU against the ragged reference; `impl="cudnn"` needs an NVIDIA GPU. No sliding
window or soft cap (the engine keeps such models on the kernel).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.common import validate_inputs

IMPLS = ("cudnn", "reference")


def split_prefill_attention(
    q,  # [T, Hq, D]
    k_pages,  # [num_blocks, block_size, Hkv, D] with this step's keys already written
    v_pages,  # [num_blocks, block_size, Hkv, D]
    kv_lens,  # i32[S] context length of each sequence, this step's tokens included
    page_indices,  # i32[S, P] cache blocks of each sequence, in order
    cu_q_lens,  # i32[S + 1] query row offsets
    num_seqs,  # i32[1] sequences in the step; the last one, j = num_seqs - 1, is the chunk (0: all rows zero)
    slot_mapping,  # i32[T] flat cache slot of each row (-1: padding)
    *,
    sm_scale: float,
    impl: str = "cudnn",
):
    """Attention output [T, Hq, D] in q's dtype of the rows of the step's last sequence (rows
    cu_q_lens[j]..cu_q_lens[j + 1]); every other row is zero."""
    validate_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if slot_mapping.shape != (q.shape[0],):
        raise ValueError(f"slot_mapping must be i32[{q.shape[0]}] (one slot per query row), got {slot_mapping.shape}")
    t, hq, d = q.shape
    nb, bs, hkv, _ = k_pages.shape
    j = jnp.maximum(jnp.reshape(num_seqs, ()) - 1, 0)  # (a step of no sequence, the warm-up's: n = 0)
    r0, n = cu_q_lens[j], cu_q_lens[j + 1] - cu_q_lens[j]
    p0 = kv_lens[j] - n
    # The chunk's rows first (rolled back at the end), then its own keys and values in row order (rows past
    # n read slot 0 and are masked by n).
    q = jnp.roll(q, -r0, axis=0)
    slots = jnp.maximum(jnp.roll(slot_mapping, -r0), 0)
    k_self = k_pages.reshape(nb * bs, hkv, d)[slots]
    v_self = v_pages.reshape(nb * bs, hkv, d)[slots]
    attend = _cudnn if impl == "cudnn" else _reference
    o_p, l_p, o_s, l_s = attend(q, k_pages, v_pages, page_indices[j], k_self, v_self, n, p0, sm_scale)
    # Merge by log-sum-exp ([T, Hq] each); no prefix: its weight is zero whatever its call returned.
    l_p = jnp.where(p0 > 0, l_p, -jnp.inf)
    m = jnp.maximum(l_p, l_s)
    w_p, w_s = jnp.exp(l_p - m), jnp.exp(l_s - m)
    o = (o_p.astype(jnp.float32) * w_p[..., None] + o_s.astype(jnp.float32) * w_s[..., None]) / (w_p + w_s)[..., None]
    valid = jnp.arange(t) < n
    return jnp.roll(jnp.where(valid[:, None, None], o, 0).astype(q.dtype), r0, axis=0)


def _cudnn(q, k_pages, v_pages, pages, k_self, v_self, n, p0, sm_scale):
    """(o_prefix, lse_prefix, o_self, lse_self): outputs [T, Hq, D], natural-log LSE [T, Hq]."""
    from jax._src.cudnn import fused_attention_stablehlo as fa  # (JAX's cuDNN attention, with its LSE)

    nb = k_pages.shape[0]
    # cuDNN's paged layout wants a page table as long as the cache has blocks (batch 1): the sequence's
    # blocks first; the kv length bounds what is read.
    pt = jnp.zeros(nb, jnp.int32).at[: min(nb, pages.shape[0])].set(pages[:nb]).reshape(1, 1, nb, 1)
    qs = jnp.maximum(n, 1).reshape(1).astype(jnp.int32)  # (rows past n are dropped by the caller)
    prefix_len = jnp.maximum(p0, 1).reshape(1).astype(jnp.int32)  # (>= 1 key: a 0-key call is undefined)
    o_p, l_p = fa.paged_attention(q[None], k_pages, v_pages, qs, prefix_len, pt, pt, scale=sm_scale,
                                  mask_type=fa.MaskType.PADDING, return_residual=True)  # fmt: skip
    o_s, l_s = fa.dot_product_attention(q[None], k_self[None], v_self[None], q_seqlen=qs, kv_seqlen=qs,
                                        scale=sm_scale, mask_type=fa.MaskType.PADDING_CAUSAL,
                                        return_residual=True)  # fmt: skip
    return o_p[0], l_p[0].T, o_s[0], l_s[0].T  # (LSE comes as [B, Hq, T])


def _reference(q, k_pages, v_pages, pages, k_self, v_self, n, p0, sm_scale):
    """The same contract as `_cudnn`, in jnp (f32 scores)."""
    _, bs, hkv, d = k_pages.shape
    keys = k_pages[pages].reshape(-1, hkv, d)  # the sequence's blocks in order
    vals = v_pages[pages].reshape(-1, hkv, d)
    rows = jnp.arange(q.shape[0])
    o_p, l_p = _attend(q, keys, vals, jnp.arange(keys.shape[0])[None, :] < jnp.maximum(p0, 1), sm_scale)
    causal = (rows[None, :] <= rows[:, None]) & (rows[None, :] < n)
    o_s, l_s = _attend(q, k_self, v_self, causal, sm_scale)
    return o_p, l_p, o_s, l_s


def _attend(q, k, v, mask, sm_scale):
    """Softmax attention of q [T, Hq, D] over k/v [K, Hkv, D] where mask [T or 1, K]: (out f32, lse [T, Hq])."""
    g = q.shape[1] // k.shape[1]
    kk = jnp.repeat(k, g, axis=1).astype(jnp.float32)
    vv = jnp.repeat(v, g, axis=1).astype(jnp.float32)
    s = jnp.einsum("thd,khd->htk", q.astype(jnp.float32), kk) * sm_scale
    s = jnp.where(mask[None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [Hq, T]
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0)[..., None])
    return jnp.einsum("htk,khd->thd", p, vv), lse.T
