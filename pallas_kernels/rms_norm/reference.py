"""Pure-jnp residual add + RMSNorm: the oracle of the Pallas kernel and the CPU fallback.

The same ops, in the same order, as the decoder (`jalora/model/decoder.py`): the residual add runs
in x's dtype (`x + y * m`, `y * m` rounded to that dtype first; `x + y` when m == 1.0) and the
norm reads the ROUNDED sum, in float32, rounding only its result back to x's dtype.
"""

import jax
import jax.numpy as jnp


def rms_norm_reference(x, w, eps: float):
    """RMSNorm over the last axis in float32, the result in x's dtype (the decoder's `rms_norm`)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm_reference(
    x,  # [T, D] residual stream
    y,  # [T, D] the sublayer's output, x's dtype
    w,  # [D] norm weight
    *,
    eps: float,
    residual_multiplier: float = 1.0,
):
    """(x_new, h): x_new = x + y * residual_multiplier in x's dtype, h = rms_norm(x_new, w, eps)."""
    m = residual_multiplier
    x_new = x + y * m if m != 1.0 else x + y
    return x_new, rms_norm_reference(x_new, w, eps)


def validate_inputs(x, y, w, *, eps, residual_multiplier):
    """Static checks (shapes, dtypes, scalars); raises ValueError naming the offending argument."""
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating dtype, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have D >= 1 columns, got shape {x.shape}")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {x.shape}, got {y.shape}")
    if y.dtype != x.dtype:
        raise ValueError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
    if w.shape != (x.shape[1],):
        raise ValueError(f"w must be [D={x.shape[1]}], got shape {w.shape}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a floating dtype, got {w.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a Python float >= 0, got {eps!r}")
    if isinstance(residual_multiplier, bool) or not isinstance(residual_multiplier, int | float):
        raise ValueError(f"residual_multiplier must be a Python float, got {residual_multiplier!r}")
