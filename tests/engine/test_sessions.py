"""Pipeline sessions (jalora/engine/sessions.py): retained blocks survive pressure, outputs never change,
sessions end by TTL (an injected clock), by a call or by end_session, and bad input changes nothing."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jalora import LLM, InvalidRequestError, SamplingParams, SessionNotFoundError
from jalora.engine.request import Status
from tests import hf_models

INV = [7, 8, 9]
B = 4  # block size: 10 blocks of 4 tokens, sessions may retain 5


def ctx(n: int, seed: int) -> list[int]:
    """n random tokens without the invocation (ids 13..95)."""
    return np.random.default_rng(seed).integers(13, hf_models.VOCAB - 1, size=n).tolist()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    base = tiny_models["llama"]
    judge = hf_models.make_adapter(base, str(tmp_path_factory.mktemp("judge") / "j"), ["q_proj", "v_proj"], r=4,
                                   invocation=INV, seed=5)  # fmt: skip
    clock = Clock()
    llm = LLM(base, clock=clock, block_size=B, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=32,
              max_loras=1, max_lora_rank=4, session_cache_share=0.5, warmup=False)  # fmt: skip
    llm.load_adapter("judge", judge)
    return llm, clock


def clean(eng) -> None:
    """No request, no session, nothing held, an empty prefix cache (each test, each hypothesis example)."""
    for rid in list(eng.requests):
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()
    for sid in list(eng.sessions.live):
        eng.end_session(sid)
    eng.block_manager.reset_prefix_cache()


@pytest.fixture
def llm(setup):
    """The shared engine, clean."""
    llm, clock = setup
    eng = llm.engine
    clean(eng)
    yield llm
    assert eng.num_free_blocks() + eng.stats().num_retained_blocks == eng.num_total_blocks


def gen(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run_pipelines(engine, pipelines, sessions: bool) -> list[tuple[list[int], list[int]]]:
    """Every pipeline at once: its base answers, then its aLoRA judge reads prompt + answer + invocation.
    With `sessions`, each pipeline names its own session (the judge ends it when `end` says so)."""
    outs: dict[str, list[int]] = {}
    for i, (prompt, base_n, _, _) in enumerate(pipelines):
        kw = dict(session=f"p{i}", session_ttl=30) if sessions else {}
        engine.add_request(f"b{i}", prompt, gen(base_n), None, **kw)
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
            if d.is_final and d.request_id.startswith("b"):
                i = int(d.request_id[1:])
                prompt, _, judge_n, end = pipelines[i]
                kw = dict(session=f"p{i}", end_session=end) if sessions else {}
                engine.add_request(f"j{i}", prompt + outs[d.request_id] + INV, gen(judge_n), "judge", **kw)
    return [(outs[f"b{i}"], outs[f"j{i}"]) for i in range(len(pipelines))]


# Four pipelines of 8-token contexts over three shared ones, the last judge ending its session: on the 10-block
# cache, sessions are evicted and reclaimed (a deterministic workload on a deterministic engine).
PRESSURE = [(0, 8, 6, 4, False), (1, 8, 6, 4, False), (2, 8, 6, 4, False), (0, 8, 6, 4, True)]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        # shared context, its length, base tokens, judge tokens, whether the judge ends the session: at most
        # 5 blocks per session (10 + 2 + 6 -> 3 retained, then the judge's 21 + 4 -> 2 more)
        st.tuples(st.integers(0, 2), st.integers(1, 8), st.integers(1, 6), st.integers(1, 4), st.booleans()),
        min_size=1,
        max_size=4,
    )
)
@example(PRESSURE)
def test_outputs_identical_with_sessions_on_and_off(llm, workload):
    """The same engine runs a random workload of pipelines without sessions (the oracle), then with one
    session per pipeline over a cache small enough that sessions are evicted and reclaimed (certainly in the
    explicit example, PRESSURE)."""
    eng = llm.engine
    clean(eng)
    before = dataclasses.replace(eng.sessions.counters)
    pipelines = [(ctx(n, 100 + shared) + ctx(2, 200 + i), bn, jn, end)
                 for i, (shared, n, bn, jn, end) in enumerate(workload)]  # fmt: skip
    want = run_pipelines(eng, pipelines, sessions=False)
    eng.block_manager.reset_prefix_cache()
    got = run_pipelines(eng, pipelines, sessions=True)
    assert got == want
    if workload == PRESSURE:
        counters = eng.sessions.counters
        assert counters.evicted > before.evicted and counters.reclaimed > before.reclaimed, (before, counters)
    for i, p in enumerate(pipelines):  # a judge that ended its session left nothing live
        assert (f"p{i}" in eng.sessions.live) <= (not p[3])
    for sid in list(eng.sessions.live):
        eng.end_session(sid)
    assert eng.stats().num_retained_blocks == 0 and eng.num_free_blocks() == eng.num_total_blocks


def _pressure(llm, session: str | None) -> int:
    """Base answer (in `session`), then two requests of 7 blocks each that evict the least recently used
    free blocks, then the aLoRA judge of the answer; returns the judge's cached tokens."""
    prompt = ctx(11, 7)
    kw = {"session": session} if session else {}
    (base,) = llm.generate(prompt, gen(5), **kw)
    for seed in (8, 9):
        llm.generate(ctx(26, seed), gen(2))
    (judge,) = llm.generate(prompt + base.token_ids + INV, gen(2), adapter="judge", **kw)
    return judge.num_cached_tokens


def test_retained_blocks_survive_pressure(llm):
    full = (11 + 5 - 1) // B * B  # every full block the base computed (its last token's KV never is)
    assert _pressure(llm, "s") == full == 12
    assert llm.engine.stats().num_retained_blocks >= 3  # the judge's blocks joined the session
    llm.end_session("s")
    llm.engine.block_manager.reset_prefix_cache()
    assert _pressure(llm, None) < full


def test_ttl_counts_from_the_last_request_and_uses_the_engine_clock(llm, setup):
    clock = setup[1]
    eng = llm.engine
    eng.add_request("r", ctx(9, 3), gen(6), session="t", session_ttl=5)
    clock.t += 100  # far past the TTL, but a session with an unfinished request never expires
    eng.step()
    assert "t" in eng.sessions.live
    while eng.has_unfinished_requests():
        eng.step()
    retained = eng.stats().num_retained_blocks
    assert retained == (9 + 6 - 1) // B and eng.stats().num_sessions == 1
    expired = eng.stats().sessions_expired
    clock.t += 4.5
    ended, wait = eng.expire_sessions()
    assert ended == 0 and wait == pytest.approx(0.5)
    assert eng.stats().num_sessions == 1
    clock.t += 0.5
    assert eng.expire_sessions() == (1, None)
    s = eng.stats()
    assert s.num_sessions == 0 and s.num_retained_blocks == 0 and s.sessions_expired == expired + 1
    assert eng.num_free_blocks() == eng.num_total_blocks


def test_end_session_by_call_and_by_request(llm):
    eng = llm.engine
    llm.generate(ctx(9, 4), gen(4), session="a")
    assert eng.stats().num_retained_blocks == 3
    llm.end_session("a")
    assert eng.stats().num_retained_blocks == 0 and eng.num_free_blocks() == eng.num_total_blocks
    with pytest.raises(SessionNotFoundError) as e:
        llm.end_session("a")
    assert e.value.field == "session"
    (o,) = llm.generate(ctx(9, 4), gen(4), session="b")
    assert o.num_cached_tokens == 8  # session a's blocks stayed findable after it ended
    llm.generate(ctx(9, 4) + o.token_ids + INV, gen(2), adapter="judge", session="b", end_session=True)
    assert eng.stats().num_sessions == 0 and eng.stats().num_retained_blocks == 0


def test_sessions_over_the_share_end_oldest_first_and_yield_to_a_stalled_request(llm):
    eng = llm.engine
    evicted = eng.stats().sessions_evicted
    llm.generate(ctx(9, 5), gen(6), session="old")  # 3 blocks
    llm.generate(ctx(9, 6), gen(6), session="new")  # 3 more: over the 5 of the share
    assert list(eng.sessions.live) == ["new"] and eng.stats().num_retained_blocks == 3
    assert eng.stats().sessions_evicted == evicted + 1
    # 7 blocks are free, a lone request needs 9: the session lets its blocks go rather than stall.
    (o,) = llm.generate(ctx(33, 7), gen(3))
    assert len(o.token_ids) == 3 and eng.stats().num_sessions == 0


def test_a_lone_chunked_prefill_reclaims_rather_than_preempt_itself(llm):
    """8 blocks are free beside the session's 2, a lone request needs 9: its first chunk (32 tokens, 8 blocks)
    fits, its second does not. It used to preempt itself there and be admitted again from its own cached prefix,
    forever (11,033 preemptions in 5 s until the session's TTL ended it; the session's next request, queued
    behind it, kept the TTL from ever ending it here). Now the session lets its blocks go, within a few steps."""
    eng = llm.engine
    llm.generate(ctx(6, 8), gen(4), session="held")  # 9 tokens of KV: 2 full blocks retained
    assert eng.stats().num_retained_blocks == 2 and eng.num_free_blocks() == 8
    preemptions = eng.scheduler.num_preemptions
    eng.add_request("long", ctx(36, 9), gen(2))
    eng.step()  # the first chunk
    eng.add_request("next", ctx(6, 8) + [40], gen(2), session="held")  # the session's next request waits
    finished = set()
    for _ in range(12):  # (a bound: without the reclaim this loop never ends)
        finished |= {d.request_id for d in eng.step() if d.is_final}
        if not eng.has_unfinished_requests():
            break
    assert finished == {"long", "next"}
    assert eng.scheduler.num_preemptions == preemptions and eng.stats().sessions_evicted >= 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(session="s", session_ttl=0), "session_ttl"),
        (dict(session="s", session_ttl=-1.0), "session_ttl"),
        (dict(session="s", session_ttl=math.nan), "session_ttl"),
        (dict(session="s", session_ttl=math.inf), "session_ttl"),
        (dict(session="s", session_ttl=3600.5), "session_ttl"),  # over max_session_ttl
        (dict(session="s", session_ttl=True), "session_ttl"),
        (dict(session_ttl=5), "session_ttl"),
        (dict(end_session=True), "end_session"),
        (dict(session=""), "session"),
        (dict(session="x" * 257), "session"),
        (dict(session=7), "session"),
    ],
)
def test_bad_session_fields_are_refused_and_change_nothing(llm, kwargs, field):
    eng = llm.engine
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(ctx(5, 1), gen(2), **kwargs)
    assert e.value.field == field
    assert not eng.has_unfinished_requests() and eng.stats().num_sessions == 0
    assert eng.num_free_blocks() == eng.num_total_blocks


def test_a_session_that_would_retain_more_than_its_share_is_refused(llm):
    eng = llm.engine
    llm.generate(ctx(9, 2), gen(6), session="big")  # 3 blocks retained
    before = eng.stats()
    with pytest.raises(InvalidRequestError, match="session_cache_share") as e:
        llm.generate(ctx(7, 3), gen(6), session="big")  # 3 more could exceed the 5 of the share
    assert e.value.field == "session"
    after = eng.stats()
    assert (after.num_retained_blocks, after.num_sessions) == (before.num_retained_blocks, before.num_sessions)
    assert eng.sessions.live["big"].unfinished == 0 and eng.sessions.live["big"].reserved == 0
    assert not eng.has_unfinished_requests() and eng.num_free_blocks() == eng.num_total_blocks - 3
    llm.end_session("big")
    assert eng.num_free_blocks() == eng.num_total_blocks


def test_sessions_off(tiny_models):
    llm = LLM(tiny_models["llama"], block_size=B, num_kv_blocks=8, max_num_seqs=2, session_cache_share=0,
              warmup=False)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="sessions are off") as e:
        llm.generate(ctx(5, 1), gen(2), session="s")
    assert e.value.field == "session" and llm.engine.num_free_blocks() == 8


def test_a_continuation_preempts_new_work_rather_than_wait(llm):
    """The judge of a session whose blocks are retained finds no free block for the rest of its prompt:
    the running request that continues no session is preempted for it (and recomputed later)."""
    eng = llm.engine
    prompt = ctx(9, 11)
    (base,) = llm.generate(prompt, gen(6), session="a")  # 3 blocks retained
    eng.add_request("other", ctx(20, 12), gen(8))
    while eng.num_free_blocks() > 0:  # it takes every free block (7) as it decodes
        eng.step()
    preemptions = eng.stats().num_preemptions
    assert eng.requests["other"].status is Status.RUNNING
    eng.add_request("judge", prompt + base.token_ids + INV, gen(2), "judge", session="a", end_session=True)
    eng.step()
    assert eng.requests["judge"].status is Status.RUNNING and eng.requests["other"].status is Status.WAITING
    assert eng.stats().num_preemptions == preemptions + 1
    done = {}
    while eng.has_unfinished_requests():
        for d in eng.step():
            if d.is_final:
                done[d.request_id] = d.finished
    assert done["judge"].num_cached_tokens == 12 and done["other"].num_output_tokens == 8
