"""Ragged paged attention for GPUs: a Pallas kernel through the Triton lowering.

One launch serves a mixed batch of prefill chunks and decode tokens. The grid is
(query block, kv head, kv split). A query block holds `block_q` tokens of ONE sequence times the
`g = Hq / Hkv` query heads that share a kv head, so each K/V tile is read once for the whole GQA
group (decode rows of a group become the M dimension of the matmul). The blocks are laid out by a
few tiny XLA ops before the launch (`q_block_metadata`): the Triton lowering has no scalar
prefetch, so the kernel reads its block's sequence id, first row, kv_len and page-table row from
global memory and gathers K/V rows by page index (`k_ref.at[rows]` becomes pointer arithmetic).

Per block the kv tiles split in three ranges: a masked head (sliding-window edge), an unmasked
body (every key <= the block's first query position and inside the window, so no mask and no
select), and a masked tail (causal diagonal and kv_len). With `num_kv_splits > 1` (decode, few
sequences, long context: too few programs to fill the SMs) every program covers a slice of the
tiles and writes an unnormalised partial (acc, m, l); one more launch merges the splits
(`combine_splits`; XLA's ops with the tuning's `combine_kernel` off). A decode-shaped step (T <= S)
launches the most splits its bucket can want and each program reads the step's real sequence count
to decide how many of them work (`split_rule`): batch 1 and batch 64 pad to the same shapes but want
16 and 2 splits.

The split rule, block sizes, warps and stages come from a `GpuAttentionTuning` record (tuning.py),
one per device kind; explicit per-call knobs override it.

Why the Triton lowering and not Mosaic GPU (measured on one H200, JAX 0.11.2, bf16, Hq 32 / Hkv 8,
D 128, block_size 16, bench/results/attention.json): the Triton-lowered kernel compiles on JAX
0.10 and 0.11, runs the interpret-mode tests on CPU, and gathers pages of any block size with
plain pointer arithmetic. It reads 2.8-4.2 TB/s of KV in decode (B >= 8, context >= 16k; B >= 128
at 4k), i.e. at the HBM limit, so a Mosaic rewrite would buy nothing there. Prefill reaches 276
TFLOP/s at 8k and 333 at 32k tokens, 50% / 56% of cuDNN flash attention (552 / 591) and 7x the
jnp reference (38). The engine closes that gap for prefill chunks by running them through cuDNN
(split_prefill.py: 84% / 93% of cuDNN's dense attention at 8k / 32k on an H100); a Mosaic GPU kernel
(TMA page copies + wgmma + warp specialisation) would close it inside this op and is not implemented.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention.common import (
    q_block_metadata,
    validate_inputs,
    zero_padding_rows,
)
from pallas_kernels.ragged_paged_attention.tuning import GpuAttentionTuning, gpu_attention_tuning

_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite: an all-masked row must not turn exp2(m_old - m_new) into NaN


def _dot(a, b, b_contract: int):
    """f32-accumulated a @ b (b_contract=0) or a @ b.T (b_contract=1)."""
    return jax.lax.dot_general(a, b, (((1,), (b_contract,)), ((), ())), preferred_element_type=jnp.float32)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def _kernel(
    blk_seq_ref,  # i32[NB] sequence of each query block, -1 = unused block
    blk_q0_ref,  # i32[NB] first query row of each block
    kv_lens_ref,  # i32[S]
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    page_indices_ref,  # i32[S * P] (flattened)
    q_ref,  # [T * Hq, D] (flattened)
    k_ref,  # [num_blocks * block_size * Hkv, D] (flattened)
    v_ref,  # [num_blocks * block_size * Hkv, D]
    *out_refs,  # splits == 1: o [T * Hq, D]; else acc f32[splits * T * Hq, D], m, l f32[splits * T * Hq]
    num_q_heads: int,
    num_kv_heads: int,
    block_size: int,
    pages_per_seq: int,
    block_m: int,
    block_q: int,
    block_k: int,
    num_splits: int,
    dynamic_splits: bool,  # use only split_rule(num_seqs * Hkv) of the num_splits programs
    tuning: GpuAttentionTuning,
    num_rows: int,  # T * Hq
    scale_log2: float,  # sm_scale * log2(e)
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    b = pl.program_id(0)
    h = pl.program_id(1)
    split = pl.program_id(2)
    seq = blk_seq_ref[b]
    g = num_q_heads // num_kv_heads

    @pl.when(seq >= 0)
    def _():
        q0 = blk_q0_ref[b]
        seq_start = cu_q_lens_ref[seq]
        seq_end = cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        q_len = seq_end - seq_start

        m_idx = jnp.arange(block_m, dtype=jnp.int32)
        d_idx = jnp.arange(q_ref.shape[1], dtype=jnp.int32)
        tok = q0 + m_idx // g
        row_valid = (tok < seq_end) & (m_idx < block_q * g)
        q_rows = tok * num_q_heads + h * g + m_idx % g
        q = plgpu.load(q_ref.at[q_rows[:, None], d_idx[None, :]], mask=row_valid[:, None], other=0.0)  # [BM, D]
        q_pos = kv_len - q_len + (tok - seq_start)  # [BM]

        first_pos = kv_len - q_len + (q0 - seq_start)
        last_pos = kv_len - q_len + (jnp.minimum(q0 + block_q, seq_end) - 1 - seq_start)
        hi = jnp.minimum(kv_len, last_pos + 1)
        lo = 0 if sliding_window is None else jnp.maximum(0, first_pos - sliding_window + 1)
        t_lo = lo // block_k
        t_hi = (hi + block_k - 1) // block_k
        if num_splits == 1:
            my_lo, my_hi = t_lo, t_hi
        else:
            used = num_splits
            if dynamic_splits:  # programs past `used` get an empty range and write a neutral partial
                used = jnp.minimum(split_rule(num_seqs_ref[0] * num_kv_heads, tuning), num_splits)
                if tuning.min_tiles_per_split > 1:
                    used = jnp.maximum(1, jnp.minimum(used, (t_hi - t_lo) // tuning.min_tiles_per_split))
            per = (t_hi - t_lo + used - 1) // used
            my_lo = jnp.minimum(t_lo + split * per, t_hi)
            my_hi = jnp.minimum(my_lo + per, t_hi)
        # Tiles in [full_lo, full_hi) need no mask: all keys <= first_pos (< kv_len) and in window.
        full_hi = (first_pos + 1) // block_k
        full_lo = 0 if sliding_window is None else (last_pos - sliding_window + 1 + block_k - 1) // block_k
        a = jnp.clip(full_lo, my_lo, my_hi)
        c = jnp.clip(full_hi, a, my_hi)

        k_off = jnp.arange(block_k, dtype=jnp.int32)
        page_base = seq * pages_per_seq

        def tile(j, carry, masked):
            acc, m_i, l_i = carry
            kpos = j * block_k + k_off
            slot = jnp.minimum(kpos // block_size, pages_per_seq - 1)
            pages = plgpu.load(page_indices_ref.at[page_base + slot])
            rows = (pages * block_size + kpos % block_size) * num_kv_heads + h
            if masked:
                kmask = kpos < kv_len
                k = plgpu.load(k_ref.at[rows[:, None], d_idx[None, :]], mask=kmask[:, None], other=0.0)
                v = plgpu.load(v_ref.at[rows[:, None], d_idx[None, :]], mask=kmask[:, None], other=0.0)
            else:
                k = plgpu.load(k_ref.at[rows[:, None], d_idx[None, :]])
                v = plgpu.load(v_ref.at[rows[:, None], d_idx[None, :]])
            s = _dot(q, k, 1)  # f32 [BM, BK]
            if soft_cap is None:
                s = s * scale_log2
            else:
                s = (soft_cap * _LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
            if masked:
                valid = (kpos[None, :] < kv_len) & (kpos[None, :] <= q_pos[:, None])
                if sliding_window is not None:
                    valid &= kpos[None, :] > q_pos[:, None] - sliding_window
                s = jnp.where(valid, s, _MASKED)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - m_new[:, None])
            if masked:
                p = jnp.where(valid, p, 0.0)
            l_new = l_i * alpha + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 0)
            return acc, m_new, l_new

        d = q_ref.shape[1]
        carry = (
            jnp.zeros((block_m, d), jnp.float32),
            jnp.full((block_m,), _MASKED, jnp.float32),
            jnp.zeros((block_m,), jnp.float32),
        )
        masked_tile = functools.partial(tile, masked=True)
        carry = jax.lax.fori_loop(my_lo, a, masked_tile, carry)
        carry = jax.lax.fori_loop(a, c, functools.partial(tile, masked=False), carry)
        acc, m_i, l_i = jax.lax.fori_loop(c, my_hi, masked_tile, carry)

        if num_splits == 1:
            (o_ref,) = out_refs
            out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
            plgpu.store(o_ref.at[q_rows[:, None], d_idx[None, :]], out.astype(o_ref.dtype), mask=row_valid[:, None])
        else:
            acc_ref, m_ref, l_ref = out_refs
            prow = split * num_rows + q_rows
            plgpu.store(acc_ref.at[prow[:, None], d_idx[None, :]], acc, mask=row_valid[:, None])
            plgpu.store(m_ref.at[prow], m_i, mask=row_valid)
            plgpu.store(l_ref.at[prow], l_i, mask=row_valid)


def _combine_kernel(
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    acc_ref,  # f32[splits * rows, D] unnormalised partial outputs
    m_ref,  # f32[splits * rows] partial maxima (log2 domain)
    l_ref,  # f32[splits * rows] partial denominators
    o_ref,  # [rows, D] output, q's dtype
    *,
    num_splits: int,
    num_rows: int,  # T * Hq
    num_q_heads: int,
    block_r: int,
    block_d: int,
    split_axis: bool,
):
    """Merge the kv splits' partials of `block_r` rows x `block_d` columns into the normalised output;
    rows of padding tokens (past cu_q_lens[num_seqs]) are written as exact zeros and their partials never
    read. The splits are unrolled: every load is independent of the others, so they are all in flight at
    once (a loop over the splits waits for each). `split_axis`: the splits are instead the first axis of one
    tensor (padded to a power of two), each partial read by one load of every split's tile and reduced over
    that axis."""
    r = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
    cols = pl.program_id(1) * block_d + jnp.arange(block_d, dtype=jnp.int32)
    live = r < cu_q_lens_ref[num_seqs_ref[0]] * num_q_heads
    if split_axis:
        split = jnp.arange(_next_pow2(num_splits), dtype=jnp.int32)
        rows = split[:, None] * num_rows + r[None, :]  # [splits, R]
        ok = (split[:, None] < num_splits) & live[None, :]
        m = plgpu.load(m_ref.at[rows], mask=ok, other=_MASKED)
        w = jnp.exp2(m - jnp.max(m, axis=0)[None, :])  # (padding splits: their l and acc load as 0)
        den = jnp.sum(w * plgpu.load(l_ref.at[rows], mask=ok, other=0.0), axis=0)
        part = plgpu.load(acc_ref.at[rows[:, :, None], cols[None, None, :]], mask=ok[:, :, None], other=0.0)
        acc = jnp.sum(w[:, :, None] * part, axis=0)
    else:
        ms = [plgpu.load(m_ref.at[s * num_rows + r], mask=live, other=_MASKED) for s in range(num_splits)]
        m_max = functools.reduce(jnp.maximum, ms)
        acc = jnp.zeros((block_r, block_d), jnp.float32)
        den = jnp.zeros((block_r,), jnp.float32)
        for s in range(num_splits):
            rows = s * num_rows + r
            w = jnp.exp2(ms[s] - m_max)
            den += w * plgpu.load(l_ref.at[rows], mask=live, other=0.0)
            acc += w[:, None] * plgpu.load(acc_ref.at[rows[:, None], cols[None, :]], mask=live[:, None], other=0.0)
    out = jnp.where(live[:, None], acc / jnp.where(den == 0.0, 1.0, den)[:, None], 0.0)
    plgpu.store(o_ref.at[r[:, None], cols[None, :]], out.astype(o_ref.dtype), mask=(r < num_rows)[:, None])


def split_axis_merge(num_splits: int, tuning: GpuAttentionTuning) -> bool:
    """True if the merge of `num_splits` splits reads them as the first axis of one tensor (at the tuning's
    `combine_axis_min_splits` or more; 0: never) instead of unrolled."""
    return 0 < tuning.combine_axis_min_splits <= num_splits


def combine_tiling(num_tokens: int, num_splits: int, tuning: GpuAttentionTuning) -> tuple[int, int, int]:
    """(rows, columns, warps) of a merge program over a step of `num_tokens` tokens (its bucket) and
    `num_splits` splits: the tuning's small tiling where both are within its `combine_small_max_*` bounds, else
    its default one. Where the merge takes the splits as a tensor axis (`split_axis_merge`), whatever the
    bounds: the default rows and warps and the most columns (a power of two) whose tiles of every split hold at
    most `combine_axis_elems` elements, but at least 16 (past the bound, at many splits). The caller clips the
    columns to the head dim."""
    if split_axis_merge(num_splits, tuning):  # (every split's tile in one tensor of at most combine_axis_elems)
        cols = max(16, _prev_pow2(tuning.combine_axis_elems // (_next_pow2(num_splits) * tuning.combine_block_rows)))
        return tuning.combine_block_rows, cols, tuning.combine_num_warps
    if num_tokens <= tuning.combine_small_max_tokens and num_splits <= tuning.combine_small_max_splits:
        return tuning.combine_small_block_rows, tuning.combine_small_block_cols, tuning.combine_small_num_warps
    return tuning.combine_block_rows, tuning.combine_block_cols, tuning.combine_num_warps


def combine_splits(acc, m_part, l_part, cu_q_lens, num_seqs, *, num_splits: int, num_q_heads: int, dtype,
                   tuning: GpuAttentionTuning, interpret: bool = False):
    """The output [rows, D] in `dtype` from `num_splits` kv splits' partials (acc f32[splits * rows, D],
    m and l f32[splits * rows]; rows = T * Hq), padding rows zero, in one launch of programs of
    `combine_tiling`'s rows x columns (XLA's combine is a chain of reductions, a launch each)."""
    num_rows = m_part.shape[0] // num_splits
    d = acc.shape[1]
    block_r, block_d, warps = combine_tiling(num_rows // num_q_heads, num_splits, tuning)
    block_d = min(block_d, d)
    axis = split_axis_merge(num_splits, tuning)
    kernel = functools.partial(_combine_kernel, num_splits=num_splits, num_rows=num_rows, num_q_heads=num_q_heads,
                               block_r=block_r, block_d=block_d, split_axis=axis)  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(-(-num_rows // block_r), d // block_d),
        out_shape=jax.ShapeDtypeStruct((num_rows, d), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="ragged_paged_attention_combine",
    )(cu_q_lens, jnp.asarray(num_seqs, jnp.int32).reshape(1), acc, m_part, l_part)


def _rope_row(ref, t, offset, width: int, head_dim: int, pos, inv_freq_ref, limit: int | None = None):
    """Columns [offset, offset + width) of row t of `ref` (`offset` a multiple of `head_dim`; columns from
    `limit` on masked off), heads of `head_dim` rotated (RoPE, rotate-half) to position `pos`, in float32; and
    the columns (from 0) and the mask of the real ones (the row is padded to a power of two)."""
    half = head_dim // 2
    cols = jnp.arange(_next_pow2(width), dtype=jnp.int32)
    mask = cols < width
    if limit is not None:
        mask = mask & (offset + cols < limit)
    j = cols % head_dim  # column within the head
    partner = cols - j + (j + half) % head_dim  # rotate-half: the other half's column
    x = plgpu.load(ref.at[t, offset + cols], mask=mask, other=0.0).astype(jnp.float32)
    x_partner = plgpu.load(ref.at[t, offset + partner], mask=mask, other=0.0).astype(jnp.float32)
    inv_freq = plgpu.load(inv_freq_ref.at[j % half], mask=mask, other=0.0)
    ang = pos.astype(jnp.float32) * inv_freq
    rot = jnp.where(j < half, -x_partner, x_partner)
    return x * jnp.cos(ang) + rot * jnp.sin(ang), cols, mask


def _write_kv_kernel(slot_ref, pos_ref, inv_freq_ref, qkv_ref, k_pages_in, v_pages_in, k_pages_ref, v_pages_ref,
                     *q_ref, k_offset: int, v_offset: int, num_kv_heads: int, head_dim: int):  # fmt: skip
    """Token t's keys (rotated: RoPE in the rotate-half layout) and values, read from its fused q/k/v row,
    into cache row slot_mapping[t] ([Hkv * D], flattened); slot -1 writes nothing. With `q_ref` (one output
    more) the grid has a second axis: its program 0 writes K and V, program j > 0 rotates the j-th block of
    Hkv * D columns of the token's queries into row t of `q_ref`, whatever its slot (padding rows have
    positions). (One program rotating all of a row's queries, 4096 columns at Granite-8B's shapes, took 29 us
    a launch on an H100 against 3 for the K/V write: bench/results/profile_step_b1_h100_7912fae_ropeq.json.)"""
    del k_pages_in, v_pages_in  # aliased to the outputs: the rows not written keep their contents
    t = pl.program_id(0)
    slot = slot_ref[t]
    width = num_kv_heads * head_dim
    write = slot >= 0
    if q_ref:
        (q_ref,) = q_ref
        part = pl.program_id(1)
        write = write & (part == 0)

        @pl.when(part > 0)
        def _():
            start = (part - 1) * width
            q, cols, mask = _rope_row(qkv_ref, t, start, width, head_dim, pos_ref[t], inv_freq_ref, limit=k_offset)
            plgpu.store(q_ref.at[t, start + cols], q.astype(q_ref.dtype), mask=mask)

    @pl.when(write)
    def _():
        k, cols, mask = _rope_row(qkv_ref, t, k_offset, width, head_dim, pos_ref[t], inv_freq_ref)
        v = plgpu.load(qkv_ref.at[t, v_offset + cols], mask=mask, other=0.0)
        plgpu.store(k_pages_ref.at[slot, cols], k.astype(qkv_ref.dtype).astype(k_pages_ref.dtype), mask=mask)
        plgpu.store(v_pages_ref.at[slot, cols], v.astype(v_pages_ref.dtype), mask=mask)


def write_kv_rope_gpu(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    qkv,  # [T, q_size + 2 * Hkv * D] the step's fused projection: q, then k, then v
    positions,  # i32[T]
    inv_freq,  # f32[D / 2] RoPE frequencies
    slot_mapping,  # i32[T] flat slot; -1 = padding, not written
    *,
    q_size: int,
    rotate_q: bool = False,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Rotate this step's keys (RoPE, rotate-half) and write them and the values into the paged caches in
    one launch, reading both from the fused q/k/v projection, where XLA runs two scatters (the key RoPE
    fused into one of them). A program per token row; the caches are
    aliased to the outputs (in place when donated). Same result as `write_kv_rope_reference` up to the
    device's cos/sin (a rotated key may differ by one ulp of its dtype). `rotate_q`: the queries rotated in
    the same launch, a third output [T, q_size] (instead of XLA's fusion of `apply_rope`). Called through
    `write_kv_rope`, which has checked the arguments (`validate_write_rope_inputs`)."""
    nb, bs, hkv, d = k_pages.shape
    t = qkv.shape[0]
    width = hkv * d
    flat = jax.ShapeDtypeStruct((nb * bs, width), k_pages.dtype)
    kernel = functools.partial(_write_kv_kernel, k_offset=q_size, v_offset=q_size + width, num_kv_heads=hkv,
                               head_dim=d)  # fmt: skip
    outs = pl.pallas_call(
        kernel,
        grid=(t, 1 + -(-q_size // width)) if rotate_q else (t,),  # (rotate_q: K/V, then q's blocks of `width`)
        out_shape=[flat, flat] + ([jax.ShapeDtypeStruct((t, q_size), qkv.dtype)] if rotate_q else []),
        input_output_aliases={4: 0, 5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(slot_mapping, positions, inv_freq, qkv, k_pages.reshape(nb * bs, width), v_pages.reshape(nb * bs, width))
    kv = (outs[0].reshape(nb, bs, hkv, d), outs[1].reshape(nb, bs, hkv, d))
    return (*kv, outs[2]) if rotate_q else kv


def split_rule(programs, tuning: GpuAttentionTuning):
    """kv splits per query block for `programs` (real query blocks x kv heads) at decode shapes,
    by `tuning.split_rule` (the measurements behind the default are in tuning.py). Works on Python
    ints and on traced int32 scalars (the kernel applies it to the step's real num_seqs).
    """
    # The most splits, minus `fewer` past each bound: comparisons cast to int and summed, because the Triton
    # lowering mis-types a select of scalar constants; Python ints (the grid size) stay Python ints.
    splits, bounds = tuning.split_rule
    for bound, fewer in bounds:
        over = programs > bound
        splits = splits - fewer * (over if isinstance(programs, int) else over.astype(jnp.int32))
    return splits


def wants_long_grid(tuning: GpuAttentionTuning, num_seqs: int, num_kv_heads: int, max_kv_len: int) -> bool:
    """True if a decode step of `num_seqs` sequences, the longest reading `max_kv_len` keys, should pass
    `long_context=True`: the tuning splits dynamically and has a long-context rule, the context reaches its
    threshold, and the rule gives these sequences more kv splits than the default one."""
    if not tuning.dynamic_splits or tuning.long_split_rule is None or max_kv_len < tuning.long_context_keys:
        return False  # (the static split heuristic reads no rule)
    programs = max(1, num_seqs) * num_kv_heads
    long = dataclasses.replace(tuning, split_rule=tuning.long_split_rule)
    return split_rule(programs, long) > split_rule(programs, tuning)


def wants_long_chunk(
    tuning: GpuAttentionTuning, rows: int, max_kv_len: int, longest_chunk: int, group: int
) -> bool:
    """True if a decode-shaped step of `rows` token rows (its bucket), whose longest sequence brings
    `longest_chunk` rows and whose longest context holds `max_kv_len` keys, should pass `long_chunk=True`: the
    tuning splits dynamically and has a long-context rule, the bucket is at most `long_chunk_max_rows` (0:
    never), the context reaches `long_context_keys`, and the chunk is longer than a decode query block holds
    (`decode_block_m // group` tokens, `group` the query heads per kv head: a shorter one reads its context
    once already)."""
    return (tuning.dynamic_splits and tuning.long_split_rule is not None and rows <= tuning.long_chunk_max_rows
            and max_kv_len >= tuning.long_context_keys and longest_chunk * group > tuning.decode_block_m)  # fmt: skip


def decode_grid_splits(
    num_tokens: int, num_kv_heads: int, max_kv: int, block_k: int, tuning: GpuAttentionTuning
) -> int:
    """Static kv-split grid size of a decode-shaped step: what `split_rule` asks for at the fewest
    sequences such a step can hold (a bucket of T > 16 rows holds more than T/2 decode rows)."""
    fewest = 1 if num_tokens <= 16 else num_tokens // 2 + 1
    tiles = max(1, -(-max_kv // block_k))
    return max(1, min(split_rule(fewest * num_kv_heads, tuning), tiles))


def default_num_kv_splits(
    num_tokens: int, num_seqs: int, num_kv_heads: int, block_q: int, max_kv: int, tuning: GpuAttentionTuning
) -> int:
    """Static split count: enough programs for `tuning.static_waves` per SM when the batch is
    decode-shaped and long, a power of two, capped by `static_max_splits` and the context length."""
    # Every non-empty sequence owns at least one query block.
    programs = max(-(-num_tokens // block_q), min(num_seqs, num_tokens)) * num_kv_heads
    target = tuning.static_waves * tuning.num_sms
    if programs >= target:
        return 1
    want = _next_pow2(-(-target // max(programs, 1)))
    return int(max(1, min(want, tuning.static_max_splits, max_kv // tuning.static_min_keys_per_split)))


def ragged_paged_attention_gpu(
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
    block_m: int | None = None,
    block_k: int | None = None,
    num_kv_splits: int | None = None,
    max_kv_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    long_context: bool = False,
    long_chunk: bool = False,
    tuning: GpuAttentionTuning | None = None,
    interpret: bool = False,
):
    """Attention output [T, Hq, D] in q's dtype; same semantics as the reference.

    tuning: the device's record (static; None = `gpu_attention_tuning()` of the current device).
    Per-call knobs override it (all static, None = from `tuning`): block_m query rows per program
    (block_q tokens x the GQA group), block_k keys per tile, num_kv_splits (flash-decoding style
    split of the context; given, the split count is static), max_kv_splits (decode-shaped steps
    with the dynamic rule: the grid's split count, of which `split_rule` picks how many work),
    num_warps, num_stages. long_context: a decode-shaped step takes `tuning.long_split_rule` (and its
    grid) instead of `split_rule` (`wants_long_grid` says when it pays); the result is the same.
    long_chunk: a decode-shaped step whose sequences may bring several rows each after a long context
    (`wants_long_chunk`): query blocks of up to T tokens (`prefill_block_m` rows at most) and the long rule
    with its whole grid; the result is the same.
    """
    if tuning is None:
        tuning = gpu_attention_tuning()
    elif not isinstance(tuning, GpuAttentionTuning):
        raise ValueError(f"tuning must be a GpuAttentionTuning or None, got {type(tuning).__name__}")
    validate_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    t, hq, d = q.shape
    nb_cache, bs, hkv, _ = k_pages.shape
    s, p = page_indices.shape
    g = hq // hkv
    if d & (d - 1) or d < 16:
        raise ValueError(f"q head_dim must be a power of two >= 16 for the GPU kernel, got {d}")
    decode_like = t <= s
    long_chunk = long_chunk and decode_like and tuning.long_split_rule is not None
    if (long_context or long_chunk) and decode_like and tuning.long_split_rule is not None:
        tuning = dataclasses.replace(tuning, split_rule=tuning.long_split_rule)
    if block_m is None and long_chunk:  # (a chunk of up to t rows in one block, within prefill's block)
        block_m = min(max(tuning.decode_block_m, _next_pow2(t) * g), max(tuning.prefill_block_m, tuning.decode_block_m))
    if block_m is None:
        block_m = tuning.decode_block_m if decode_like else tuning.prefill_block_m
    block_m = max(_next_pow2(block_m), _next_pow2(g), 16)
    block_q = block_m // g
    if block_k is None:
        block_k = tuning.decode_block_k if decode_like else tuning.prefill_block_k
    block_k = max(_next_pow2(block_k), 16)
    num_q_blocks = -(-t // block_q) + min(s, t)
    dynamic_splits = num_kv_splits is None and decode_like and tuning.dynamic_splits
    if dynamic_splits:  # (a chunk step's grid as for one sequence: it may hold no other)
        num_kv_splits = max_kv_splits or decode_grid_splits(1 if long_chunk else t, hkv, p * bs, block_k, tuning)
        dynamic_splits = num_kv_splits > 1
    elif num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(t, s, hkv, block_q, p * bs, tuning)
    if num_warps is None:
        num_warps = tuning.num_warps
    if num_stages is None:
        if d > 128:
            num_stages = tuning.wide_head_num_stages
        else:
            num_stages = tuning.decode_num_stages if decode_like else tuning.prefill_num_stages

    blk_seq, blk_q0 = q_block_metadata(kv_lens, cu_q_lens, num_seqs, block_q=block_q,
                                       num_blocks=num_q_blocks)
    rows = t * hq
    kernel = functools.partial(
        _kernel,
        num_q_heads=hq,
        num_kv_heads=hkv,
        block_size=bs,
        pages_per_seq=p,
        block_m=block_m,
        block_q=block_q,
        block_k=block_k,
        num_splits=num_kv_splits,
        dynamic_splits=dynamic_splits,
        tuning=tuning,
        num_rows=rows,
        scale_log2=float(sm_scale) * _LOG2E,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
    )
    if num_kv_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows, d), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_kv_splits * rows, d), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits * rows,), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits * rows,), jnp.float32),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, hkv, num_kv_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(
        blk_seq,
        blk_q0,
        kv_lens,
        cu_q_lens,
        jnp.asarray(num_seqs, jnp.int32).reshape(1),
        page_indices.reshape(s * p),
        q.reshape(rows, d),
        k_pages.reshape(nb_cache * bs * hkv, d),
        v_pages.reshape(nb_cache * bs * hkv, d),
    )
    if num_kv_splits == 1:
        out = outs[0].reshape(t, hq, d)
    elif tuning.combine_kernel:
        return combine_splits(*outs, cu_q_lens, num_seqs, num_splits=num_kv_splits, num_q_heads=hq, dtype=q.dtype,
                              tuning=tuning, interpret=interpret).reshape(t, hq, d)
    else:
        acc, m_part, l_part = outs
        acc = acc.reshape(num_kv_splits, rows, d)
        m_part = m_part.reshape(num_kv_splits, rows)
        l_part = l_part.reshape(num_kv_splits, rows)
        w = jnp.exp2(m_part - jnp.max(m_part, axis=0)[None])
        denom = jnp.sum(w * l_part, axis=0)
        out = jnp.sum(w[..., None] * acc, axis=0) / jnp.where(denom == 0.0, 1.0, denom)[:, None]
        out = out.astype(q.dtype).reshape(t, hq, d)
    return zero_padding_rows(out, cu_q_lens, num_seqs)
