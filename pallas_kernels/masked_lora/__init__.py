"""Masked multi-LoRA projection: `delta[t] = (x[t] @ A[s]) @ B[s]` for `s = slot[t] >= 0`.

Many adapters per call (stacked in slots), tokens in runs of equal slots, nothing paid for slot -1
rows. The host builds `LoraSegments` once per step (`build_lora_segments`); every adapted projection
of every layer reuses it. `masked_lora` returns the delta; `masked_lora_add` adds it into the base
projection's output in place, touching only adapted rows (the cheaper form for long prefills).

`impl=None` is the platform's kernel (`pallas_kernels.platform.kernel_platform`), or the reference
off GPU/TPU. The one-hot matmuls (`masked_lora_onehot_flat`, or `impl="onehot"`) are the caller's
choice: `masked_lora_tuning()` (tuning.py) says up to which step size a platform takes them.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.masked_lora.reference import (
    masked_lora_reference,
    packed_to_block_diagonal,
    validate_inputs,
)
from pallas_kernels.masked_lora.segments import (
    DEFAULT_BLOCK_TOKENS,
    LoraSegments,
    build_lora_segments,
    default_max_work,
    segments_to_token_slots,
)
from pallas_kernels.masked_lora.tuning import MaskedLoraTuning, masked_lora_tuning
from pallas_kernels.platform import kernel_platform

_IMPLS = ("reference", "onehot", "gpu", "tpu")


def _pick_impl(impl, interpret):
    """impl=None: the platform's kernel, or the reference off GPU/TPU (never the one-hot path)."""
    if impl is None:
        impl = kernel_platform()
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl not in ("reference", "onehot") and not interpret and kernel_platform() != impl:
        raise ValueError(f"impl={impl!r} needs a {impl} backend or interpret=True")
    return impl


def masked_lora_onehot_flat(
    x,  # [T, Din]
    lora_a_flat,  # [Din, num_slots * R]: every slot's A side by side (slot s = columns s*R..(s+1)*R)
    lora_b,  # [num_slots, R, Dout] block-diagonal form
    token_slots,  # i32[T] slot per row, -1 = none
):
    """f32 delta [T, Dout] as two plain matmuls (XLA): x @ A_all, zero every column block but the
    row's own slot, @ B_all. The flat A layout makes the shrink one [T, Din] x [Din, n*R] GEMM with no
    transpose or batch dimension; B [n, R, Dout] is [n*R, Dout] as is. For decode-sized steps (see
    `MaskedLoraTuning.onehot_max_tokens`): the work is T * n * R * (Din + Dout) MACs whatever the slots."""
    n, r, dout = lora_b.shape
    if lora_a_flat.ndim != 2 or lora_a_flat.shape != (x.shape[1], n * r):
        raise ValueError(f"lora_a_flat must be [Din={x.shape[1]}, n*R={n * r}], got shape {lora_a_flat.shape}")
    xa = jnp.dot(x, lora_a_flat, preferred_element_type=jnp.float32)  # [T, n*R]
    col_slot = jnp.arange(n * r, dtype=jnp.int32) // r
    xa = jnp.where(token_slots[:, None] == col_slot[None, :], xa, 0.0).astype(lora_b.dtype)
    return jnp.dot(xa, lora_b.reshape(n * r, dout), preferred_element_type=jnp.float32)


def flatten_lora_a(lora_a):
    """[..., n, Din, R] -> [..., Din, n*R], the layout of `masked_lora_onehot_flat`."""
    *lead, n, din, r = lora_a.shape
    return jnp.moveaxis(lora_a, -3, -2).reshape(*lead, din, n * r)


def masked_lora_onehot(
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R]
    lora_b,  # [num_slots, R, Dout] block-diagonal form
    token_slots,  # i32[T] slot per row, -1 = none
):
    """f32 delta [T, Dout]: shrink against every slot, keep each row's own slot, one expand (XLA)."""
    return masked_lora_onehot_flat(x, flatten_lora_a(lora_a), lora_b, token_slots)


def _widths(out_widths):
    return None if out_widths is None else tuple(int(w) for w in out_widths)


def masked_lora_add(
    y,  # [T, Dout] base projection output; rows outside every segment are returned unchanged
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R] ranks zero-padded to R
    lora_b,  # [num_slots, R, Dout] scaling folded in
    segments: LoraSegments,  # from build_lora_segments (jnp or numpy arrays)
    *,
    out_widths: tuple[int, ...] | None = None,
    impl: str | None = None,
    interpret=False,
):
    """y + delta in y.dtype, f32 accumulation. Kernels alias y: inside a jit whose y is a fresh base
    output (or donated), only the adapted rows are read and written. impl as in `masked_lora`."""
    segments = jax.tree.map(jnp.asarray, segments)
    validate_inputs(x, lora_a, lora_b, segments, y=y, out_widths=out_widths)
    impl = _pick_impl(impl, interpret)
    if impl == "gpu":
        from pallas_kernels.masked_lora.gpu import masked_lora_gpu

        return masked_lora_gpu(
            x,
            lora_a,
            lora_b,
            segments,
            y,
            out_widths=_widths(out_widths),
            accumulate=True,
            interpret=bool(interpret),
        )
    if out_widths is not None:  # TPU kernel and reference take the block-diagonal form
        lora_b = packed_to_block_diagonal(lora_b, tuple(out_widths))
    if impl == "tpu":
        from pallas_kernels.masked_lora.tpu import masked_lora_tpu

        return masked_lora_tpu(x, lora_a, lora_b, segments, y, interpret=interpret)
    slots = segments_to_token_slots(segments, x.shape[0])
    ref = masked_lora_onehot if impl == "onehot" else masked_lora_reference
    delta = ref(x, lora_a, lora_b, slots)
    return (y.astype(jnp.float32) + delta.astype(jnp.float32)).astype(y.dtype)


def masked_lora(
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R] ranks zero-padded to R
    lora_b,  # [num_slots, R, Dout] scaling folded in
    segments: LoraSegments,  # from build_lora_segments (jnp or numpy arrays)
    *,
    out_widths: tuple[int, ...] | None = None,
    impl: str | None = None,
    interpret=False,
):
    """The delta [T, Dout] in x.dtype (f32 accumulation), exactly zero on slot -1 rows.

    impl: None is the platform's kernel (`kernel_platform()`; the reference on CPU), whatever the
    number of tokens; "onehot" the one-hot matmuls, "reference" the jnp oracle; "gpu"/"tpu" force a
    kernel (with `interpret=True`, or a `pltpu.InterpretParams()` for "tpu", it runs on CPU).
    Returning a dense delta costs one zero-fill of [T, Dout]; `masked_lora_add` avoids it.

    out_widths: the packed layout of a fused projection (q/k/v, gate/up), cheaper than a
    block-diagonal B: `lora_a` is [n, Din, k*r] (ranks of the k projections concatenated) and
    `lora_b` is [n, r, sum(out_widths)] (each projection's B side by side, no zero blocks); output
    columns of projection i use ranks i*r..(i+1)*r. The GPU kernel reads it as is (a third of the B
    bytes for q/k/v); the TPU kernel and the reference expand it to block-diagonal first.
    """
    segments = jax.tree.map(jnp.asarray, segments)
    validate_inputs(x, lora_a, lora_b, segments, out_widths=out_widths)
    impl = _pick_impl(impl, interpret)
    t, dout = x.shape[0], lora_b.shape[2]
    if impl == "gpu":
        from pallas_kernels.masked_lora.gpu import masked_lora_gpu

        zeros = jnp.zeros((t, dout), x.dtype)
        return masked_lora_gpu(
            x,
            lora_a,
            lora_b,
            segments,
            zeros,
            out_widths=_widths(out_widths),
            accumulate=False,
            interpret=bool(interpret),
        )
    if out_widths is not None:
        lora_b = packed_to_block_diagonal(lora_b, tuple(out_widths))
    if impl == "tpu":
        from pallas_kernels.masked_lora.tpu import masked_lora_tpu

        return masked_lora_tpu(x, lora_a, lora_b, segments, jnp.zeros((t, dout), x.dtype), interpret=interpret)
    ref = masked_lora_onehot if impl == "onehot" else masked_lora_reference
    return ref(x, lora_a, lora_b, segments_to_token_slots(segments, t)).astype(x.dtype)


__all__ = [
    "MaskedLoraTuning",
    "masked_lora_tuning",
    "masked_lora_onehot",
    "masked_lora_onehot_flat",
    "flatten_lora_a",
    "DEFAULT_BLOCK_TOKENS",
    "LoraSegments",
    "build_lora_segments",
    "default_max_work",
    "masked_lora",
    "masked_lora_add",
    "masked_lora_reference",
    "packed_to_block_diagonal",
    "segments_to_token_slots",
]
