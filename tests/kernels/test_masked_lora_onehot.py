"""The one-hot masked multi-LoRA path (decode-sized steps on GPU) against the reference and float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.masked_lora import (
    build_lora_segments,
    masked_lora,
    masked_lora_add,
    masked_lora_onehot,
    masked_lora_reference,
)


@pytest.mark.parametrize("t, n, din, r, dout", [(16, 3, 32, 8, 40), (64, 8, 64, 16, 96), (128, 1, 48, 64, 17)])
def test_onehot_matches_reference_and_float64(t, n, din, r, dout):
    rng = np.random.default_rng(t + n)
    x = rng.standard_normal((t, din)).astype(np.float32)
    a = rng.standard_normal((n, din, r)).astype(np.float32) * 0.1
    b = rng.standard_normal((n, r, dout)).astype(np.float32) * 0.1
    slots = np.full(t, -1, np.int32)
    cut = np.sort(rng.choice(np.arange(1, t), size=min(4, t - 1), replace=False))
    for k, (lo, hi) in enumerate(zip(np.r_[0, cut], np.r_[cut, t])):
        slots[lo:hi] = -1 if k % 2 == 0 else rng.integers(0, n)
    want = np.zeros((t, dout))
    for i, s in enumerate(slots):
        if s >= 0:
            want[i] = x[i].astype(np.float64) @ a[s] @ b[s]
    got = np.asarray(masked_lora_onehot(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(slots)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.all(got[slots < 0] == 0)
    ref = masked_lora_reference(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(slots))
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-5)
    seg = build_lora_segments(slots, max_segments=8)
    y = rng.standard_normal((t, dout)).astype(np.float32)
    added = masked_lora_add(jnp.asarray(y), jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), seg, impl="onehot")
    np.testing.assert_allclose(np.asarray(added), y + want, atol=1e-4, rtol=1e-4)
    delta = masked_lora(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), seg, impl="onehot")
    np.testing.assert_allclose(np.asarray(delta), want, atol=1e-4, rtol=1e-4)
