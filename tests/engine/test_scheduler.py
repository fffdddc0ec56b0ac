"""Allocator and scheduler behaviour: blocks always come back, preemption keeps outputs exact."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jalora import LLM, SamplingParams
from jalora.engine.block_manager import BlockManager
from jalora.engine.request import Request


def make_request(rid, ids, max_tokens=4):
    return Request(str(rid), None, ids, SamplingParams(max_tokens=max_tokens), 0, ())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_block_manager_refcounts_return_to_total(ops):
    """Allocate, share prefixes, register and release in any order: every block comes back."""
    bm = BlockManager(num_blocks=24, block_size=4)
    live = []
    for i, (n, prefix_kind, release_early) in enumerate(ops):
        ids = [prefix_kind] * n  # equal token runs make prefixes shared between requests
        req = make_request(i, ids)
        cached = bm.lookup(req)
        assert cached % 4 == 0 and cached <= n - 1
        if not bm.allocate(req, n):
            bm.release(req)
            continue
        req.num_computed_tokens = n
        bm.register(req)
        live.append(req)
        if release_early:
            bm.release(live.pop(0))
        held = {b for r in live for b in r.block_ids}
        assert bm.num_free_blocks() == 24 - len(held)
    for req in live:
        bm.release(req)
    assert bm.num_free_blocks() == 24
    assert all(c == 0 for c in bm.ref_count)


def test_blocks_holding_nothing_findable_are_evicted_before_cached_prefixes():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3])  # one full block (cached) + a partial one (nothing to find)
    assert bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.register(a)
    bm.release(a)
    c = make_request("c", [7, 8, 9])
    assert bm.lookup(c) == 0 and bm.allocate(c, 3)
    c.num_computed_tokens = 3
    bm.register(c)
    bm.release(c)
    d = make_request("d", [4, 5, 6, 7])  # needs two blocks: must take the two partial ones
    assert bm.lookup(d) == 0 and bm.allocate(d, 4)
    bm.release(d)
    again = make_request("a2", [1, 2, 3])
    assert bm.lookup(again) == 2  # a's prefix survived
    bm.release(again)


@pytest.fixture(autouse=True)
def _async_scheduling_restored(request):
    """Tests that switch the shared engine to synchronous mode get async scheduling back, even on failure."""
    yield
    if "small_llm" in request.fixturenames:
        request.getfixturevalue("small_llm").engine.async_scheduling = True


@pytest.fixture(scope="module")
def small_llm(tiny_models):
    # 10 blocks of 4 tokens: a few requests of ~20 tokens overflow it and force preemption.
    return LLM(
        tiny_models["llama"], block_size=4, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=32, warmup=False
    )


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


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("where", ["dispatch", "fetch"])
def test_interrupted_generate_frees_everything(small_llm, where, async_scheduling):
    """Ctrl-C while a step is enqueued or read back (with another step still queued, in async mode):
    the call's requests end, every block comes back, and the engine keeps working."""
    engine = small_llm.engine
    engine.async_scheduling = async_scheduling
    real = getattr(engine.runner, where)
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    setattr(engine.runner, where, flaky)
    try:
        with pytest.raises(KeyboardInterrupt):
            small_llm.generate([[3, 4, 5], [6, 7]], SamplingParams(max_tokens=5))
    finally:
        setattr(engine.runner, where, real)
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_total_blocks
    (out,) = small_llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2))
    assert len(out.token_ids) == 2
    engine.async_scheduling = True


@pytest.mark.parametrize("failure", ["donated", "read_back"])
def test_step_failing_on_the_device_recovers(small_llm, failure):
    """A device error inside the step loses the donated KV cache ("donated"), or surfaces only when a
    step's results are read back, with the next step already queued on that cache ("read_back"): the
    engine rebuilds the cache, forgets the prefix cache, recomputes the running requests, and their
    outputs stay exact."""
    engine = small_llm.engine
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = small_llm.generate(prompts, params)
    for i, p in enumerate(prompts):
        engine.add_request(f"crash-{i}", p, params)
    engine.step()  # both prefilled (and, with async scheduling, still queued)
    engine.step()
    if failure == "donated":
        real, name = engine.runner._step, "_step"

        def failing(state, kv_caches, *args, **kwargs):
            for k, v in kv_caches:  # what donation into a failing device computation leaves behind
                k.delete()
                v.delete()
            raise RuntimeError("device error")
    else:
        real, name = engine.runner.fetch, "fetch"

        def failing(out):
            raise RuntimeError("device error")

    caches = engine.runner.kv_caches
    setattr(engine.runner, name, failing)
    try:
        with pytest.raises(RuntimeError, match="device error"):
            engine.step()
    finally:
        setattr(engine.runner, name, real)
    assert engine.block_manager.num_cached_blocks() == 0
    assert engine.runner.kv_caches is not caches  # rebuilt, not trusted
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[f"crash-{i}"] for i in range(2)] == [w.token_ids for w in want]
    assert engine.num_free_blocks() == engine.num_total_blocks


def test_outputs_of_a_half_read_step_are_kept(small_llm):
    """An error while a step's results are applied (here the second request's token) still delivers
    the first request's final output, on the next step() call."""
    engine = small_llm.engine
    engine.add_request("short", [3, 4, 5], SamplingParams(max_tokens=1))
    engine.add_request("long", [6, 7, 8], SamplingParams(max_tokens=4))
    real = engine._append_token
    calls = {"n": 0}

    def flaky(req, *args):
        calls["n"] += 1
        if req.request_id == "long" and calls["n"] == 2:
            raise ValueError("tokenizer broke")
        return real(req, *args)

    engine._append_token = flaky
    finished = {}
    try:
        with pytest.raises(ValueError, match="tokenizer broke"):
            for _ in range(3):
                finished |= {o.request_id: o for o in engine.step() if o.finished}
    finally:
        engine._append_token = real
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert finished["short"].token_ids and finished["short"].finish_reason == "length"
    assert len(finished["long"].token_ids) == 4
    assert engine.num_free_blocks() == engine.num_total_blocks


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
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert step < 500
    assert finished == {f"mix-{i}" for i in range(len(reqs))}
    assert engine.num_free_blocks() == engine.num_total_blocks
    assert not engine.requests


def _run_engine(engine, work, abort_at=None):
    """Adds `work` [(prompt, params)], steps to completion (aborting request `abort_at` = (index, step)),
    returns {request id: (token ids, logprobs, prompt logprobs, finish reason)}."""
    for i, (prompt, params) in enumerate(work):
        engine.add_request(f"w-{i}", prompt, params)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if abort_at is not None and abort_at[1] == step:
            engine.abort_request(f"w-{abort_at[0]}")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.logprobs, out.prompt_logprobs, out.finish_reason)
        step += 1
        assert step < 1000
    assert engine.num_free_blocks() == engine.num_total_blocks
    return done


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 2**31), st.integers(-1, 5))
def test_async_scheduling_matches_sync(small_llm, seed, abort_step):
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
    engine = small_llm.engine
    results = {}
    for mode in (False, True):
        engine.async_scheduling = mode
        engine.block_manager.reset_prefix_cache()
        results[mode] = _run_engine(engine, work, abort_at)
    engine.async_scheduling = True
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


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_blocks_of_a_finished_request_are_reused(small_llm, async_scheduling):
    """A request that ends at its first token still publishes its prompt's full blocks (async
    scheduling reads its step back one call later; the blocks are published just before its token
    ends the request)."""
    engine = small_llm.engine
    engine.async_scheduling = async_scheduling
    engine.block_manager.reset_prefix_cache()
    prompt = list(range(40, 53))  # 13 tokens: 3 full blocks of 4
    small_llm.generate([prompt], SamplingParams(max_tokens=1))
    (out,) = small_llm.generate([prompt + [7]], SamplingParams(max_tokens=1))
    engine.async_scheduling = True
    assert out.num_cached_tokens == 12
