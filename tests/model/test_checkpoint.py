"""Weights from sharded safetensors and in bfloat16, against the single-file float32 load."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jalora import LLM, SamplingParams
from tests import hf_models


@pytest.fixture(scope="module")
def variants(tiny_models, tmp_path_factory):
    src = tiny_models["granite"]
    root = tmp_path_factory.mktemp("ckpt")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(root / "sharded", max_shard_size="40KB")  # many shards + index.json
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return src, str(root / "sharded"), str(root / "bf16")


def test_sharded_index_loads_the_same_model(variants):
    src, sharded, _ = variants
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    ids = np.random.default_rng(0).integers(2, 90, size=30).tolist()
    params = SamplingParams(max_tokens=8, prompt_logprobs=True, ignore_eos=True)
    (a,) = LLM(src, num_kv_blocks=16, max_num_seqs=2, warmup=False).generate([ids], params)
    (b,) = LLM(sharded, num_kv_blocks=16, max_num_seqs=2, warmup=False).generate([ids], params)
    assert a.token_ids == b.token_ids
    assert a.prompt_logprobs == b.prompt_logprobs  # the same weights: bit-identical


def test_bfloat16_weights_and_cache(variants):
    src, _, bf16 = variants
    ids = np.random.default_rng(1).integers(2, 90, size=30).tolist()
    params = SamplingParams(max_tokens=4, prompt_logprobs=True, ignore_eos=True)
    llm = LLM(bf16, dtype="bfloat16", num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert llm.engine.runner.kv_caches[0][0].dtype == np.dtype("bfloat16")
    (b,) = llm.generate([ids], params)
    ref = hf_models.oracle_prompt_logprobs(hf_models.load_oracle(src), ids)
    # bf16 weights and activations against the float32 model: close, not equal.
    assert np.max(np.abs(np.asarray(b.prompt_logprobs[1:]) - np.asarray(ref))) < 0.25
