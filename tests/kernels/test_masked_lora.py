"""Masked multi-LoRA: segment metadata, validation, and both Pallas kernels in CPU interpret mode
(GPU: `interpret=True`, TPU: `pltpu.InterpretParams()`) against the jnp reference and float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masked_lora import (
    build_lora_segments,
    default_max_work,
    masked_lora,
    masked_lora_add,
    masked_lora_reference,
    packed_to_block_diagonal,
    segments_to_token_slots,
)

KERNELS = {"gpu": True, "tpu": "tpu-interpret"}


def _interpret(impl):
    return pltpu.InterpretParams() if KERNELS[impl] == "tpu-interpret" else True


def _runs(rng, t, num_slots, p_base=0.3, max_run=12):
    """Random runs of equal slots (-1 with probability p_base), as the scheduler orders them."""
    out = []
    while len(out) < t:
        slot = -1 if rng.random() < p_base else int(rng.integers(num_slots))
        out += [slot] * int(rng.integers(1, max_run + 1))
    return np.asarray(out[:t], np.int32)


def _weights(rng, num_slots, din, r, dout, dtype, rank_used=None):
    a = rng.standard_normal((num_slots, din, r)) / np.sqrt(din)
    b = rng.standard_normal((num_slots, r, dout)) / np.sqrt(r)
    if rank_used is not None:  # ranks zero-padded to R, as the engine stacks adapters
        a[:, :, rank_used:] = 0
        b[:, rank_used:, :] = 0
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _f64(x, a, b, slots):
    x, a, b = (np.asarray(v.astype(jnp.float32), np.float64) for v in (x, a, b))
    out = np.zeros((x.shape[0], b.shape[2]))
    for t, s in enumerate(slots):
        if s >= 0:
            out[t] = (x[t] @ a[s]) @ b[s]
    return out


def _rel(out, ref):
    out, ref = np.asarray(jnp.asarray(out, jnp.float32), np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _check(impl, slots, *, din, r, dout, num_slots, dtype=jnp.bfloat16, seed=0, max_segments=None, rank_used=None):
    rng = np.random.default_rng(seed)
    t = slots.shape[0]
    x = jnp.asarray(rng.standard_normal((t, din)), dtype)
    a, b = _weights(rng, num_slots, din, r, dout, dtype, rank_used)
    segs = build_lora_segments(slots, max_segments or max(1, t), num_slots=num_slots)
    out = masked_lora(x, a, b, segs, impl=impl, interpret=_interpret(impl))
    assert out.shape == (t, dout) and out.dtype == x.dtype
    out_np = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out_np).all()
    assert (out_np[slots < 0] == 0).all(), "slot -1 rows must be exactly zero"
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    ref64 = _f64(x, a, b, slots)
    if (slots >= 0).any():
        assert _rel(out, ref64) < tol
        assert _rel(out, masked_lora_reference(x, a, b, slots).astype(jnp.float32)) < tol
    else:
        assert (out_np == 0).all()
    return x, a, b, segs


# ----------------------------------------------------------------------------- segment metadata


def test_segments_no_work_for_base_runs():
    slots = np.full(8192, -1, np.int32)
    slots[-16:] = 3  # an 8k prefill activated in its last 16 tokens
    segs = build_lora_segments(slots, 4)
    assert int(segs.num_segments[0]) == 1 and int(segs.num_work[0]) == 1
    assert (segs.work_tile[0], segs.work_slot[0]) == (8192 // 16 - 1, 3)
    assert (segs.work_start[0], segs.work_end[0]) == (8176, 8192)
    none = build_lora_segments(np.full(100, -1, np.int32), 4)
    assert int(none.num_work[0]) == 0 and int(none.num_segments[0]) == 0
    assert none.work_tile.shape == (default_max_work(100, 4),)


@pytest.mark.parametrize("seed", range(5))
def test_segments_cover_exactly_the_adapted_rows(seed):
    rng = np.random.default_rng(seed)
    slots = _runs(rng, int(rng.integers(1, 300)), 5, p_base=0.5)
    segs = build_lora_segments(slots, slots.shape[0], block_tokens=16)
    got = np.full(slots.shape, -1)
    n = int(segs.num_work[0])
    for w in range(n):
        lo, hi = segs.work_start[w], segs.work_end[w]
        assert segs.work_tile[w] * 16 <= lo < hi <= (segs.work_tile[w] + 1) * 16
        assert (got[lo:hi] == -1).all(), "rows covered twice"
        got[lo:hi] = segs.work_slot[w]
    np.testing.assert_array_equal(got, slots)
    assert (np.diff(segs.work_tile[:n]) >= 0).all(), "items must be in token order (TPU accumulation)"
    assert (segs.work_start[n:] == segs.work_end[n:]).all()
    np.testing.assert_array_equal(segments_to_token_slots(segs, slots.shape[0]), slots)


def test_segments_errors():
    with pytest.raises(ValueError, match="max_segments"):
        build_lora_segments(np.array([0, 0, 1, 1, -1, 2], np.int32), 2)
    with pytest.raises(ValueError, match="token_slots"):
        build_lora_segments(np.array([0, -2], np.int32), 2)
    with pytest.raises(ValueError, match="token_slots"):
        build_lora_segments(np.zeros((2, 2), np.int32), 2)
    with pytest.raises(ValueError, match="num_slots"):
        build_lora_segments(np.array([0, 5], np.int32), 2, num_slots=4)
    with pytest.raises(ValueError, match="max_work"):
        build_lora_segments(np.arange(64, dtype=np.int32) % 2, 64, max_work=4)


def test_validation_names_the_argument():
    x = jnp.zeros((16, 32), jnp.bfloat16)
    a = jnp.zeros((2, 32, 8), jnp.bfloat16)
    b = jnp.zeros((2, 8, 24), jnp.bfloat16)
    segs = build_lora_segments(np.zeros(16, np.int32), 2)
    with pytest.raises(ValueError, match="lora_a"):
        masked_lora(x, jnp.zeros((2, 31, 8), jnp.bfloat16), b, segs)
    with pytest.raises(ValueError, match="lora_b"):
        masked_lora(x, a, jnp.zeros((3, 8, 24), jnp.bfloat16), segs)
    with pytest.raises(ValueError, match="x must"):
        masked_lora(x[0], a, b, segs)
    with pytest.raises(ValueError, match="y must"):
        masked_lora_add(jnp.zeros((16, 23)), x, a, b, segs)
    with pytest.raises(ValueError, match="impl"):
        masked_lora(x, a, b, segs, impl="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret"):
            masked_lora(x, a, b, segs, impl="gpu")


def test_dispatch_on_cpu_is_the_reference():
    rng = np.random.default_rng(1)
    slots = _runs(rng, 40, 3)
    x = jnp.asarray(rng.standard_normal((40, 32)), jnp.float32)
    a, b = _weights(rng, 3, 32, 8, 20, jnp.float32)
    out = masked_lora(x, a, b, build_lora_segments(slots, 40))
    assert _rel(out, _f64(x, a, b, slots)) < 1e-5


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize(
    "case",
    [
        # name, T, Din, R, Dout, slots
        ("random_runs_r8_odd_dout", 48, 64, 8, 72, "runs"),
        ("all_base_r16", 40, 64, 16, 48, "none"),
        ("one_token_per_slot_r32", 21, 32, 32, 40, "each"),
        ("padding_rows_r64_odd_t", 37, 48, 64, 130, "padded"),
    ],
    ids=lambda c: c[0],
)
def test_kernel_matches_reference(impl, case):
    _, t, din, r, dout, kind = case
    rng = np.random.default_rng(7)
    num_slots = 5
    if kind == "runs":
        slots = _runs(rng, t, num_slots)
    elif kind == "none":
        slots = np.full(t, -1, np.int32)
    elif kind == "each":
        slots = np.array([i % num_slots for i in range(t)], np.int32)  # 21 one-token segments
    else:
        slots = np.concatenate([_runs(rng, t - 9, num_slots, p_base=0.0), np.full(9, -1)]).astype(np.int32)
    _check(impl, slots, din=din, r=r, dout=dout, num_slots=num_slots)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_fused_qkv_block_diagonal(impl):
    """q/k/v fused as the engine does: A concatenated along R, B block-diagonal, GQA widths."""
    rng = np.random.default_rng(3)
    n, t, din, r = 3, 48, 64, 8
    widths = (64, 16, 8)  # Dq > Dk > Dv: unequal, so a column block would straddle if not split
    a = rng.standard_normal((n, din, 3 * r)) / 8
    b = np.zeros((n, 3 * r, sum(widths)))
    col = 0
    for i, wdt in enumerate(widths):
        b[:, i * r : (i + 1) * r, col : col + wdt] = rng.standard_normal((n, r, wdt)) / 3
        col += wdt
    a, b = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((t, din)), jnp.bfloat16)
    slots = _runs(rng, t, n)
    segs = build_lora_segments(slots, t)
    out = masked_lora(x, a, b, segs, impl=impl, interpret=_interpret(impl))
    ref = _f64(x, a, b, slots)
    assert _rel(out, ref) < 1e-2
    # The packed layout: each projection's B side by side, [n, r, Dq + Dk + Dv], no zero blocks.
    packed = jnp.concatenate(
        [b[:, i * r : (i + 1) * r, sum(widths[:i]) : sum(widths[: i + 1])] for i in range(3)], axis=2
    )
    np.testing.assert_array_equal(packed_to_block_diagonal(packed, widths), b)
    out_p = masked_lora(x, a, packed, segs, out_widths=widths, impl=impl, interpret=_interpret(impl))
    assert _rel(out_p, ref) < 1e-2
    with pytest.raises(ValueError, match="lora_b"):
        masked_lora(x, a, packed, segs, out_widths=(64, 16, 15))


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_add_leaves_base_rows_untouched(impl):
    rng = np.random.default_rng(5)
    t, din, r, dout = 64, 48, 16, 40
    slots = np.full(t, -1, np.int32)
    slots[50:] = 1  # activated only at the tail, inside a tile shared with base rows
    x = jnp.asarray(rng.standard_normal((t, din)), jnp.float32)
    a, b = _weights(rng, 2, din, r, dout, jnp.float32)
    y = jnp.asarray(rng.standard_normal((t, dout)), jnp.float32)
    out = np.asarray(masked_lora_add(y, x, a, b, build_lora_segments(slots, 4), impl=impl, interpret=_interpret(impl)))
    np.testing.assert_array_equal(out[:50], np.asarray(y)[:50])
    assert _rel(out[50:], np.asarray(y)[50:] + _f64(x, a, b, slots)[50:]) < 1e-5


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_rank_padding_and_f32(impl):
    """Adapters of rank 8 zero-padded into R=32 slots; float32 end to end."""
    rng = np.random.default_rng(11)
    slots = _runs(rng, 33, 4, p_base=0.2)
    _check(impl, slots, din=40, r=32, dout=24, num_slots=4, dtype=jnp.float32, rank_used=8)


@pytest.mark.parametrize("impl", KERNELS)
@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 70),
    r=st.sampled_from([8, 16, 32, 64]),
    dout=st.integers(1, 150),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_shapes(impl, t, r, dout, seed):
    slots = _runs(np.random.default_rng(seed), t, 4)
    _check(impl, slots, din=32, r=r, dout=dout, num_slots=4, seed=seed)
