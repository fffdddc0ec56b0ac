"""The engine against transformers (torch, CPU, float32) on tiny random Llama, Granite and Mistral models."""

import numpy as np
import pytest

from jalora import LLM, SamplingParams
from tests import hf_models

# Shorter than a block, exact multiples of block_size (16), and spanning many blocks (chunked too:
# max_num_batched_tokens=64 splits the 70- and 100-token prompts over several steps).
PROMPT_LENS = (5, 16, 32, 70, 100)
GREEDY = SamplingParams(max_tokens=16, prompt_logprobs=True, ignore_eos=True)


def prompt_of(n: int, salt: int = 0) -> list[int]:
    rng = np.random.default_rng(n * 31 + salt)
    return rng.integers(2, hf_models.VOCAB - 1, size=n).tolist()


@pytest.fixture(scope="module", params=hf_models.FAMILIES)
def family(request, tiny_models):
    path = tiny_models[request.param]
    llm = LLM(path, num_kv_blocks=96, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
    oracle = hf_models.load_oracle(path)
    expected = {
        n: (hf_models.oracle_prompt_logprobs(oracle, prompt_of(n)), hf_models.oracle_greedy(oracle, prompt_of(n), 16))
        for n in PROMPT_LENS
    }
    return request.param, llm, expected


def check(out, n, expected):
    ref_lp, ref_tokens = expected[n]
    assert out.prompt_logprobs[0] is None
    diff = np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref_lp)))
    assert diff <= 1e-4, f"prompt of {n} tokens: prompt logprobs differ by {diff}"
    assert out.token_ids == ref_tokens, f"prompt of {n} tokens: greedy tokens differ"
    assert out.finish_reason == "length"


def test_each_prompt_alone(family):
    _, llm, expected = family
    for n in PROMPT_LENS:
        (out,) = llm.generate([prompt_of(n)], GREEDY)
        check(out, n, expected)


def test_all_prompts_batched(family):
    _, llm, expected = family
    outs = llm.generate([prompt_of(n) for n in PROMPT_LENS], GREEDY)
    for n, out in zip(PROMPT_LENS, outs):
        check(out, n, expected)
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_top_logprobs_match_oracle(tiny_models):
    import torch

    path = tiny_models["llama"]
    llm = LLM(path, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64, warmup=False)
    ids = prompt_of(20)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=3, logprobs=5, ignore_eos=True))
    oracle = hf_models.load_oracle(path)
    with torch.no_grad():
        seq = ids + out.token_ids[:-1]
        lp = torch.log_softmax(oracle(torch.tensor([seq])).logits[0].float(), -1)
    for k, step_lps in enumerate(out.logprobs):
        row = lp[len(ids) - 1 + k]
        top = torch.topk(row, 5)
        assert set(top.indices.tolist()) <= set(step_lps)
        for t, v in step_lps.items():
            assert abs(v - row[t].item()) <= 1e-4
        assert out.token_ids[k] == top.indices[0].item()  # greedy = top-1


def test_logprob_ranks_match_oracle(tiny_models):
    """vLLM's `Logprob` objects in `outputs[0].logprobs`: a sampled token's rank counts the tokens at least as
    likely as it (itself included), a top-n token's rank is its place; sampled at temperature 1.5, so most
    sampled tokens are not the most likely one."""
    import torch

    path = tiny_models["llama"]
    llm = LLM(path, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64, warmup=False)
    ids = prompt_of(20)
    params = SamplingParams(max_tokens=8, logprobs=3, temperature=1.5, seed=7, ignore_eos=True)
    (out,) = llm.generate([ids], params)
    oracle = hf_models.load_oracle(path)
    with torch.no_grad():
        lp = torch.log_softmax(oracle(torch.tensor([ids + out.token_ids[:-1]])).logits[0].double(), -1)
    ranks = []
    for k, (token, entries) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = lp[len(ids) - 1 + k]
        gaps = (row - row[token]).abs()
        assert sorted(gaps.tolist())[1] > 1e-4  # no near tie: the oracle's rank is well defined
        ranks.append(int((row >= row[token]).sum()))
        top = torch.topk(row, 3).indices.tolist()
        assert list(entries) == list(dict.fromkeys([token, *top]))  # vLLM's order: the sampled token, then the top
        for t, entry in entries.items():
            assert abs(entry.logprob - row[t].item()) <= 1e-4 and entry.logprob == out.logprobs[k][t]
            assert entry.rank == (top.index(t) + 1 if t in top else ranks[-1]), (k, t)
            assert entry.decoded_token == f"token_id:{t}"  # (this model has no tokenizer: the HTTP front's name)
    assert sum(r > 1 for r in ranks) >= 4, ranks


def test_logit_bias_matches_a_biased_oracle(tiny_models):
    """OpenAI's logit_bias, added to the logits before every draw, greedy included: against transformers' logits
    with the same biases, step by step. The bias lifts the oracle's second choice of the first step over its first,
    and bans the first; the logprobs stay the model's own (unbiased), as vLLM returns them."""
    import torch

    path = tiny_models["llama"]
    oracle = hf_models.load_oracle(path)
    ids = prompt_of(20)
    with torch.no_grad():
        first = oracle(torch.tensor([ids])).logits[0, -1].double()
    best, second = torch.topk(first, 2).indices.tolist()
    bias = {second: float(first[best] - first[second]) + 1.0, best: -100.0}
    want, want_lps, seq = [], [], list(ids)
    with torch.no_grad():
        for _ in range(6):
            logits = oracle(torch.tensor([seq])).logits[0, -1].double()
            biased = logits.clone()
            for t, b in bias.items():
                biased[t] += b
            token = int(torch.argmax(biased))
            want.append(token)
            want_lps.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
    assert want[0] == second
    llm = LLM(path, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=64, warmup=False)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=6, logprobs=0, logit_bias=bias, ignore_eos=True))
    assert out.token_ids == want
    got = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert np.max(np.abs(np.asarray(got) - np.asarray(want_lps))) <= 1e-4
    (plain,) = llm.generate([ids], SamplingParams(max_tokens=1, ignore_eos=True))
    assert plain.token_ids == [best]  # (and a request without one keeps the model's choice beside it)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("family_name", ["llama", "mistral"])
def test_engine_with_pallas_attention_kernels(tiny_models, impl, family_name):
    """The engine with the GPU / TPU attention kernel (interpret mode) stays within the parity bounds."""
    path = tiny_models[family_name]
    llm = LLM(path, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=32, warmup=False,
              attention_impl=impl, kernel_interpret=True)  # fmt: skip
    oracle = hf_models.load_oracle(path)
    prompts = [prompt_of(5, 1), prompt_of(40, 2)]  # 40 tokens: two prefill chunks, past the window (24)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, prompt_logprobs=True, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        ref = hf_models.oracle_prompt_logprobs(oracle, ids)
        assert np.max(np.abs(np.asarray(out.prompt_logprobs[1:]) - np.asarray(ref))) <= 1e-4
        assert out.token_ids == hf_models.oracle_greedy(oracle, ids, 8)


def test_the_layer_body_is_traced_once_per_step_variant(tiny_models, tmp_path, monkeypatch):
    """Start-up: a step variant traces (and lowers) the decoder layer once, not once per layer; the
    parity tests above hold with that (XLA inlines the layer calls back into the unrolled step)."""
    from jalora.model import decoder

    model = hf_models.make_model(str(tmp_path / "llama"), "llama", num_hidden_layers=4)
    traced = []
    layer = decoder._layer

    def counting(*args, **kwargs):  # runs only while tracing
        traced.append(1)
        return layer(*args, **kwargs)

    monkeypatch.setattr(decoder, "_layer", counting)
    llm = LLM(model, num_kv_blocks=16, max_num_seqs=2, max_num_batched_tokens=32, warmup=False)
    out = llm.generate([prompt_of(20)], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    variants = len(llm.engine.runner._step)
    assert variants >= 1 and len(traced) == variants, (len(traced), variants)
