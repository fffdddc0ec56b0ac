"""Masked multi-LoRA projection: `delta[t] = (x[t] @ A[s]) @ B[s]` for `s = slot[t] >= 0`.

Many adapters per call (stacked in slots), tokens in runs of equal slots, nothing paid for slot -1
rows. The host builds `LoraSegments` once per step (`build_lora_segments`); every adapted projection
of every layer reuses it. `masked_lora` returns the delta; `masked_lora_add` adds it into the base
projection's output in place, touching only adapted rows (the cheaper form for long prefills).
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

_IMPLS = ("reference", "gpu", "tpu")


def _pick_impl(impl, interpret):
    if impl is None:
        impl = {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "reference")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl != "reference" and not interpret and jax.default_backend() != impl:
        raise ValueError(f"impl={impl!r} needs a {impl} backend or interpret=True")
    return impl


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
    output (or donated), only the adapted rows are read and written."""
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
    delta = masked_lora_reference(x, lora_a, lora_b, slots)
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

    impl: None picks by `jax.default_backend()` (reference on CPU); "gpu"/"tpu" force a kernel
    (with `interpret=True`, or a `pltpu.InterpretParams()` for "tpu", it runs on CPU).
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
    return masked_lora_reference(x, lora_a, lora_b, segments_to_token_slots(segments, t))


__all__ = [
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
