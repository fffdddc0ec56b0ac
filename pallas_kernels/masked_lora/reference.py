"""Pure-jnp masked multi-LoRA: the oracle of the Pallas kernels and the CPU fallback.

`delta[t] = (x[t] @ A[s]) @ B[s]` for `s = token_slots[t] >= 0`, zero where the slot is -1. The
adapter scaling is folded into B; ranks are zero-padded to R. Accumulates in float32.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.masked_lora.segments import LoraSegments

_HI = jax.lax.Precision.HIGHEST


def masked_lora_reference(
    x,  # [T, Din]
    lora_a,  # [num_slots, Din, R]
    lora_b,  # [num_slots, R, Dout]
    token_slots,  # i32[T] adapter slot per row, -1 = none
):
    """Delta [T, Dout] in x.dtype. Loops over slots (not tokens): memory stays O(T * (R + Dout))."""
    t = x.shape[0]
    xf = x.astype(jnp.float32)
    token_slots = jnp.asarray(token_slots, jnp.int32)

    def one_slot(s, acc):
        h = jnp.dot(xf, lora_a[s].astype(jnp.float32), precision=_HI)
        d = jnp.dot(h, lora_b[s].astype(jnp.float32), precision=_HI)
        return jnp.where((token_slots == s)[:, None], d, acc)

    acc = jnp.zeros((t, lora_b.shape[2]), jnp.float32)
    return jax.lax.fori_loop(0, lora_a.shape[0], one_slot, acc).astype(x.dtype)


def packed_to_block_diagonal(
    lora_b,  # [num_slots, R_b, sum(out_widths)] packed fused-projection B
    out_widths: tuple[int, ...],
):
    """[num_slots, len(out_widths) * R_b, Dout] block-diagonal B: projection i reads ranks i*R_b..."""
    n, r_b, dout = lora_b.shape
    cols = jnp.arange(dout)
    proj = sum((cols >= c).astype(jnp.int32) for c in _cumsum(out_widths)[:-1])  # [Dout]
    blocks = [jnp.where((proj == i)[None, None, :], lora_b, 0) for i in range(len(out_widths))]
    return jnp.concatenate(blocks, axis=1).reshape(n, len(out_widths) * r_b, dout)


def _cumsum(widths):
    out, acc = [], 0
    for w in widths:
        acc += w
        out.append(acc)
    return out


def validate_inputs(x, lora_a, lora_b, segments: LoraSegments, y=None, out_widths=None):
    """Static checks (shapes, dtypes); raises ValueError naming the offending argument."""
    if x.ndim != 2:
        raise ValueError(f"x must be [T, Din], got shape {x.shape}")
    if lora_a.ndim != 3:
        raise ValueError(f"lora_a must be [num_slots, Din, R], got shape {lora_a.shape}")
    if lora_b.ndim != 3:
        raise ValueError(f"lora_b must be [num_slots, R, Dout], got shape {lora_b.shape}")
    t, din = x.shape
    n, a_din, r = lora_a.shape
    if a_din != din:
        raise ValueError(f"lora_a must have Din={din} (x.shape[1]), got shape {lora_a.shape}")
    if out_widths is None:
        if lora_b.shape[:2] != (n, r):
            raise ValueError(f"lora_b must be [{n}, {r}, Dout] to match lora_a, got shape {lora_b.shape}")
    else:
        k = len(out_widths)
        if k < 1 or r % k or lora_b.shape != (n, r // k, sum(out_widths)):
            raise ValueError(
                f"lora_b must be packed [{n}, R/{k}, sum(out_widths)={sum(out_widths)}] for out_widths="
                f"{tuple(out_widths)} and R={r}, got shape {lora_b.shape}"
            )
    for name, arr in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {arr.dtype}")
    if lora_a.dtype != lora_b.dtype:
        raise ValueError(f"lora_b must have lora_a's dtype {lora_a.dtype}, got {lora_b.dtype}")
    if not isinstance(segments, LoraSegments):
        raise ValueError(f"segments must be a LoraSegments (build_lora_segments), got {type(segments)}")
    for field in ("seg_start", "seg_len", "seg_slot", "work_tile", "work_slot", "work_start", "work_end"):
        arr = getattr(segments, field)
        if arr.ndim != 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"segments.{field} must be a 1-D integer array, got {arr.shape} {arr.dtype}")
    if segments.num_work.shape != (1,) or segments.num_segments.shape != (1,):
        raise ValueError("segments.num_work and segments.num_segments must have shape (1,)")
    if y is not None and (y.shape != (t, lora_b.shape[2])):
        raise ValueError(f"y must be [T, Dout] = {(t, lora_b.shape[2])}, got shape {y.shape}")
