"""Ragged paged attention for TPUs: a Pallas/Mosaic kernel in the RPA design.

The grid runs over fixed blocks of `block_q` query tokens (so q and the output use plain
BlockSpecs and megacore can split them). kv_lens, the flattened page table, cu_q_lens and num_seqs
are scalar-prefetched into SMEM; the K/V caches stay in HBM (`pl.ANY`). For every sequence that
overlaps the block, the kernel walks its context in tiles of `pages_per_tile` pages and copies
each tile's pages with async DMAs into a two-slot VMEM buffer: the DMA of tile j+1 is in flight
while tile j is computed. Rows of the block that belong to other sequences are masked, so a block
may hold many decode rows of different sequences (each sequence's pages are read once per block).

q is laid out as [Hkv, T * g, D] outside the kernel (g = Hq / Hkv), so each kv head's tile meets
its whole GQA group in one [block_q * g, D] x [tile, D]^T matmul.

Tested on CPU in TPU interpret mode (`pltpu.InterpretParams()`); never run on a TPU here.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention.common import validate_inputs, zero_padding_rows
from pallas_kernels.ragged_paged_attention.tuning import TpuAttentionTuning, tpu_attention_tuning

_MASKED = -1e30


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,  # i32[S]
    page_indices_ref,  # i32[S * P] (flattened)
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    # inputs
    q_ref,  # [Hkv, block_q * g, D] this block's query rows (token-major, GQA head minor)
    k_hbm,  # [num_blocks, block_size, Hkv, D] in HBM
    v_hbm,  # [num_blocks, block_size, Hkv, D] in HBM
    # output
    o_ref,  # [Hkv, block_q * g, D]
    # scratch
    k_buf,  # [2, pages_per_tile, block_size, Hkv, D] VMEM
    v_buf,  # [2, pages_per_tile, block_size, Hkv, D] VMEM
    sems,  # DMA semaphores [2 (k/v), 2 (slot)]
    m_sc,  # f32[Hkv, block_q * g, 1]
    l_sc,  # f32[Hkv, block_q * g, 1]
    acc_sc,  # f32[Hkv, block_q * g, D]
    *,
    g: int,
    block_q: int,
    pages_per_tile: int,
    pages_per_seq: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    i = pl.program_id(0)
    num_kv_heads, rows, _ = q_ref.shape
    num_cache_blocks, block_size = k_hbm.shape[0], k_hbm.shape[1]
    tile_tokens = pages_per_tile * block_size
    q_start = i * block_q
    q_end = q_start + block_q
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    row_tok = q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // g  # [M, 1]

    def copies(s, tile, slot):
        out = []
        for j in range(pages_per_tile):
            page_slot = jnp.minimum(tile * pages_per_tile + j, pages_per_seq - 1)
            page = jnp.clip(page_indices_ref[s * pages_per_seq + page_slot], 0, num_cache_blocks - 1)
            out.append(pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, j], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, j], sems.at[1, slot]))
        return out

    def process_seq(s):
        seq_start = cu_q_lens_ref[s]
        seq_end = cu_q_lens_ref[s + 1]
        kv_len = kv_lens_ref[s]
        q_len = seq_end - seq_start
        r0 = jnp.maximum(q_start, seq_start)
        r1 = jnp.minimum(q_end, seq_end)
        first_pos = kv_len - q_len + (r0 - seq_start)
        last_pos = kv_len - q_len + (r1 - 1 - seq_start)
        hi = jnp.minimum(kv_len, last_pos + 1)
        lo = 0 if sliding_window is None else jnp.maximum(0, first_pos - sliding_window + 1)
        t_lo = lo // tile_tokens
        t_hi = (hi + tile_tokens - 1) // tile_tokens
        q_pos = kv_len - q_len + (row_tok - seq_start)  # [M, 1]

        m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        @pl.when(t_lo < t_hi)
        def _():
            for c in copies(s, t_lo, 0):
                c.start()

        def tile_body(tile, carry):
            slot = (tile - t_lo) % 2

            @pl.when(tile + 1 < t_hi)
            def _():
                for c in copies(s, tile + 1, 1 - slot):
                    c.start()

            for c in copies(s, tile, slot):
                c.wait()

            kpos = tile * tile_tokens + jax.lax.broadcasted_iota(jnp.int32, (1, tile_tokens), 1)
            valid = (kpos < kv_len) & (kpos <= q_pos)
            if sliding_window is not None:
                valid &= kpos > q_pos - sliding_window
            for h in range(num_kv_heads):
                k = k_buf[slot, :, :, h, :].reshape(tile_tokens, -1)
                v = v_buf[slot, :, :, h, :].reshape(tile_tokens, -1)
                q = q_ref[h]
                s_ = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * sm_scale
                if soft_cap is not None:
                    s_ = soft_cap * jnp.tanh(s_ / soft_cap)
                s_ = jnp.where(valid, s_, _MASKED)
                m_prev = m_sc[h]
                m_new = jnp.maximum(m_prev, jnp.max(s_, axis=1, keepdims=True))
                alpha = jnp.exp(m_prev - m_new)
                p = jnp.where(valid, jnp.exp(s_ - m_new), 0.0)
                l_sc[h] = l_sc[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
                pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
                acc_sc[h] = acc_sc[h] * alpha + pv
                m_sc[h] = m_new
            return carry

        jax.lax.fori_loop(t_lo, t_hi, tile_body, 0)
        in_seq = (row_tok >= seq_start) & (row_tok < seq_end)  # [M, 1]
        denom = l_sc[...]
        out = acc_sc[...] / jnp.where(denom == 0.0, 1.0, denom)
        o_ref[...] = jnp.where(in_seq[None], out.astype(o_ref.dtype), o_ref[...])

    def seq_loop(s, carry):
        seq_start = cu_q_lens_ref[s]
        seq_end = cu_q_lens_ref[s + 1]

        @pl.when((seq_start < q_end) & (seq_end > q_start) & (seq_end > seq_start))
        def _():
            process_seq(s)

        return carry

    jax.lax.fori_loop(0, num_seqs_ref[0], seq_loop, 0)


def ragged_paged_attention_tpu(
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
    block_q: int | None = None,
    pages_per_tile: int | None = None,
    vmem_limit_bytes: int | None = None,
    tuning: TpuAttentionTuning | None = None,
    interpret=False,
):
    """Attention output [T, Hq, D] in q's dtype; same semantics as the reference.

    tuning: the defaults below (static; None = `tpu_attention_tuning()` of the current device).
    Per-call knobs override it: block_q query tokens per grid step (decode-shaped steps, T <= S:
    `tuning.decode_block_q`; else `tuning.prefill_block_rows // g`, at least `tuning.min_block_q`);
    pages_per_tile pages per DMA tile (`tuning.tile_keys / block_size`, at most P);
    vmem_limit_bytes (`tuning.vmem_limit_bytes`).
    interpret: False, True (plain `pltpu.InterpretParams()`) or an `InterpretParams`.
    """
    if tuning is None:
        tuning = tpu_attention_tuning()
    elif not isinstance(tuning, TpuAttentionTuning):
        raise ValueError(f"tuning must be a TpuAttentionTuning or None, got {type(tuning).__name__}")
    validate_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    t, hq, d = q.shape
    _, bs, hkv, _ = k_pages.shape
    s, p = page_indices.shape
    g = hq // hkv
    if block_q is None:
        block_q = max(tuning.min_block_q, tuning.prefill_block_rows // g) if t > s else tuning.decode_block_q
    if pages_per_tile is None:
        pages_per_tile = max(1, min(p, tuning.tile_keys // bs))
    if vmem_limit_bytes is None:
        vmem_limit_bytes = tuning.vmem_limit_bytes
    t_pad = -(-t // block_q) * block_q
    q_t = jnp.pad(q.reshape(t, hkv, g, d), ((0, t_pad - t), (0, 0), (0, 0), (0, 0)))
    q_t = q_t.transpose(1, 0, 2, 3).reshape(hkv, t_pad * g, d)
    rows = block_q * g
    kernel = functools.partial(
        _kernel,
        g=g,
        block_q=block_q,
        pages_per_tile=pages_per_tile,
        pages_per_seq=p,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
    )
    blk = pl.BlockSpec((hkv, rows, d), lambda i, *_: (0, i, 0))
    buf = pltpu.VMEM((2, pages_per_tile, bs, hkv, d), k_pages.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(t_pad // block_q,),
        in_specs=[blk, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=blk,
        scratch_shapes=[
            buf,
            buf,
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((hkv, rows, 1), jnp.float32),
            pltpu.VMEM((hkv, rows, 1), jnp.float32),
            pltpu.VMEM((hkv, rows, d), jnp.float32),
        ],
    )
    if interpret is True:
        interpret = pltpu.InterpretParams()
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((hkv, t_pad * g, d), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit_bytes
        ),
        interpret=interpret if interpret is not False else False,
        name="ragged_paged_attention_tpu",
    )(
        kv_lens,
        page_indices.reshape(s * p),
        cu_q_lens,
        jnp.reshape(num_seqs, (1,)).astype(jnp.int32),
        q_t,
        k_pages,
        v_pages,
    )
    out = out.reshape(hkv, t_pad, g, d).transpose(1, 0, 2, 3).reshape(t_pad, hq, d)[:t]
    return zero_padding_rows(out, cu_q_lens, num_seqs)
