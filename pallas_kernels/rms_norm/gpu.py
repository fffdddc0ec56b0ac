"""Residual add + RMSNorm on GPU: one Pallas kernel through the Triton lowering.

`x_new = x + y * m` and `h = rms_norm(x_new, w, eps)` in one pass: each program reads `block_rows`
rows of x and y once and writes both outputs, where the jnp form reads x_new back for the norm. The
rows are whole: a tile is [block_rows, next_pow2(D)] with the columns past D masked (D need not be a
power of two), so the mean of squares is one in-register reduction.

Rounding follows the jnp code exactly: the multiplier is taken in x's dtype (a weak-typed Python
float), `y * m` is rounded to x's dtype, then the add is rounded to x's dtype; the norm reads that
rounded x_new. Each op is done in float32 and rounded once, which gives the dtype's own correctly
rounded result for bf16/f16 inputs (the product of two such values is exact in f32, and a sum
rounded to f32 then to bf16/f16 is the correctly rounded sum: an add needs 2p + 1 bits, f32 has 24), so
x_new matches jnp bit for bit. h differs from the reference by the order of the f32 reduction only.
(XLA itself may not: under jit on CPU, JAX 0.10.2, `xla_allow_excess_precision` drops the bf16
round trip of the sum, so the jitted jnp code normalises the unrounded sum, one bf16 ulp off in about
a fifth of h. On an H100 with JAX 0.11.2 the jitted jnp code, the eager one and this kernel agreed.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Rows per program: enough for a tile of about this many elements (1 row at D >= 4096).
_TILE_ELEMENTS = 4096


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_block_rows(num_rows: int, d: int) -> int:
    """Rows per program: a tile of about `_TILE_ELEMENTS` (one row from D = 4096 up, where a row is
    a full-width load per thread already and more rows would only cut the number of programs), never
    more rows than the input has (rounded to a power of two, as Triton's block shapes must be)."""
    return max(1, min(_TILE_ELEMENTS // _next_pow2(d), _next_pow2(max(num_rows, 1))))


def default_num_warps(block_rows: int, d: int) -> int:
    """About 512 elements a warp (16 a thread, two 16-byte loads of bf16), 4 to 16 warps."""
    return int(min(16, max(4, block_rows * _next_pow2(d) // 512)))


def _add_rms_norm_kernel(
    x_ref,  # [T, D]
    y_ref,  # [T, D]
    w_ref,  # [D]
    x_new_ref,  # [T, D] out: x + y * m in x's dtype
    h_ref,  # [T, D] out: rms_norm(x_new) in x's dtype
    *,
    block_rows: int,
    block_d: int,
    eps: float,
    multiplier: float | None,
):
    t, d = x_ref.shape
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    cols = jnp.arange(block_d, dtype=jnp.int32)
    col_mask = cols < d
    mask = (rows < t)[:, None] & col_mask[None, :]
    idx = (rows[:, None], cols[None, :])
    dtype = x_ref.dtype

    x = plgpu.load(x_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    y = plgpu.load(y_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
    if multiplier is not None:  # jnp: y * m in x's dtype (m already rounded to it), then the add
        y = (y * jnp.float32(multiplier)).astype(dtype).astype(jnp.float32)
    x_new = (x + y).astype(dtype)
    plgpu.store(x_new_ref.at[idx], x_new, mask=mask)

    xf = x_new.astype(jnp.float32)  # the rounded sum, as the jnp code normalises it
    mean_sq = jnp.sum(xf * xf, axis=1, keepdims=True) / jnp.float32(d)  # masked columns are 0
    xf = xf * jax.lax.rsqrt(mean_sq + jnp.float32(eps))
    w = plgpu.load(w_ref.at[cols], mask=col_mask, other=0.0).astype(jnp.float32)
    plgpu.store(h_ref.at[idx], (xf * w[None, :]).astype(h_ref.dtype), mask=mask)


@functools.partial(
    jax.jit, static_argnames=("eps", "residual_multiplier", "interpret", "block_rows", "num_warps")
)
def add_rms_norm_gpu(
    x,  # [T, D]
    y,  # [T, D], x's dtype
    w,  # [D]
    *,
    eps: float,
    residual_multiplier: float = 1.0,
    interpret: bool = False,
    block_rows: int | None = None,
    num_warps: int | None = None,
):
    """(x_new, h), both [T, D] in x's dtype. block_rows: rows per program, a power of two (None:
    `default_block_rows`); num_warps: None = `default_num_warps`."""
    t, d = x.shape
    if t == 0:
        empty = jnp.zeros((0, d), x.dtype)
        return empty, empty
    block_d = _next_pow2(d)
    if block_rows is None:
        block_rows = default_block_rows(t, d)
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 1, got {block_rows}")
    if num_warps is None:
        num_warps = default_num_warps(block_rows, d)
    m = float(residual_multiplier)
    # A weak-typed Python float in `y * m` is first rounded to y's dtype.
    multiplier = None if m == 1.0 else float(np.asarray(m, dtype=x.dtype))
    kernel = functools.partial(
        _add_rms_norm_kernel, block_rows=block_rows, block_d=block_d, eps=float(eps), multiplier=multiplier
    )
    out = jax.ShapeDtypeStruct((t, d), x.dtype)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, block_rows),),
        out_shape=(out, out),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, y, w)
