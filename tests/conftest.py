"""Shared fixtures: tiny random HF models (written with transformers) and their torch oracles."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: model_dir} for llama, granite and mistral (float32, random weights)."""
    root = tmp_path_factory.mktemp("models")
    return {family: hf_models.make_model(str(root / family), family) for family in hf_models.FAMILIES}
