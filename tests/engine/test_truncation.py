"""vLLM's truncate_prompt_tokens: the prompt's last k tokens only, and a prompt longer than max_model_len is no
error then. Against transformers' greedy tokens of the last k tokens."""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from tests import hf_models


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_kv_blocks=32, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32,
               warmup=False)  # fmt: skip


def test_the_last_k_tokens_of_a_prompt_too_long_for_the_model(llm, tiny_models):
    prompt = np.random.default_rng(5).integers(2, hf_models.VOCAB - 1, size=150).tolist()
    oracle = hf_models.load_oracle(tiny_models["llama"])
    params = [SamplingParams(max_tokens=6, ignore_eos=True, truncate_prompt_tokens=k) for k in (20, 40)]
    outs = llm.generate([prompt, prompt[:10]], params)
    assert outs[0].prompt_token_ids == prompt[-20:]
    assert outs[0].token_ids == hf_models.oracle_greedy(oracle, prompt[-20:], 6)
    assert outs[1].prompt_token_ids == prompt[:10]  # (a shorter prompt stays whole)
    # -1: as many as max_model_len takes, leaving room for one new token
    (longest,) = llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True, truncate_prompt_tokens=-1))
    assert longest.prompt_token_ids == prompt[-63:]
    assert longest.token_ids == hf_models.oracle_greedy(oracle, prompt[-63:], 1) and longest.finish_reason == "length"
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks
