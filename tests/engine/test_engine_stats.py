"""Engine.stats(): the load and the counters the server's metrics are made of, counted where they happen."""

import numpy as np

from jalora import LLM, SamplingParams
from tests.engine.conftest import SMALL


def test_counters_follow_tokens_preemptions_and_the_prefix_cache(small_llm):
    engine = small_llm.engine
    before = engine.stats()
    prompts = [np.random.default_rng(i).integers(2, 90, size=12).tolist() for i in range(4)]
    outs = small_llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    again = small_llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    after = engine.stats()
    assert after.generation_tokens - before.generation_tokens == 4 * 20 + 2
    assert after.prompt_tokens - before.prompt_tokens == 5 * 12
    assert after.num_preemptions > before.num_preemptions, "the cache was meant to overflow"
    # Once per request, at its first admission: what the outputs report as cached, nothing for recomputes.
    assert after.prefix_cache_queries - before.prefix_cache_queries == 5 * 12
    hits = sum(o.num_cached_tokens for o in outs + again)
    assert after.prefix_cache_hits - before.prefix_cache_hits == hits
    assert after.prefix_cache_hits_base_keyed - before.prefix_cache_hits_base_keyed == hits  # base requests only
    assert after.prefix_cache_hits_base_keyed_by_adapters == before.prefix_cache_hits_base_keyed_by_adapters
    assert after.prefix_cache_evictions > before.prefix_cache_evictions  # 4 requests of 8 blocks in 10 blocks
    assert (after.num_requests_running, after.num_requests_waiting, after.num_used_blocks) == (0, 0, 0)
    assert after.kv_cache_usage == 0.0 and after.num_cached_blocks > 0
    assert after.running_adapters == after.waiting_adapters == ()


def test_load_is_seen_while_requests_wait_and_run(small_llm):
    engine = small_llm.engine
    for i in range(6):  # more than max_num_seqs (4)
        engine.add_request(f"load-{i}", [2 + i] * 9, SamplingParams(max_tokens=3))
    assert (engine.stats().num_requests_running, engine.stats().num_requests_waiting) == (0, 6)
    engine.step()
    stats = engine.stats()
    assert stats.num_requests_running + stats.num_requests_waiting == 6 and stats.num_requests_running > 0
    assert 0 < stats.kv_cache_usage == stats.num_used_blocks / stats.num_total_blocks <= 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_used_blocks == 0


def test_compilations_count_first_uses_of_step_variants(tiny_models):
    llm = LLM(tiny_models["llama"], **{**SMALL, "warmup": True})
    runner = llm.engine.runner
    warmed = llm.engine.stats()
    assert warmed.warmup_compilations == len(runner.buckets) and warmed.warmup_compile_seconds > 0
    assert (warmed.compilations, warmed.compile_seconds) == (0, 0.0)
    llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=3))  # greedy, base: warmed-up variants
    sampled = SamplingParams(max_tokens=3, logprobs=1, prompt_logprobs=1, temperature=0.7, seed=1)
    llm.generate([[20, 21, 22, 23, 24]], sampled)
    # the draw, the top-n and the prompt-logprob functions behind the step were compiled by the warm-up
    assert llm.engine.stats().compilations == 0
    cold = LLM(tiny_models["llama"], **{**SMALL, "warmup": False})
    cold.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=3))
    stats = cold.engine.stats()
    steps = {cold.engine.runner.bucket(n) for n in (5, 1)}  # its prefill step and its decode steps
    assert stats.compilations == len(steps) and stats.compile_seconds > 0 and stats.warmup_compilations == 0
