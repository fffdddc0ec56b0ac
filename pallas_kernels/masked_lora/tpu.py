"""Masked multi-LoRA on TPU: Pallas/Mosaic, shrink and expand fused in one pipelined call.

Grid (n_blocks, max_work), work items innermost, with the work list scalar-prefetched into SMEM
(the megablox gmm pattern). Each step's BlockSpecs fetch the item's token tile of x, its adapter's
whole A[slot] and the B[slot] column block; it computes `(x_tile @ A) @ B_block` in f32 and merges
the item's rows into the output tile. Items on one tile are consecutive, so the output block stays
resident in VMEM across them and is written back once. Padding items repeat the last tile and slot:
the pipeline skips the copy of an unchanged block index, so they cost neither DMA nor MXU work.
Tiles with no segment are never visited; the output aliases y, so those rows keep y's values.

The shrink is recomputed per column block; block_n is large (up to 2048 columns) to keep that, and
the re-read of A, small next to B.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masked_lora.segments import LoraSegments


def _kernel(
    work_tile_ref,  # i32[max_work] SMEM
    work_slot_ref,  # i32[max_work] SMEM
    work_start_ref,  # i32[max_work] SMEM
    work_end_ref,  # i32[max_work] SMEM
    num_work_ref,  # i32[1] SMEM
    x_ref,  # [bt, Din] token tile
    a_ref,  # [Din, R] A[slot]
    b_ref,  # [R, bn] B[slot] column block
    y_ref,  # [bt, bn] base tile (aliased with o_ref's buffer)
    o_ref,  # [bt, bn]
    *,
    bt: int,
):
    del work_slot_ref  # used by the index maps only
    w = pl.program_id(1)
    tile = work_tile_ref[w]
    first_visit = (w == 0) | (tile != work_tile_ref[jnp.maximum(w - 1, 0)])

    @pl.when(first_visit)
    def _():
        o_ref[...] = y_ref[...]

    @pl.when(w < num_work_ref[0])
    def _():
        x = x_ref[...].astype(a_ref.dtype)
        h = jnp.dot(x, a_ref[...], preferred_element_type=jnp.float32)
        delta = jnp.dot(h.astype(b_ref.dtype), b_ref[...], preferred_element_type=jnp.float32)
        rows = tile * bt + jax.lax.broadcasted_iota(jnp.int32, delta.shape, 0)
        inside = (rows >= work_start_ref[w]) & (rows < work_end_ref[w])
        cur = o_ref[...]
        o_ref[...] = jnp.where(inside, (cur.astype(jnp.float32) + delta).astype(o_ref.dtype), cur)


def _column_block(dout: int, block_n: int) -> int:
    """Widest multiple of 128 <= block_n dividing Dout (no edge block), else the full Dout."""
    if dout <= block_n:
        return dout
    for bn in range(block_n, 127, -128):
        if dout % bn == 0:
            return bn
    return dout  # an odd width wider than block_n: one block of full width (VMEM permitting)


@functools.partial(jax.jit, static_argnames=("interpret", "block_n"))
def masked_lora_tpu(
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R]
    lora_b,  # [num_slots, R, Dout]
    segments: LoraSegments,  # jnp arrays; block_tokens a multiple of 8 (16 for bf16 x)
    y,  # [T, Dout] base output or zeros (the delta); aliased to the result
    *,
    interpret=False,
    block_n: int = 2048,
):
    """y + masked LoRA delta on the work list's rows ([T, Dout], y.dtype); other rows keep y."""
    t, din = x.shape
    r, dout = lora_b.shape[1], lora_b.shape[2]
    bt = segments.block_tokens
    if bt % 8:
        raise ValueError(f"segments.block_tokens must be a multiple of 8 on TPU, got {bt}")
    if block_n % 128:
        raise ValueError(f"block_n must be a multiple of 128, got {block_n}")
    bn = _column_block(dout, block_n)
    pad_rows = -t % bt  # edge row blocks of an aliased output trip TPU interpret mode: pad instead
    if pad_rows:
        x = jnp.pad(x, ((0, pad_rows), (0, 0)))
        y = jnp.pad(y, ((0, pad_rows), (0, 0)))
    max_work = segments.work_tile.shape[0]
    meta = (segments.work_tile, segments.work_slot, segments.work_start, segments.work_end, segments.num_work)
    meta = tuple(m.astype(jnp.int32) for m in meta)

    def tile_map(n, w, wt, ws, *_):
        return wt[w], n

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(meta),
        grid=(pl.cdiv(dout, bn), max_work),
        in_specs=[
            pl.BlockSpec((bt, din), lambda n, w, wt, ws, *_: (wt[w], 0)),
            pl.BlockSpec((None, din, r), lambda n, w, wt, ws, *_: (ws[w], 0, 0)),
            pl.BlockSpec((None, r, bn), lambda n, w, wt, ws, *_: (ws[w], 0, n)),
            pl.BlockSpec((bt, bn), tile_map),
        ],
        out_specs=pl.BlockSpec((bt, bn), tile_map),
    )
    out = pl.pallas_call(
        functools.partial(_kernel, bt=bt),
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid_spec=grid_spec,
        input_output_aliases={len(meta) + 3: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="masked_lora_tpu",
    )(*meta, x, lora_a, lora_b, y)
    return out[:t] if pad_rows else out
