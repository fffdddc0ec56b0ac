"""Fused residual add + RMSNorm: the GPU Pallas kernel in CPU interpret mode against the jnp reference.

x_new is bit-exact in every dtype (bf16: the add and the product y * m are rounded as jnp rounds
them). h differs from the reference only through the order of the f32 sum of squares: for bf16 it
is within one ulp and almost always identical, which is strict enough to catch a norm of the
unrounded sum (a one-ulp change in about a fifth of the elements).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import add_rms_norm, add_rms_norm_reference, default_impl
from pallas_kernels.rms_norm.gpu import default_block_rows, default_num_warps

EPS = 1e-6


def _inputs(t, d, dtype, w_dtype=None, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(3.0 * rng.standard_normal((t, d)), dtype)  # the residual stream is the larger term
    y = jnp.asarray(rng.standard_normal((t, d)), dtype)
    w = jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), w_dtype or dtype)
    return x, y, w


def _ulps(a, b):
    """Elementwise distance in units in the last place of a and b (same 16-bit float dtype)."""
    ia = np.asarray(a).view(np.int16).astype(np.int32)
    ib = np.asarray(b).view(np.int16).astype(np.int32)
    # map sign-magnitude to a monotonic integer line
    ia = np.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFF), ib)
    return np.abs(ia - ib)


def _check(out, ref, dtype, m):
    (xn, h), (rxn, rh) = out, ref
    assert xn.dtype == h.dtype == dtype and xn.shape == h.shape == rxn.shape
    if dtype == jnp.float32:
        if m == 1.0:  # a single f32 add
            np.testing.assert_array_equal(np.asarray(xn), np.asarray(rxn))
        else:  # XLA may contract x + y * m into one fma (jit, the interpreted kernel) or not (eager ops)
            np.testing.assert_allclose(np.asarray(xn), np.asarray(rxn), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(h), np.asarray(rh), rtol=1e-6, atol=1e-6)
        return
    np.testing.assert_array_equal(np.asarray(xn.view(jnp.uint16)), np.asarray(rxn.view(jnp.uint16)))
    ulps = _ulps(h, rh)
    assert ulps.max() <= 1, f"h off by {ulps.max()} ulps"
    assert (ulps > 0).mean() <= 1e-3, f"h differs in {(ulps > 0).mean():.2%} of the elements"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("d", [256, 96])
@pytest.mark.parametrize("m", [1.0, 0.22])
def test_kernel_matches_reference(dtype, d, m):
    x, y, w = _inputs(37, d, dtype)  # 37 rows: the last block of 8 is partial
    out = add_rms_norm(x, y, w, eps=EPS, residual_multiplier=m, impl="gpu", interpret=True, block_rows=8)
    _check(out, add_rms_norm_reference(x, y, w, eps=EPS, residual_multiplier=m), dtype, m)


@pytest.mark.parametrize(
    "t,d,dtype,w_dtype,m",
    [
        (3, 5000, jnp.bfloat16, jnp.float32, 0.5),  # wide, not a power of two; f32 weights; default tiling
        (5, 64, jnp.float16, None, 0.22),  # many rows per program by default, the last one partial
        (1, 8192, jnp.bfloat16, None, 1.0),
    ],
)
def test_kernel_default_tiling(t, d, dtype, w_dtype, m):
    x, y, w = _inputs(t, d, dtype, w_dtype, seed=1)
    out = add_rms_norm(x, y, w, eps=1e-5, residual_multiplier=m, impl="gpu", interpret=True)
    _check(out, add_rms_norm_reference(x, y, w, eps=1e-5, residual_multiplier=m), dtype, m)


def test_multiplier_is_rounded_like_jnp():
    """bf16: y * 0.22 multiplies by bf16(0.22) = 0.2197... and rounds the product before the add."""
    x, y, w = _inputs(16, 128, jnp.bfloat16, seed=2)
    xn, _ = add_rms_norm(x, y, w, eps=EPS, residual_multiplier=0.22, impl="gpu", interpret=True)
    np.testing.assert_array_equal(np.asarray(xn.view(jnp.uint16)), np.asarray((x + y * 0.22).view(jnp.uint16)))
    xf, yf = x.astype(jnp.float32), y.astype(jnp.float32)
    unrounded = (xf + yf * float(jnp.bfloat16(0.22))).astype(jnp.bfloat16)
    assert bool((unrounded != xn).any())  # the product's rounding matters on these inputs


def test_empty_rows():
    x, y, w = _inputs(0, 64, jnp.bfloat16)
    xn, h = add_rms_norm(x, y, w, eps=EPS, impl="gpu", interpret=True)
    assert xn.shape == h.shape == (0, 64) and xn.dtype == h.dtype == jnp.bfloat16


def test_dispatch():
    x, y, w = _inputs(4, 32, jnp.float32)
    if jax.default_backend() == "cpu":
        assert default_impl() == "reference"
        out = add_rms_norm(x, y, w, eps=EPS, residual_multiplier=0.5)
        ref = add_rms_norm_reference(x, y, w, eps=EPS, residual_multiplier=0.5)
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with pytest.raises(ValueError, match="interpret"):
            add_rms_norm(x, y, w, eps=EPS, impl="gpu")
    with pytest.raises(ValueError, match="impl"):
        add_rms_norm(x, y, w, eps=EPS, impl="tpu")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=jnp.zeros((4,), jnp.float32)), "x must be"),
        (dict(x=jnp.zeros((4, 32), jnp.int32), y=jnp.zeros((4, 32), jnp.int32)), "x must be a floating"),
        (dict(y=jnp.zeros((4, 16), jnp.float32)), "y must have x's shape"),
        (dict(y=jnp.zeros((4, 32), jnp.bfloat16)), "y must have x's dtype"),
        (dict(w=jnp.zeros((16,), jnp.float32)), "w must be"),
        (dict(eps=-1.0), "eps"),
        (dict(residual_multiplier="2"), "residual_multiplier"),
    ],
)
def test_validation(change, match):
    x, y, w = _inputs(4, 32, jnp.float32)
    kw = dict(x=x, y=y, w=w, eps=EPS, residual_multiplier=1.0) | change
    with pytest.raises(ValueError, match=match):
        add_rms_norm(kw.pop("x"), kw.pop("y"), kw.pop("w"), impl="gpu", interpret=True, **kw)


def test_bad_block_rows():
    x, y, w = _inputs(4, 32, jnp.float32)
    with pytest.raises(ValueError, match="block_rows"):
        add_rms_norm(x, y, w, eps=EPS, impl="gpu", interpret=True, block_rows=3)


def test_default_tiling():
    assert default_block_rows(8192, 4096) == 1 and default_block_rows(8192, 8192) == 1
    assert default_block_rows(8192, 2048) == 2 and default_block_rows(8192, 96) == 32
    assert default_block_rows(3, 64) == 4  # no more rows than the input has
    assert default_num_warps(1, 4096) == 8 and default_num_warps(1, 8192) == 16 and default_num_warps(4, 64) == 4
