"""The step pipeline: async scheduling (the next step enqueued before the last is read back, its
tokens fed on the device) against the synchronous loop, and interruptions in either mode."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jalora import SamplingParams


@pytest.mark.parametrize("where", ["dispatch", "fetch"])
def test_interrupted_generate_frees_everything(any_llm, where, monkeypatch):
    """Ctrl-C while a step is enqueued or read back (with another step still queued, in async mode):
    the call's requests end, every block comes back, and the engine keeps working."""
    engine = any_llm.engine
    real = getattr(engine.runner, where)
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(engine.runner, where, flaky)
    with pytest.raises(KeyboardInterrupt):
        any_llm.generate([[3, 4, 5], [6, 7]], SamplingParams(max_tokens=5))
    monkeypatch.undo()
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_total_blocks
    (out,) = any_llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2))
    assert len(out.token_ids) == 2


def _run_engine(engine, work, abort_at=None):
    """Adds `work` [(prompt, params)], steps to completion (aborting request `abort_at` = (index, step)),
    returns {request id: (token ids, logprobs, prompt logprobs, finish reason)}, folded from the deltas."""
    for i, (prompt, params) in enumerate(work):
        engine.add_request(f"w-{i}", prompt, params)
    tokens, logprobs, done, step = {}, {}, {}, 0
    while engine.has_unfinished_requests():
        if abort_at is not None and abort_at[1] == step:
            engine.abort_request(f"w-{abort_at[0]}")
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.logprobs is not None:
                logprobs.setdefault(d.request_id, []).extend(d.logprobs)
            if d.is_final:
                f = d.finished
                done[d.request_id] = (tokens[d.request_id], logprobs.get(d.request_id), f.prompt_logprobs,
                                      f.finish_reason)  # fmt: skip
        step += 1
        assert step < 1000
    assert engine.num_free_blocks() == engine.num_total_blocks
    return done


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31), st.integers(-1, 5))
def test_async_scheduling_matches_sync(small_llm, small_llm_sync, seed, abort_step):
    """Async scheduling (the next step enqueued before the last one's tokens are read, its tokens fed
    on the device) gives exactly the tokens, logprobs and finish reasons of the synchronous loop:
    seeded sampling, stop tokens hit at random, length limits, prefix sharing, chunked prefill, and
    preemption (10 blocks of 4 tokens overflow)."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(2, 90, size=8).tolist()
    work = []
    for i in range(5):
        prompt = (shared if i % 2 else []) + rng.integers(2, 90, size=int(rng.integers(1, 14))).tolist()
        params = SamplingParams(
            max_tokens=int(rng.integers(1, 9)),
            temperature=float(rng.choice([0.0, 1.0])),
            seed=int(rng.integers(0, 1000)),
            stop_token_ids=rng.integers(2, 90, size=6).tolist(),
            logprobs=2 if i == 1 else None,
            prompt_logprobs=i == 2,
        )
        work.append((prompt, params))
    abort_at = None if abort_step < 0 else (int(rng.integers(0, 5)), abort_step)
    results = {}
    for mode, llm in ((False, small_llm_sync), (True, small_llm)):
        llm.engine.block_manager.reset_prefix_cache()
        results[mode] = _run_engine(llm.engine, work, abort_at)
    if abort_at is not None:  # the abort lands at a different point of its generation in each mode
        for mode in results:
            assert results[mode].pop(f"w-{abort_at[0]}")[3] in ("abort", "stop", "length")
    assert results[True].keys() == results[False].keys()
    for rid, (tokens, logprobs, prompt_lp, reason) in results[True].items():
        want_tokens, want_lp, want_prompt_lp, want_reason = results[False][rid]
        assert (tokens, reason) == (want_tokens, want_reason), rid
        # Batches differ between the modes (so do padded shapes and float sums): logprobs to 1e-5.
        if logprobs is not None:
            assert [sorted(d) for d in logprobs] == [sorted(d) for d in want_lp]
            for d, w in zip(logprobs, want_lp):
                np.testing.assert_allclose([d[k] for k in sorted(d)], [w[k] for k in sorted(w)], rtol=1e-5)
        if prompt_lp is not None:
            np.testing.assert_allclose(
                np.array(prompt_lp[1:], float), np.array(want_prompt_lp[1:], float), rtol=1e-5, atol=1e-5
            )


def test_blocks_of_a_finished_request_are_reused(any_llm):
    """A request that ends at its first token still publishes its prompt's full blocks (async
    scheduling reads its step back one call later; the blocks are published just before its token
    ends the request)."""
    any_llm.engine.block_manager.reset_prefix_cache()
    prompt = list(range(40, 53))  # 13 tokens: 3 full blocks of 4
    any_llm.generate([prompt], SamplingParams(max_tokens=1))
    (out,) = any_llm.generate([prompt + [7]], SamplingParams(max_tokens=1))
    assert out.num_cached_tokens == 12


def test_queued_step_accessor(small_llm, small_llm_sync):
    """`StepPipeline.queued` shows the step left on the device (async mode only): its id is the one the
    requests' pending tokens name, and its device tokens are the ones the next read hands out."""
    engine = small_llm.engine
    assert engine.pipeline.queued is None
    engine.add_request("q-0", [3, 4, 5], SamplingParams(max_tokens=3))
    assert engine.step() == []  # the first step is queued, nothing read back yet
    queued = engine.pipeline.queued
    assert queued is not None and isinstance(queued.step_id, int)
    assert engine.requests["q-0"].pending == [(queued.step_id, 0)]
    assert queued.tokens.shape == (engine.config.max_num_seqs,)
    want = int(np.asarray(queued.tokens)[0])
    (delta,) = engine.step()  # reads the queued step back (and queues the next)
    assert delta.token_ids == [want]
    assert engine.pipeline.queued.step_id > queued.step_id
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.pipeline.queued is None

    sync = small_llm_sync.engine
    sync.add_request("q-1", [3, 4, 5], SamplingParams(max_tokens=2))
    while sync.has_unfinished_requests():
        sync.step()
        assert sync.pipeline.queued is None
