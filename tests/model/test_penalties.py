"""Presence, frequency and repetition penalties, and vLLM's allowed_token_ids (a flag in the same rows): the logits
adjustment against numpy and transformers, and the
engine's generations against transformers' greedy loop with the same penalties (transformers'
RepetitionPenaltyLogitsProcessor, and OpenAI's formula for presence and frequency), through the device table of
token counts: batches mixing penalties, more penalized requests than slots, preemption, chunked prefill, and a
row rebuilt while a token is pending on the device."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from jalora import LLM, SamplingParams
from jalora.engine.penalties import counts_row
from jalora.model.sampler import DISALLOWED_FLAG, PROMPT_FLAG, apply_penalties
from tests import hf_models


def test_a_finished_requests_slot_goes_before_a_live_ones():
    """Slots go to a new request from the free ones first, then the finished requests', then the least recently used
    live one that is not in the step; the request whose slot is taken has its row written again next time."""
    from jalora.engine.penalties import PenaltySlots
    from jalora.engine.request import Request, Status

    slots = PenaltySlots(2, vocab_size=8)
    params = SamplingParams(presence_penalty=1.0)
    live, done, new = (Request(name, [1, 2], params, seed=0) for name in ("live", "done", "new"))
    writes = []
    assert slots.slot(live, {id(live)}, writes) == 0 and slots.slot(done, {id(done)}, writes) == 1
    done.status = Status.FINISHED
    assert slots.slot(new, {id(new)}, writes) == 1  # (the finished one's, though it was used last)
    assert len(writes) == 3
    assert slots.slot(live, {id(live)}, writes) == 0 and len(writes) == 3  # (kept: no write)


def test_apply_penalties_matches_the_definitions():
    """Against numpy for presence and frequency (OpenAI's formula over the output's counts) and transformers'
    processor for repetition (over prompt and output tokens), on logits of both signs; a row with every penalty
    off is unchanged."""
    rng = np.random.default_rng(0)
    v, rows = 40, 4
    logits = rng.normal(0, 3, (rows, v)).astype(np.float32)
    prompts = [rng.integers(0, v, 6).tolist() for _ in range(rows)]
    outputs = [rng.integers(0, v, 9).tolist() for _ in range(rows)]
    table = np.stack([counts_row(p, o, v) for p, o in zip(prompts, outputs)])
    presence = np.array([0.0, 1.5, -0.5, 0.7], np.float32)
    frequency = np.array([0.0, 0.0, 0.8, -1.2], np.float32)
    repetition = np.array([1.0, 1.3, 0.6, 1.8], np.float32)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(table), jnp.asarray(presence),
                                     jnp.asarray(frequency), jnp.asarray(repetition)))  # fmt: skip
    np.testing.assert_array_equal(got[0], logits[0])
    for i in range(rows):
        seq = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(float(repetition[i]))(seq, torch.tensor(logits[i : i + 1]))[0].numpy()
        counts = np.bincount(outputs[i], minlength=v)
        want = want - frequency[i] * counts - presence[i] * (counts > 0)
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-5)


def test_counts_row_counts_output_tokens_and_flags_the_prompts():
    row = counts_row([5, 5, 2], [2, 7, 7, 7], 10)
    assert row.tolist() == [0, 0, 1 + PROMPT_FLAG, 0, 0, PROMPT_FLAG, 0, 3, 0, 0]
    row = counts_row([5, 5, 2], [2, 7, 7, 7], 10, allowed_token_ids=[7, 1])
    d = DISALLOWED_FLAG
    assert row.tolist() == [d, 0, 1 + PROMPT_FLAG + d, d, d, PROMPT_FLAG + d, d, 3, d, d]


def test_disallowed_tokens_are_masked_and_the_rest_penalized_as_without_the_flag():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 12)).astype(np.float32)
    rows = [counts_row([1, 2], [3, 3, 4], 12), counts_row([1, 2], [3, 3, 4], 12, allowed_token_ids=[2, 3, 5, 9])]
    args = [jnp.asarray(a, jnp.float32) for a in ([0.5, 0.5], [0.3, 0.3], [1.4, 1.4])]
    plain, masked = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(np.stack(rows)), *args))
    want = apply_penalties(jnp.asarray(logits[1:]), jnp.asarray(rows[0][None]), *[a[:1] for a in args])[0]
    allowed = np.zeros(12, bool)
    allowed[[2, 3, 5, 9]] = True
    np.testing.assert_array_equal(masked[allowed], np.asarray(want)[allowed])
    assert np.all(masked[~allowed] == -np.inf)


def oracle_greedy(oracle, prompt, n, repetition=1.0, presence=0.0, frequency=0.0, bias=None, count_last=True):
    """transformers' greedy loop with the penalties (and a logit_bias first, vLLM's order), and no end-of-sequence
    stop (the engine's ignore_eos). `count_last` False: presence and frequency miss the newest token (a row
    written without the token pending on the device)."""
    seq, out = list(prompt), []
    rep = RepetitionPenaltyLogitsProcessor(repetition)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq])
            scores = oracle(ids).logits[:, -1].float()
            for t, b in (bias or {}).items():
                scores[0, t] += b
            scores = rep(ids, scores)[0]
            counted = out if count_last else out[:-1]
            counts = torch.bincount(torch.tensor(counted, dtype=torch.long), minlength=scores.shape[0]).float()
            scores = scores - frequency * counts - presence * (counts > 0).float()
            out.append(int(torch.argmax(scores)))
            seq.append(out[-1])
    return out


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return np.random.default_rng(n * 7 + salt).integers(2, hf_models.VOCAB - 1, size=n).tolist()


CASES = [
    dict(repetition=1.5),
    dict(repetition=0.7),
    dict(presence=1.5),
    dict(frequency=0.8),
    dict(repetition=1.3, presence=0.5, frequency=0.3),
    dict(presence=-1.0, frequency=-0.4),
]


def params_of(case: dict, n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=case.get("repetition", 1.0),
                          presence_penalty=case.get("presence", 0.0), frequency_penalty=case.get("frequency", 0.0),
                          **kw)  # fmt: skip


@pytest.fixture(scope="module")
def oracle(tiny_models):
    return hf_models.load_oracle(tiny_models["llama"])


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalized_greedy_generations_match_transformers(tiny_models, oracle, async_scheduling):
    """Every case in one batch beside an unpenalized request, and with a logit_bias on one: each request's tokens
    are transformers' with its own penalties, and the plain one keeps its own; the penalties change every case's
    tokens from the plain ones (so the check can fail). The logprobs stay the model's own, as vLLM's."""
    n, prompt = 20, prompt_of(12)
    plain = oracle_greedy(oracle, prompt, n)
    wants = [oracle_greedy(oracle, prompt, n, **case) for case in CASES]
    assert all(w != plain for w in wants)
    bias = {plain[0]: -5.0}
    biased = oracle_greedy(oracle, prompt, n, bias=bias, **CASES[4])
    llm = LLM(tiny_models["llama"], num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, warmup=False,
              async_scheduling=async_scheduling)  # fmt: skip
    params = [params_of(c, n) for c in CASES] + [SamplingParams(max_tokens=n, ignore_eos=True)]
    params.append(params_of(CASES[4], n, logit_bias=bias, logprobs=0))
    outs = llm.generate([prompt] * len(params), params)
    assert [o.token_ids for o in outs] == [*wants, plain, biased]
    with torch.no_grad():
        all_lp = torch.log_softmax(oracle(torch.tensor([prompt + biased])).logits[0, len(prompt) - 1 : -1], -1)
    want_lp = all_lp[torch.arange(n), torch.tensor(biased)].numpy()
    got_lp = [lp[t] for lp, t in zip(outs[-1].logprobs, biased)]
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)


def test_penalties_hold_over_slots_preemption_and_chunks(tiny_models, oracle):
    """More penalized requests than slots (max_num_seqs 2: rows are taken over as requests finish), prompts
    prefilled in several chunks (their chunks count no token), and a cache so small that requests are preempted and
    recomputed: every request still gets transformers' tokens."""
    llm = LLM(tiny_models["llama"], num_kv_blocks=7, max_num_seqs=2, max_num_batched_tokens=16, warmup=False)
    prompts = [prompt_of(20 + 9 * i, salt=i) for i in range(5)]
    cases = [CASES[i % len(CASES)] for i in range(5)]
    outs = llm.generate(prompts, [params_of(c, 24) for c in cases])
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [oracle_greedy(oracle, p, 24, **c) for p, c in zip(prompts, cases)]


def test_a_row_rebuilt_with_a_token_pending_on_the_device(tiny_models, oracle):
    """Async scheduling: when the host's book of the table is dropped (as after a failed launch) while a
    request's token is still on the device, its row is written again from the host's tokens with the pending one
    added on the device, and the generation goes on as transformers'. Dropped before every step here, on a prompt
    where rows missing the pending token would change the tokens."""
    llm = LLM(tiny_models["llama"], num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64, warmup=False)
    engine, prompt, case = llm.engine, prompt_of(10, 0), dict(presence=1.0, frequency=0.5)
    want = oracle_greedy(oracle, prompt, 16, **case)
    assert oracle_greedy(oracle, prompt, 16, count_last=False, **case) != want
    engine.add_request("r", prompt, params_of(case, 16))
    tokens, forgot = [], 0
    while engine.has_unfinished_requests():
        if engine.requests["r"].pending:
            engine.runner.penalty_slots.forget()
            forgot += 1
        for d in engine.step():
            tokens += d.token_ids
    assert forgot >= 14
    assert tokens == want


def test_a_row_write_adds_the_pending_token_on_the_device(tiny_models):
    """The table's row write: the host's row, plus one for the previous step's token of the given row (none for
    -1)."""
    runner = LLM(tiny_models["llama"], num_kv_blocks=8, max_num_seqs=4, warmup=False).engine.runner
    v = runner.cfg.vocab_size
    prev = jnp.asarray(np.array([7, 11, 13, 17], np.int32))
    row = counts_row([2, 3], [11, 11, 5], v)
    counts = runner._write_row(runner.penalty_counts, np.int32(2), row, prev, np.int32(1))
    counts = runner._write_row(counts, np.int32(0), row, prev, np.int32(-1))
    want = np.zeros((4, v), np.int32)
    want[0], want[2] = row, row
    want[2, 11] += 1
    np.testing.assert_array_equal(np.asarray(counts), want)


def test_seeded_penalized_draws_reproduce_alone_and_batched(tiny_models):
    """A sampled request with penalties draws the same tokens alone and beside others (its row is its own), and
    differs from the same request without them."""
    llm = LLM(tiny_models["llama"], num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
    strong = dict(repetition=1.8, presence=2.0, frequency=1.0)
    p = params_of(strong, 16, temperature=1.5, seed=7)
    (alone,) = llm.generate([prompt_of(9)], p)
    outs = llm.generate([prompt_of(4, 1), prompt_of(9), prompt_of(30, 2)],
                        [params_of(CASES[0], 6, temperature=1.0), p, SamplingParams(max_tokens=5)])  # fmt: skip
    assert outs[1].token_ids == alone.token_ids
    (unpenalized,) = llm.generate([prompt_of(9)], SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.5,
                                                                 seed=7))  # fmt: skip
    assert unpenalized.token_ids != alone.token_ids


def test_allowed_token_ids_match_transformers_restricted_to_them(tiny_models, oracle):
    """vLLM's allowed_token_ids: greedy, the most likely of the allowed tokens at every step (transformers' logits
    restricted to them), with penalties too, beside an unrestricted request; sampled, only allowed tokens. End of
    sequence is not among them here, so only the length ends the request."""
    prompt, allowed = prompt_of(11), [3, 17, 29, 41, 55, 80]
    want, seq = [], list(prompt)
    with torch.no_grad():
        for _ in range(10):
            logits = oracle(torch.tensor([seq])).logits[0, -1]
            want.append(allowed[int(torch.argmax(logits[allowed]))])
            seq.append(want[-1])
    llm = LLM(tiny_models["llama"], num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
    params = [SamplingParams(max_tokens=10, allowed_token_ids=allowed, logprobs=0),
              SamplingParams(max_tokens=10, ignore_eos=True),
              params_of(CASES[4], 10, allowed_token_ids=allowed),
              SamplingParams(max_tokens=30, temperature=1.0, seed=2, allowed_token_ids=allowed)]  # fmt: skip
    restricted, plain, penalized, sampled = llm.generate([prompt] * 4, params)
    assert restricted.token_ids == want and restricted.finish_reason == "length"
    assert plain.token_ids == oracle_greedy(oracle, prompt, 10) != want
    assert set(penalized.token_ids) <= set(allowed) and penalized.token_ids != want
    assert set(sampled.token_ids) <= set(allowed) and len(set(sampled.token_ids)) > 1
    with torch.no_grad():  # the logprobs stay the model's own (unrestricted), as vLLM's
        all_lp = torch.log_softmax(oracle(torch.tensor([prompt + want])).logits[0, len(prompt) - 1 : -1], -1)
    got = [lp[t] for lp, t in zip(restricted.logprobs, want)]
    np.testing.assert_allclose(got, all_lp[torch.arange(10), torch.tensor(want)].numpy(), atol=1e-4)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_launch_that_fails_before_its_draw_leaves_no_stale_row(tiny_models, oracle, monkeypatch, async_scheduling):
    """A step that fails on its way to the draw (here in the step itself) wrote none of the rows its prepare
    queued: a request that took another's slot in a prefill chunk (which counts no token) gets its row written
    when the chunk is run again, not the previous owner's counts."""
    llm = LLM(tiny_models["llama"], num_kv_blocks=32, max_num_seqs=1, max_num_batched_tokens=16, warmup=False,
              async_scheduling=async_scheduling)  # fmt: skip
    engine, case = llm.engine, CASES[4]
    first, second = prompt_of(9, 3), prompt_of(40, 4)
    (out,) = llm.generate([first], params_of(case, 12))  # its counts fill the only row
    assert out.token_ids == oracle_greedy(oracle, first, 12, **case)
    real, calls = engine.runner._launch_step, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:  # the second request's first chunk
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(engine.runner, "_launch_step", flaky)
    engine.add_request("r", second, params_of(case, 12))
    tokens, failed = [], 0
    while engine.has_unfinished_requests():
        try:
            deltas = engine.step()
        except RuntimeError:
            failed += 1
            continue
        for d in deltas:
            tokens += d.token_ids
    assert failed == 1
    assert tokens == oracle_greedy(oracle, second, 12, **case)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_step_failing_on_the_device_resets_the_counts_table(tiny_models, oracle, monkeypatch, async_scheduling):
    """A step that fails on the device surfaces when it is read back; the counts table it wrote (its draw's output)
    is as lost as the KV cache (simulated as the engine's failure tests simulate a lost cache: deleted). The engine
    rebuilds both: the next steps raise nothing more and the penalized request still gets transformers' tokens."""
    llm = LLM(tiny_models["llama"], num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=64, warmup=False,
              async_scheduling=async_scheduling)  # fmt: skip
    engine, runner, case, prompt = llm.engine, llm.engine.runner, CASES[4], prompt_of(10, 5)
    engine.add_request("r", prompt, params_of(case, 12))
    tokens = []
    for _ in range(3):
        for d in engine.step():
            tokens += d.token_ids

    def failing(out):
        runner.penalty_counts.delete()  # (the output of a computation that failed: unusable)
        raise RuntimeError("device error")

    monkeypatch.setattr(runner, "fetch", failing)
    with pytest.raises(RuntimeError, match="device error"):
        engine.step()
    monkeypatch.undo()
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens += d.token_ids
    assert tokens == oracle_greedy(oracle, prompt, 12, **case)
