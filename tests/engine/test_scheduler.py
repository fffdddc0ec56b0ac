"""The scheduler: preemption keeps outputs exact, and blocks always come back."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jalora import LLM, SamplingParams


def test_preemption_gives_same_greedy_tokens(small_llm, tiny_models):
    prompts = [np.random.default_rng(i).integers(2, 90, size=12).tolist() for i in range(4)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    before = small_llm.engine.scheduler.num_preemptions
    outs = small_llm.generate(prompts, params)
    assert small_llm.engine.scheduler.num_preemptions > before, "the cache was meant to overflow"
    roomy = LLM(tiny_models["llama"], block_size=4, num_kv_blocks=64, max_num_seqs=4, warmup=False)
    for prompt, out in zip(prompts, outs):
        (alone,) = roomy.generate([prompt], params)
        assert out.token_ids == alone.token_ids
    assert small_llm.engine.num_free_blocks() == small_llm.engine.num_total_blocks


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.integers(1, 24), st.integers(1, 8), st.integers(-1, 6)),
        min_size=1,
        max_size=6,
    )
)
def test_finish_and_abort_mix_frees_every_block(small_llm, reqs):
    """Requests finishing and aborted at arbitrary steps: the free count returns to the total."""
    engine = small_llm.engine
    for i, (n, max_tokens, _) in enumerate(reqs):
        engine.add_request(f"mix-{i}", list(range(2, 2 + n)), SamplingParams(max_tokens=max_tokens))
    step = 0
    finished = set()
    while engine.has_unfinished_requests():
        for i, (_, _, abort_at) in enumerate(reqs):
            if abort_at == step:
                engine.abort_request(f"mix-{i}")
        for delta in engine.step():
            if delta.is_final:
                finished.add(delta.request_id)
        step += 1
        assert step < 500
    assert finished == {f"mix-{i}" for i in range(len(reqs))}
    assert engine.num_free_blocks() == engine.num_total_blocks
    assert not engine.requests


