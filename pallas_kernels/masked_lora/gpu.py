"""Masked multi-LoRA on GPU: Pallas with the Triton lowering (SGMV-style shrink, then expand).

Two launches over the work list of `LoraSegments` (one item per (token tile, segment) pair):

- shrink, grid (max_work, k_splits): item w, split k computes the f32 partial
  `x[tile rows, k-range] @ A[slot][k-range, :]` into `h_part[k, rows, :]`. Splitting Din keeps
  enough programs in flight when only a few items exist (decode), without atomics or a zeroed buffer.
- expand, grid (max_work, cdiv(Dout, block_n)): sums the partials, casts to the weights' dtype and
  computes `h @ B[slot][:, n-block]`, then read-modify-writes the item's rows of `y` (aliased).

Rows of one tile that belong to different segments are disjoint, so no two programs write the same
element. Items past `num_work` and tiles with no segment do nothing, so base rows cost no matmul.
The Triton lowering cannot prefetch scalars, so each program reads its item from the metadata arrays
and gathers its adapter by pointer arithmetic; R and Dout need not be powers of two (masked loads).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.masked_lora.segments import LoraSegments


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _item(w, work_tile_ref, work_slot_ref, work_start_ref, work_end_ref, bt):
    """(first row of the tile, slot, row mask [bt]) of work item w."""
    row0 = work_tile_ref[w] * bt
    rows = row0 + jnp.arange(bt, dtype=jnp.int32)
    mask = (rows >= work_start_ref[w]) & (rows < work_end_ref[w])
    return row0, work_slot_ref[w], mask


def _shrink_kernel(
    work_tile_ref,  # i32[max_work]
    work_slot_ref,  # i32[max_work]
    work_start_ref,  # i32[max_work]
    work_end_ref,  # i32[max_work]
    num_work_ref,  # i32[1]
    x_ref,  # [T, Din]
    a_ref,  # [num_slots, Din, R]
    h_ref,  # f32[k_splits, T, rp] out: partial x @ A per Din split
    *,
    bt: int,
    bk: int,
    k_chunk: int,
    rp: int,
):
    w, ks = pl.program_id(0), pl.program_id(1)
    din, r = a_ref.shape[1], a_ref.shape[2]

    @pl.when(w < num_work_ref[0])
    def _():
        row0, slot, row_mask = _item(w, work_tile_ref, work_slot_ref, work_start_ref, work_end_ref, bt)
        r_mask = jnp.arange(rp) < r
        zero = ks * 0  # a traced 0: a static start would be bounds-checked against R < rp

        def body(i, acc):
            k0 = ks * k_chunk + i * bk
            k_mask = (k0 + jnp.arange(bk)) < din
            xb = plgpu.load(
                x_ref.at[pl.ds(row0, bt), pl.ds(k0, bk)], mask=row_mask[:, None] & k_mask[None, :], other=0.0
            )
            ab = plgpu.load(
                a_ref.at[slot, pl.ds(k0, bk), pl.ds(zero, rp)], mask=k_mask[:, None] & r_mask[None, :], other=0.0
            )
            return acc + plgpu.dot(xb.astype(ab.dtype), ab)

        acc = jax.lax.fori_loop(0, k_chunk // bk, body, jnp.zeros((bt, rp), jnp.float32))
        plgpu.store(h_ref.at[ks, pl.ds(row0, bt), :], acc, mask=row_mask[:, None])


def _expand_kernel(
    work_tile_ref,  # i32[max_work]
    work_slot_ref,  # i32[max_work]
    work_start_ref,  # i32[max_work]
    work_end_ref,  # i32[max_work]
    num_work_ref,  # i32[1]
    col_table_ref,  # i32[n_blocks, 3] per column block: first column, end column, first rank of h
    h_ref,  # f32[k_splits, T, rp]
    b_ref,  # [num_slots, R_b, Dout] (R_b = R, or R / len(out_widths) when packed)
    y_in_ref,  # [T, Dout] aliased with y_ref
    y_ref,  # [T, Dout] out
    *,
    bt: int,
    bn: int,
    rpb: int,
    accumulate: bool,
):
    del y_in_ref  # same buffer as y_ref
    w, nb = pl.program_id(0), pl.program_id(1)
    r_b = b_ref.shape[1]
    k_splits = h_ref.shape[0]

    @pl.when(w < num_work_ref[0])
    def _():
        row0, slot, row_mask = _item(w, work_tile_ref, work_slot_ref, work_start_ref, work_end_ref, bt)
        n0, n_end, r0 = col_table_ref[nb, 0], col_table_ref[nb, 1], col_table_ref[nb, 2]
        n_mask = (n0 + jnp.arange(bn)) < n_end
        r_mask = jnp.arange(rpb) < r_b
        zero = nb * 0

        def add_split(k, acc):
            part = h_ref.at[k, pl.ds(row0, bt), pl.ds(r0, rpb)]
            return acc + plgpu.load(part, mask=row_mask[:, None] & r_mask[None, :], other=0.0)

        h = jax.lax.fori_loop(0, k_splits, add_split, jnp.zeros((bt, rpb), jnp.float32))
        bb = plgpu.load(
            b_ref.at[slot, pl.ds(zero, rpb), pl.ds(n0, bn)], mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        delta = plgpu.dot(h.astype(bb.dtype), bb)  # f32 [bt, bn]
        out_mask = row_mask[:, None] & n_mask[None, :]
        y_tile = y_ref.at[pl.ds(row0, bt), pl.ds(n0, bn)]
        if accumulate:
            delta = delta + plgpu.load(y_tile, mask=out_mask, other=0.0).astype(jnp.float32)
        plgpu.store(y_tile, delta.astype(y_ref.dtype), mask=out_mask)


def column_table(out_widths: tuple[int, ...], rank_per_width: int, bn: int) -> np.ndarray:
    """i32[n_blocks, 3]: column blocks of width <= bn that never straddle two projections."""
    rows, col = [], 0
    for i, width in enumerate(out_widths):
        for c in range(0, width, bn):
            rows.append((col + c, col + min(c + bn, width), i * rank_per_width))
        col += width
    return np.asarray(rows, np.int32)


def _compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(
    jax.jit,
    static_argnames=(
        "out_widths",
        "accumulate",
        "interpret",
        "block_n",
        "block_k",
        "k_chunk",
        "num_warps",
        "num_stages",
    ),
)
def masked_lora_gpu(
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R]
    lora_b,  # [num_slots, R, Dout]
    segments: LoraSegments,  # jnp arrays, block_tokens >= 16 and a power of two
    y,  # [T, Dout] base output (accumulate=True) or zeros (the delta); aliased to the result
    *,
    out_widths: tuple[int, ...] | None = None,
    accumulate: bool = True,
    interpret: bool = False,
    block_n: int = 128,
    block_k: int = 128,
    k_chunk: int = 512,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """y + masked LoRA delta on the work list's rows ([T, Dout], y.dtype); other rows keep y.

    out_widths: packed layout of a fused projection: output columns split in len(out_widths) blocks,
    block i uses ranks [i*R_b, (i+1)*R_b) of A and lora_b is [num_slots, R_b, Dout] (no zero blocks).
    """
    t, din = x.shape
    r, dout = lora_a.shape[2], lora_b.shape[2]
    out_widths = out_widths or (dout,)
    r_b = lora_b.shape[1]
    bt = segments.block_tokens
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"segments.block_tokens must be a power of two >= 16 on GPU, got {bt}")
    rp = max(16, _next_pow2(r))
    bk = min(block_k, max(16, _next_pow2(din)))
    k_chunk = max(bk, min(k_chunk, -(-din // bk) * bk))
    k_chunk -= k_chunk % bk
    k_splits = -(-din // k_chunk)
    rpb = max(16, _next_pow2(r_b))
    bn = min(block_n, max(16, _next_pow2(max(out_widths))))
    col_table = jnp.asarray(column_table(tuple(out_widths), r_b if len(out_widths) > 1 else 0, bn))
    max_work = segments.work_tile.shape[0]
    meta = (segments.work_tile, segments.work_slot, segments.work_start, segments.work_end, segments.num_work)
    meta = tuple(m.astype(jnp.int32) for m in meta)

    h_part = pl.pallas_call(
        functools.partial(_shrink_kernel, bt=bt, bk=bk, k_chunk=k_chunk, rp=rp),
        out_shape=jax.ShapeDtypeStruct((k_splits, t, rp), jnp.float32),
        grid=(max_work, k_splits),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="masked_lora_shrink",
    )(*meta, x, lora_a)
    return pl.pallas_call(
        functools.partial(_expand_kernel, bt=bt, bn=bn, rpb=rpb, accumulate=accumulate),
        out_shape=jax.ShapeDtypeStruct((t, dout), y.dtype),
        grid=(max_work, col_table.shape[0]),
        input_output_aliases={len(meta) + 3: 0},
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="masked_lora_expand",
    )(*meta, col_table, h_part, lora_b, y)
