"""Fused residual add + RMSNorm: `x_new = x + y * m`, `h = rms_norm(x_new, w, eps)` in one pass.

`add_rms_norm` dispatches by platform (`pallas_kernels.platform.kernel_platform`): the Pallas GPU
kernel on CUDA/ROCm, the pure-jnp reference elsewhere (TPU included: XLA fuses the jnp form there).
An explicit `impl` picks one; the GPU kernel runs on CPU only with `interpret=True` (tests).
"""

from pallas_kernels.platform import kernel_platform
from pallas_kernels.rms_norm.reference import add_rms_norm_reference, rms_norm_reference, validate_inputs

_IMPLS = ("reference", "gpu")


def default_impl() -> str:
    """The impl `impl=None` takes: "gpu" on a GPU platform, else "reference"."""
    return "gpu" if kernel_platform() == "gpu" else "reference"


def add_rms_norm(
    x,  # [T, D] residual stream
    y,  # [T, D] sublayer output, x's dtype
    w,  # [D] norm weight
    *,
    eps: float,
    residual_multiplier: float = 1.0,
    impl: str | None = None,
    interpret: bool = False,
    block_rows: int | None = None,
    num_warps: int | None = None,
):
    """(x_new, h), both [T, D] in x's dtype: x_new = x + y * residual_multiplier (in x's dtype, as
    the decoder's jnp code rounds it), h = rms_norm(x_new, w, eps) of the rounded x_new.

    impl: None (`default_impl()`), "reference" or "gpu"; interpret: run the GPU kernel in Pallas
    interpret mode (CPU tests). block_rows (a power of two) and num_warps tune the kernel (None: its
    defaults, see gpu.py); the reference ignores them.
    """
    validate_inputs(x, y, w, eps=eps, residual_multiplier=residual_multiplier)
    if impl is None:
        impl = default_impl()
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS} or None, got {impl!r}")
    if impl == "gpu" and not interpret and kernel_platform() != "gpu":
        raise ValueError(f"impl='gpu' cannot run on platform {kernel_platform()!r} without interpret")
    if impl == "reference":
        return add_rms_norm_reference(x, y, w, eps=eps, residual_multiplier=residual_multiplier)
    from pallas_kernels.rms_norm.gpu import add_rms_norm_gpu

    return add_rms_norm_gpu(x, y, w, eps=float(eps), residual_multiplier=float(residual_multiplier),
                            interpret=bool(interpret), block_rows=block_rows, num_warps=num_warps)  # fmt: skip


__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "default_impl",
    "rms_norm_reference",
]
