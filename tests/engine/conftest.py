"""Engines shared by the engine tests: a cache of 10 blocks of 4 tokens, which a few requests of ~20
tokens overflow (preemption), with async scheduling (the default) and with the synchronous loop."""

import pytest

from jalora import LLM

SMALL = dict(block_size=4, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=32, warmup=False)


@pytest.fixture(scope="module")
def small_llm(tiny_models):
    return LLM(tiny_models["llama"], **SMALL)


@pytest.fixture(scope="module")
def small_llm_sync(tiny_models):
    return LLM(tiny_models["llama"], async_scheduling=False, **SMALL)


@pytest.fixture(params=["async", "sync"])
def any_llm(request):
    """Each test that takes it runs once per scheduling mode."""
    return request.getfixturevalue("small_llm" if request.param == "async" else "small_llm_sync")
