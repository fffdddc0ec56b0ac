"""On-device sampling against its definition (pure numpy) and per-request reproducibility."""

import jax.numpy as jnp
import numpy as np
import pytest

from jalora import LLM, SamplingParams
from jalora.model.sampler import sample

V = 8


def draw(logits, n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    logits = jnp.asarray(np.tile(logits, (n, 1)), jnp.float32)
    return np.asarray(
        sample(
            logits,
            jnp.full(n, temperature, jnp.float32),
            jnp.full(n, top_k, jnp.int32),
            jnp.full(n, top_p, jnp.float32),
            jnp.arange(n, dtype=jnp.uint32),
            jnp.zeros(n, jnp.int32),
            jnp.full(n, min_p, jnp.float32),
        )
    )


LOGITS = np.log(np.array([0.05, 0.3, 0.1, 0.25, 0.02, 0.18, 0.04, 0.06]))


def test_temperature_one_matches_softmax():
    counts = np.bincount(draw(LOGITS, 20000), minlength=V) / 20000
    np.testing.assert_allclose(counts, np.exp(LOGITS), atol=0.015)


def test_temperature_sharpens():
    t = 0.5
    want = np.exp(LOGITS / t) / np.exp(LOGITS / t).sum()
    counts = np.bincount(draw(LOGITS, 20000, temperature=t), minlength=V) / 20000
    np.testing.assert_allclose(counts, want, atol=0.015)


def test_top_k_keeps_k_most_likely_renormalised():
    counts = np.bincount(draw(LOGITS, 20000, top_k=3), minlength=V) / 20000
    keep = np.argsort(-LOGITS)[:3]
    want = np.zeros(V)
    want[keep] = np.exp(LOGITS[keep]) / np.exp(LOGITS[keep]).sum()
    np.testing.assert_allclose(counts, want, atol=0.015)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # sorted probs: .3 .25 .18 .1 ...; p=0.6 needs .3+.25+.18 (cumulative before .18 is .55 < .6)
    counts = np.bincount(draw(LOGITS, 20000, top_p=0.6), minlength=V) / 20000
    keep = [1, 3, 5]
    want = np.zeros(V)
    want[keep] = np.exp(LOGITS[keep]) / np.exp(LOGITS[keep]).sum()
    np.testing.assert_allclose(counts, want, atol=0.015)


def renormalised(keep):
    want = np.zeros(V)
    want[keep] = np.exp(LOGITS[keep]) / np.exp(LOGITS[keep]).sum()
    return want


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    # p_max = .3: min_p .5 keeps p >= .15 (.3 .25 .18)
    counts = np.bincount(draw(LOGITS, 20000, min_p=0.5), minlength=V) / 20000
    np.testing.assert_allclose(counts, renormalised([1, 3, 5]), atol=0.015)


def test_min_p_applies_before_top_p_as_in_vllm():
    """min_p .3 keeps .3 .25 .18 .1 (>= .09), renormalised over their .83: .361 .301 .217 .120, and top_p .75 then
    stops after .217 (.663 before it, .88 after). The other order (top-p on the whole distribution first, as
    transformers' warpers run) would keep .1 as well (.73 before it)."""
    counts = np.bincount(draw(LOGITS, 20000, top_p=0.75, min_p=0.3), minlength=V) / 20000
    np.testing.assert_allclose(counts, renormalised([1, 3, 5]), atol=0.015)


def test_min_p_is_relative_to_the_tempered_distribution():
    """At temperature 2 the probabilities flatten (p ~ sqrt of the original): min_p .5 keeps p_i >= .5 p_max, i.e.
    original p_i >= .25 p_max = .075 (.3 .25 .18 .1)."""
    t = 2.0
    keep = [1, 3, 5, 2]
    want = np.zeros(V)
    want[keep] = np.exp(LOGITS[keep] / t) / np.exp(LOGITS[keep] / t).sum()
    counts = np.bincount(draw(LOGITS, 20000, temperature=t, min_p=0.5), minlength=V) / 20000
    np.testing.assert_allclose(counts, want, atol=0.015)


def hf_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The distribution transformers' warpers sample from (temperature, then top-k, then top-p)."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores, ids = torch.tensor(np.asarray(logits, np.float32))[None], torch.zeros(1, 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, -1)[0].double().numpy()


@pytest.mark.parametrize("logits, kw", [
    ([0.0, 0.0, 0.0, 0.0, -3.0, -3.0], dict(top_p=0.5)),  # 3 of the 4 tied tokens reach .5 (it kept all 4)
    ([2.0, 1.0, 1.0, 1.0, -1.0], dict(top_k=2, top_p=0.8)),  # top-k keeps the tie at its boundary, top-p drops one
    ([2.0, 1.5, 1.0, 0.3, -1.0], dict(top_k=3, top_p=0.7, temperature=0.7)),
])  # fmt: skip
def test_ties_at_the_boundaries_match_transformers(logits, kw):
    """Top-k keeps every token tied with the k-th; top-p keeps only as many of the tokens tied at its boundary as
    the mass needs. Which of the tied ids stay is the implementations' own order, so the sorted distributions are
    compared, and the count of kept tokens exactly."""
    n = 20000
    want = hf_probs(logits, **kw)
    got = np.bincount(draw(np.asarray(logits), n, **kw), minlength=len(logits)) / n
    assert np.count_nonzero(got) == np.count_nonzero(want), (got, want)
    np.testing.assert_allclose(np.sort(got), np.sort(want), atol=0.015)


@pytest.mark.parametrize("logits, temperature, argmax", [([40.0, 50.0, 45.0], 1e-37, 1),
                                                         ([-17.0, -15.0, -14.0, -16.0], 2e-38, 2)])
def test_a_tiny_temperature_draws_the_argmax(logits, temperature, argmax):
    """Dividing the raw logits by it overflowed to infinities, and the draw took the first of them (token 0)."""
    assert set(draw(np.asarray(logits), 200, temperature=temperature).tolist()) == {argmax}


def test_greedy_rows_ignore_sampling_rows():
    logits = jnp.asarray(np.tile(LOGITS, (2, 1)), jnp.float32)
    out = sample(
        logits, jnp.array([0.0, 1.0]), jnp.zeros(2, jnp.int32), jnp.ones(2), jnp.zeros(2, jnp.uint32),
        jnp.zeros(2, jnp.int32),
    )  # fmt: skip
    assert int(out[0]) == int(np.argmax(LOGITS))


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)


def test_seeded_requests_reproduce_alone_and_batched(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    (a,) = llm.generate([[3, 4, 5, 6]], p)
    outs = llm.generate(
        [[9, 9, 9], [3, 4, 5, 6], list(range(2, 40))],
        [SamplingParams(max_tokens=5, temperature=1.0), p, SamplingParams(max_tokens=7)],
    )
    assert outs[1].token_ids == a.token_ids
    (c,) = llm.generate([[3, 4, 5, 6]], SamplingParams(**{**p.__dict__, "seed": 99}))
    assert c.token_ids != a.token_ids  # 12 draws at temperature 1 over 97 tokens: equal only by accident


def test_64_bit_seeds_reproduce_and_draw_apart(llm):
    """OpenAI's seeds are 64-bit integers (negative too): each reproduces, alone or batched, and draws apart from
    the seed of its low 32 bits and its neighbours; a seed below 2**32 draws as it always has (its own bits key the
    draw); n's completions of a large seed draw apart too."""
    assert SamplingParams(seed=123).draw_seed == 123
    p = dict(max_tokens=10, temperature=1.0, ignore_eos=True)
    prompt = [3, 4, 5, 6]
    runs = {s: llm.generate([prompt], SamplingParams(seed=s, **p))[0].token_ids
            for s in (5, 2**40 + 5, 2**41 + 5, -(2**40), 2**63 - 1)}  # fmt: skip
    assert len({tuple(t) for t in runs.values()}) == len(runs)
    batched = llm.generate([[9, 9], prompt], [SamplingParams(max_tokens=4), SamplingParams(seed=2**40 + 5, **p)])
    assert batched[1].token_ids == runs[2**40 + 5]
    (out,) = llm.generate([prompt], SamplingParams(n=3, seed=2**40 + 5, **p))
    assert out.outputs[0].token_ids == runs[2**40 + 5] and len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_stop_token(llm):
    """A stop token ends the request at its first occurrence, included. (End-of-sequence ids, which this random
    model never emits by chance, are made certain in test_chat's generation-config test.)"""
    (free,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=8, ignore_eos=True))
    stop = free.token_ids[3]
    (out,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=8, stop_token_ids=[stop], ignore_eos=True))
    first = free.token_ids.index(stop)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_min_tokens_bans_stop_tokens_until_then(llm, tiny_models):
    """vLLM's min_tokens: the draw cannot pick a stop token (or end-of-sequence) within the first min_tokens tokens,
    greedy rows included; after them one ends the request. Against transformers' greedy loop with the stop token's
    logit at -inf for those draws."""
    import torch

    from tests import hf_models

    prompt = [3, 4, 5]
    (free,) = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))
    stop = free.token_ids[1]
    (early,) = llm.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=[stop], ignore_eos=True))
    assert early.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] and early.finish_reason == "stop"
    oracle, want, seq = hf_models.load_oracle(tiny_models["llama"]), [], list(prompt)
    with torch.no_grad():
        while len(want) < 10:
            logits = oracle(torch.tensor([seq])).logits[0, -1]
            if len(want) < 4:
                logits[stop] = -torch.inf
            want.append(int(torch.argmax(logits)))
            seq.append(want[-1])
            if len(want) > 4 and want[-1] == stop:
                break
    params = SamplingParams(max_tokens=10, min_tokens=4, stop_token_ids=[stop], ignore_eos=True)
    (out,) = llm.generate([prompt], params)
    assert out.token_ids == want and stop not in want[:4]
    assert out.finish_reason == ("stop" if want[-1] == stop and len(want) < 10 else "length")
    sampled = SamplingParams(max_tokens=12, min_tokens=6, stop_token_ids=free.token_ids[:3], temperature=1.0, seed=3)
    (drawn,) = llm.generate([prompt], sampled)
    assert len(drawn.token_ids) >= 6 and not set(drawn.token_ids[:6]) & set(free.token_ids[:3])


def test_min_tokens_bans_end_of_sequence_with_ignore_eos_too(llm):
    """vLLM bans every stop id and end-of-sequence within min_tokens, ignore_eos or not (its all_stop_token_ids): a
    +100 bias on EOS makes it every token after them, and none of the first 3."""
    from tests import hf_models

    eos = hf_models.VOCAB - 1
    assert llm.engine.eos_token_ids == (eos,)
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=6, min_tokens=3, ignore_eos=ignore_eos, logit_bias={eos: 100.0})
        (out,) = llm.generate([list(range(3, 23))], params)
        assert eos not in out.token_ids[:3] and out.token_ids[3:] == [eos] * (1 if not ignore_eos else 3), out
        assert out.finish_reason == ("length" if ignore_eos else "stop")
