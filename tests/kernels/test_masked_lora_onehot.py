"""The one-hot masked multi-LoRA path (decode-sized steps on GPU) against the reference and float64;
impl=None never takes it on its own; the (platform, device kind) tuning table that says when to."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.masked_lora as ml
from pallas_kernels.masked_lora import (
    DEFAULT_BLOCK_TOKENS,
    MaskedLoraTuning,
    build_lora_segments,
    masked_lora,
    masked_lora_add,
    masked_lora_onehot,
    masked_lora_reference,
    masked_lora_tuning,
)
from pallas_kernels.platform import kernel_platform


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


# ----------------------------------------------------------------------------- impl=None and the tuning table


def _small_case(t, seed=0):
    rng = np.random.default_rng(seed)
    slots = np.full(t, -1, np.int32)
    slots[: t // 2] = 0
    slots[t // 2 : t - 2] = 1
    x = jnp.asarray(rng.standard_normal((t, 32)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((2, 32, 8)) * 0.1, jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, 8, 24)) * 0.1, jnp.float32)
    y = jnp.asarray(rng.standard_normal((t, 24)), jnp.float32)
    return x, a, b, y, slots, build_lora_segments(slots, max_segments=4)


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _forbid_onehot(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("impl=None took the one-hot path")

    monkeypatch.setattr(ml, "masked_lora_onehot", boom)
    monkeypatch.setattr(ml, "masked_lora_onehot_flat", boom)


@pytest.mark.parametrize("t", [16, 64, 128, 200])
def test_impl_none_on_cpu_is_the_reference_at_every_size(monkeypatch, t):
    assert kernel_platform() == "reference"
    x, a, b, y, slots, seg = _small_case(t)
    want = np.asarray(masked_lora_reference(x, a, b, jnp.asarray(slots)))
    calls = []
    _spy(monkeypatch, ml, "masked_lora_reference", calls)
    _forbid_onehot(monkeypatch)
    np.testing.assert_allclose(np.asarray(masked_lora(x, a, b, seg)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(masked_lora_add(y, x, a, b, seg)), np.asarray(y) + want, atol=1e-5)
    assert calls == ["masked_lora_reference"] * 2


@pytest.mark.parametrize("op", ["masked_lora", "masked_lora_add"])
def test_impl_none_on_a_gpu_platform_is_the_kernel_even_for_small_steps(monkeypatch, op):
    """With the platform reported as gpu, a 16-row step (well under the GPU's one-hot threshold) still
    takes the kernel: the ops never switch to the one-hot path on their own."""
    import pallas_kernels.masked_lora.gpu as gpu_mod

    x, a, b, y, slots, seg = _small_case(16, seed=3)
    want = np.asarray(masked_lora_reference(x, a, b, jnp.asarray(slots)))
    monkeypatch.setattr(ml, "kernel_platform", lambda: "gpu")
    calls = []
    _spy(monkeypatch, gpu_mod, "masked_lora_gpu", calls)
    _forbid_onehot(monkeypatch)
    if op == "masked_lora":
        out, ref = masked_lora(x, a, b, seg, interpret=True), want
    else:
        out, ref = masked_lora_add(y, x, a, b, seg, interpret=True), np.asarray(y) + want
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
    assert calls == ["masked_lora_gpu"]


def test_masked_lora_tuning_table():
    assert masked_lora_tuning("gpu").onehot_max_tokens == 128
    assert masked_lora_tuning("gpu", "NVIDIA H200").onehot_max_tokens == 128
    assert masked_lora_tuning("gpu", "Some Other GPU") is masked_lora_tuning("gpu")
    assert masked_lora_tuning("tpu").onehot_max_tokens == 0
    assert masked_lora_tuning("reference").onehot_max_tokens is None
    assert masked_lora_tuning() is masked_lora_tuning("reference")  # this CPU machine
    assert all(masked_lora_tuning(p).block_tokens == DEFAULT_BLOCK_TOKENS for p in ("gpu", "tpu", "reference"))
    gpu, tpu, ref = (masked_lora_tuning(p) for p in ("gpu", "tpu", "reference"))
    assert [gpu.takes_onehot(n) for n in (1, 128, 129)] == [True, True, False]
    assert [tpu.takes_onehot(n) for n in (1, 128)] == [False, False]
    assert [ref.takes_onehot(n) for n in (1, 1 << 20)] == [True, True]
    with pytest.raises(ValueError, match="platform"):
        masked_lora_tuning("cuda")
    with pytest.raises(ValueError, match="block_tokens"):
        MaskedLoraTuning(onehot_max_tokens=None, block_tokens=12)
    with pytest.raises(ValueError, match="onehot_max_tokens"):
        MaskedLoraTuning(onehot_max_tokens=-1)
    assert hash(MaskedLoraTuning(onehot_max_tokens=8)) == hash(MaskedLoraTuning(onehot_max_tokens=8))
    assert not hasattr(ml, "ONEHOT_MAX_TOKENS")
