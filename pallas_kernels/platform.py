"""The platform the kernels run on: the one place that reads JAX's default backend for dispatch.

`kernel_platform()` names the family of kernels an op takes when no impl is given: "gpu" (CUDA or
ROCm: the Pallas kernels through the Triton lowering), "tpu" (Pallas/Mosaic) or "reference" (every
other backend, e.g. CPU: the pure-jnp references). `device_kind()` keys the tuning tables.
"""

import jax

PLATFORMS = ("gpu", "tpu", "reference")

_BACKEND_PLATFORM = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def kernel_platform() -> str:
    """"gpu", "tpu" or "reference", from `jax.default_backend()`."""
    return _BACKEND_PLATFORM.get(jax.default_backend(), "reference")


def device_kind() -> str:
    """The default device's kind ("NVIDIA H200", "TPU v5 lite", ...), or "cpu" where it has none."""
    return getattr(jax.devices()[0], "device_kind", None) or "cpu"


__all__ = ["PLATFORMS", "device_kind", "kernel_platform"]
