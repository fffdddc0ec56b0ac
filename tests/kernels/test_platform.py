"""The one platform decision of the kernels: backend name -> gpu / tpu / reference."""

import pytest

import pallas_kernels.platform as platform


@pytest.mark.parametrize(
    "backend, want",
    [("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"), ("cpu", "reference"), ("METAL", "reference")],
)
def test_kernel_platform(monkeypatch, backend, want):
    monkeypatch.setattr(platform.jax, "default_backend", lambda: backend)
    assert platform.kernel_platform() == want


def test_this_machine():
    assert platform.kernel_platform() == "reference"
    assert platform.device_kind() == "cpu"


def test_ops_dispatch_through_the_platform(monkeypatch):
    from pallas_kernels.ragged_paged_attention import default_impl

    monkeypatch.setattr(platform.jax, "default_backend", lambda: "cuda")
    assert default_impl() == "gpu"
    monkeypatch.setattr(platform.jax, "default_backend", lambda: "tpu")
    assert default_impl() == "tpu"
