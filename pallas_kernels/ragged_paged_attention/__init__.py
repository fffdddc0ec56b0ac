"""Ragged paged attention: one call for a mixed batch of prefill chunks and decode tokens.

`ragged_paged_attention` dispatches by platform (`pallas_kernels.platform.kernel_platform`): the
Pallas GPU kernel on CUDA/ROCm, the Pallas TPU kernel (RPA design) on TPU, the pure-jnp reference
elsewhere. An explicit `impl` picks one; the kernels run on CPU only with `interpret=True` (tests).
The kernels' tuning is a record per device kind (`tuning.py`), passed as `tuning=`.
"""

from pallas_kernels.platform import kernel_platform
from pallas_kernels.ragged_paged_attention.common import (
    validate_inputs,
    validate_write_inputs,
    validate_write_rope_inputs,
)
from pallas_kernels.ragged_paged_attention.reference import (
    apply_rope,
    ragged_paged_attention_reference,
    write_kv_reference,
    write_kv_rope_reference,
)
from pallas_kernels.ragged_paged_attention.split_prefill import split_prefill_attention
from pallas_kernels.ragged_paged_attention.tuning import (
    GpuAttentionTuning,
    TpuAttentionTuning,
    gpu_attention_tuning,
    tpu_attention_tuning,
)

_IMPLS = ("reference", "gpu", "tpu")


def default_impl() -> str:
    """The impl `impl=None` takes: the platform's kernel, or the reference off GPU/TPU."""
    return kernel_platform()


def ragged_paged_attention(
    q,  # [T, Hq, D]
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    kv_lens,  # i32[S] context length of each sequence, this step's tokens included
    page_indices,  # i32[S, P] cache blocks of each sequence, in order
    cu_q_lens,  # i32[S + 1] query row offsets
    num_seqs,  # i32[] or i32[1] number of valid sequences (<= S)
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    impl: str | None = None,
    interpret=False,
    tuning: GpuAttentionTuning | TpuAttentionTuning | None = None,
    long_context: bool = False,
    long_chunk: bool = False,
    **knobs,
):
    """Attention output [T, Hq, D] in q's dtype; padding rows past cu_q_lens[num_seqs] are zero.

    impl: None (the platform's: `default_impl()`), "reference", "gpu" or "tpu". interpret: run a
    Pallas kernel in interpret mode (True; for "tpu" also a `pltpu.InterpretParams`). tuning: the
    kernel's record (`GpuAttentionTuning` for "gpu", `TpuAttentionTuning` for "tpu"; None = the
    current device's table entry); the reference ignores it. `knobs` go to the kernel as per-call
    overrides (block sizes, splits; see gpu.py / tpu.py). long_context: a hint for decode steps with a
    long context (the GPU kernel's bigger kv-split grid, `gpu.wants_long_grid`); long_chunk: a hint for
    decode-shaped steps whose sequences bring several rows after a long context (its query blocks and grid,
    `gpu.wants_long_chunk`); the others ignore both.
    """
    if impl is None:
        impl = default_impl()
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl != "reference" and not interpret and impl != default_impl():
        raise ValueError(f"impl={impl!r} cannot run on platform {default_impl()!r} without interpret")
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "reference":
        validate_inputs(*args, **kw)
        return ragged_paged_attention_reference(*args, **kw)
    if impl == "gpu":
        from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(*args, **kw, interpret=bool(interpret), tuning=tuning,
                                          long_context=long_context, long_chunk=long_chunk, **knobs)  # fmt: skip
    from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu

    return ragged_paged_attention_tpu(*args, **kw, interpret=interpret, tuning=tuning, **knobs)


def write_kv(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    k,  # [T, Hkv, D] new keys of this step
    v,  # [T, Hkv, D]
    slot_mapping,  # i32[T] flat slot (block * block_size + offset); -1 = padding, not written
):
    """Scatter this step's K/V into the paged cache; returns (k_pages, v_pages).

    Under jit with the caches donated XLA updates them in place (a scatter, no copy of the cache).
    """
    validate_write_inputs(k_pages, v_pages, k, v, slot_mapping)
    return write_kv_reference(k_pages, v_pages, k, v, slot_mapping)


def write_kv_rope(
    k_pages,  # [num_blocks, block_size, Hkv, D]
    v_pages,  # [num_blocks, block_size, Hkv, D]
    qkv,  # [T, q_size + 2 * Hkv * D] the step's fused projection: q, then k, then v
    positions,  # i32[T]
    inv_freq,  # f32[D / 2] RoPE frequencies
    slot_mapping,  # i32[T]; -1 = padding, not written
    *,
    q_size: int,
    rotate_q: bool = False,
    impl: str = "reference",
    interpret=False,
):
    """The step's keys rotated (RoPE, rotate-half) and its values, from the fused projection, into the
    paged caches; returns (k_pages, v_pages), and with `rotate_q` the step's queries rotated too,
    (k_pages, v_pages, q [T, q_size]). impl "gpu": one Pallas launch (`gpu.write_kv_rope_gpu`;
    off a GPU only with `interpret`); "reference": XLA (`write_kv_rope_reference`)."""
    validate_write_rope_inputs(k_pages, v_pages, qkv, positions, inv_freq, slot_mapping, q_size=q_size,
                               rotate_q=rotate_q)  # fmt: skip
    if impl not in ("reference", "gpu"):
        raise ValueError(f"impl must be 'reference' or 'gpu', got {impl!r}")
    if impl == "gpu" and not interpret and default_impl() != "gpu":
        raise ValueError(f"impl='gpu' cannot run on platform {default_impl()!r} without interpret")
    if impl == "gpu":
        from pallas_kernels.ragged_paged_attention.gpu import write_kv_rope_gpu

        return write_kv_rope_gpu(k_pages, v_pages, qkv, positions, inv_freq, slot_mapping, q_size=q_size,
                                 rotate_q=rotate_q, interpret=bool(interpret))  # fmt: skip
    return write_kv_rope_reference(k_pages, v_pages, qkv, positions, inv_freq, slot_mapping, q_size=q_size,
                                   rotate_q=rotate_q)  # fmt: skip


__all__ = [
    "GpuAttentionTuning",
    "TpuAttentionTuning",
    "default_impl",
    "gpu_attention_tuning",
    "tpu_attention_tuning",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "split_prefill_attention",
    "write_kv",
    "write_kv_reference",
    "write_kv_rope",
    "write_kv_rope_reference",
    "apply_rope",
]
