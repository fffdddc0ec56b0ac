"""The offline API takes what a vLLM user passes it (prompt forms, SamplingParams spellings) and returns vLLM's shape
of output too; a bad call is one InvalidRequestError naming its field and leaves nothing behind."""

import numpy as np
import pytest

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, InvalidRequestError, Logprob, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(str(DEFAULT_MODEL_DIR), warmup=False, max_model_len=64, num_kv_blocks=32, block_size=4, max_num_seqs=4)


def test_prompt_forms_give_the_same_tokens(llm):
    """Token ids as a list, a tuple, a numpy array, numpy integers or vLLM's {"prompt_token_ids": ...}; a text as
    a string or {"prompt": ...}: one prompt each, alone or in a list (a dict or a list of numpy ints used to fail
    with a KeyError or be split into one prompt per id)."""
    params = SamplingParams(max_tokens=3)
    (ref,) = llm.generate([[5, 6, 7]], params)
    for prompt in ((5, 6, 7), np.array([5, 6, 7]), [np.int64(5), np.int64(6), np.int64(7)],
                   {"prompt_token_ids": [5, 6, 7]}):  # fmt: skip
        outs = llm.generate(prompt, params)
        assert len(outs) == 1 and outs[0].token_ids == ref.token_ids and outs[0].prompt is None, prompt
    (text,) = llm.generate("The sky is", params)
    (as_dict,) = llm.generate([{"prompt": "The sky is"}], params)
    assert as_dict.token_ids == text.token_ids and as_dict.prompt == "The sky is"
    with pytest.raises(InvalidRequestError) as err:
        llm.generate({"prompt_token_ids": [5], "multi_modal_data": {}}, params)
    assert err.value.field == "prompt"


def test_request_output_has_vllms_outputs(llm):
    (out,) = llm.generate("hello", SamplingParams(max_tokens=3, logprobs=1))
    (completion,) = out.outputs
    assert (completion.index, completion.text, completion.token_ids, completion.finish_reason) == \
        (0, out.text, out.token_ids, out.finish_reason)  # fmt: skip
    assert completion.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)))
    assert llm.generate("hello", SamplingParams(max_tokens=1))[0].outputs[0].cumulative_logprob is None


def test_completion_logprobs_are_vllms_logprob_objects(llm):
    """`outputs[0].logprobs[i][token]` has vLLM's `.logprob`, `.rank` and `.decoded_token` (the token's own text,
    as the model's tokenizer decodes it alone); RequestOutput's flat `logprobs` keeps plain floats."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    (out,) = llm.generate("The capital of France is", SamplingParams(max_tokens=4, logprobs=2, ignore_eos=True))
    (completion,) = out.outputs
    assert len(completion.logprobs) == len(out.token_ids) == 4
    for token, entries, floats in zip(out.token_ids, completion.logprobs, out.logprobs):
        assert list(entries) == list(floats) and token in entries and 2 <= len(entries) <= 3
        assert entries[token].rank == 1  # greedy: the sampled token is the most likely
        assert sorted(e.rank for e in entries.values()) == list(range(1, len(entries) + 1))
        for t, entry in entries.items():
            assert isinstance(entry, Logprob) and entry.logprob == floats[t]
            assert entry.decoded_token == tokenizer.decode([t])


def test_n_completions_of_a_prompt(llm):
    """vLLM's n: one RequestOutput per prompt whose `outputs` hold n completions, completion i drawn with seed + i
    (so each is the single request with that seed); the flat fields are the first completion's."""
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, logprobs=1, ignore_eos=True)
    outs = llm.generate(["The sky is", [5, 6, 7]], [params, SamplingParams(max_tokens=2)])
    assert len(outs) == 2 and len(outs[1].outputs) == 1
    completions = outs[0].outputs
    assert [c.index for c in completions] == [0, 1, 2]
    for c, completion in enumerate(completions):
        alone_params = SamplingParams(max_tokens=6, temperature=1.0, seed=5 + c, ignore_eos=True)
        (alone,) = llm.generate("The sky is", alone_params)
        assert completion.token_ids == alone.token_ids and completion.text == alone.text
        assert completion.cumulative_logprob is not None and len(completion.logprobs) == 6
    assert len({tuple(c.token_ids) for c in completions}) > 1  # 6 draws at temperature 1: equal only by accident
    assert outs[0].token_ids == completions[0].token_ids and outs[0].text == completions[0].text
    greedy = llm.generate([[5, 6, 7]], SamplingParams(n=2, max_tokens=4))[0].outputs
    assert greedy[0].token_ids == greedy[1].token_ids
    with pytest.raises(InvalidRequestError) as err:  # the engine makes one completion per request
        llm.engine.add_request("x", [5, 6], SamplingParams(n=2))
    assert err.value.field == "n" and not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(n=0)
    assert err.value.field == "n"
    assert llm.engine.num_free_blocks() == llm.engine.num_total_blocks


def test_skip_special_tokens_false_keeps_their_text(llm):
    """vLLM's skip_special_tokens: False keeps special tokens' text (here end-of-sequence, made every token by a
    logit_bias under ignore_eos), as the tokenizer decodes them; by default it is left out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    eos = llm.engine.eos_token_ids[0]
    params = dict(max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})
    (skipped,) = llm.generate("The sky is", SamplingParams(**params))
    (kept,) = llm.generate("The sky is", SamplingParams(skip_special_tokens=False, **params))
    assert skipped.token_ids == kept.token_ids == [eos] * 3
    assert skipped.text == "" and kept.text == tokenizer.decode([eos] * 3, skip_special_tokens=False) != ""


def test_sampling_params_take_vllms_spellings(llm):
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(seed=-1).seed is None and SamplingParams(top_k=-1).top_k == 0
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=None, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 64  # max_model_len


@pytest.mark.parametrize("call, field", [
    (lambda llm: llm.generate(["a", "b"], [SamplingParams(max_tokens=2)]), "sampling_params"),
    (lambda llm: llm.generate(["a", "b"], SamplingParams(max_tokens=2), adapter=[None]), "adapter"),
    (lambda llm: llm.chat([[{"role": "user", "content": "hi"}]] * 2, SamplingParams(max_tokens=2), adapter=[None]),
     "adapter"),
    (lambda llm: llm.generate(5, SamplingParams(max_tokens=2)), "prompt"),
])  # fmt: skip
def test_lists_of_the_wrong_length_name_their_field(llm, call, field):
    with pytest.raises(InvalidRequestError) as err:
        call(llm)
    assert err.value.field == field


def test_a_failed_batch_leaves_no_session_open(llm):
    """The batch's second prompt is refused after the first was added: the first is aborted, and the session it
    opened ends with it (it used to stay live, empty, until its TTL)."""
    info = llm.engine.info()
    with pytest.raises(InvalidRequestError):
        llm.generate(["hello there", [99999]], SamplingParams(max_tokens=2), session="s")
    assert llm.engine.stats().num_sessions == 0 and llm.engine.info().num_free_blocks == info.num_free_blocks
    # a live session is left as it was
    llm.generate("hello there", SamplingParams(max_tokens=2), session="s")
    with pytest.raises(InvalidRequestError):
        llm.generate(["hello there", [99999]], SamplingParams(max_tokens=2), session="s")
    assert llm.engine.stats().num_sessions == 1
    llm.end_session("s")


def test_vllms_lora_request_loads_the_adapter_once_and_serves_it():
    """vLLM's `lora_request=LoRARequest(name, id, path)`: the first call loads the directory under its name, later
    calls reuse it; the tokens are those of `adapter=name`; a list gives one per prompt (None: the base model), also
    for chat; with `adapter` too, or an object of another kind, one error naming lora_request. `use_tqdm` takes
    vLLM's True or a tqdm-like class (here one that counts the requests it is told of)."""
    from jalora import LoRARequest

    llm = LLM(str(DEFAULT_MODEL_DIR), warmup=False, max_model_len=64, num_kv_blocks=32, block_size=4, max_num_seqs=4)
    path = str(DEFAULT_MODEL_DIR / "adapters" / "certainty")
    prompt = [5, 6, 7, 3, 356, 4]  # (ends with the certainty adapter's invocation)
    params = SamplingParams(max_tokens=4)
    request = LoRARequest("certainty", 1, path)
    (first,) = llm.generate([prompt], params, lora_request=request)
    assert [a.name for a in llm.list_adapters()] == ["certainty"]
    (again,) = llm.generate([prompt], params, lora_request=request)
    (named,) = llm.generate([prompt], params, "certainty")
    (base,) = llm.generate([prompt], params)
    assert first.token_ids == again.token_ids == named.token_ids != base.token_ids
    both = llm.generate([prompt, prompt], params, lora_request=[request, None])
    assert [o.token_ids for o in both] == [named.token_ids, base.token_ids]
    chat = [{"role": "user", "content": "hello"}]
    assert llm.chat(chat, params, lora_request=request)[0].token_ids == llm.chat(chat, params, "certainty")[0].token_ids
    for kwargs in (dict(adapter="certainty", lora_request=request), dict(lora_request="certainty"),
                   dict(lora_request=[request])):  # fmt: skip
        with pytest.raises(InvalidRequestError) as err:
            llm.generate([prompt, prompt], params, **kwargs)
        assert err.value.field == "lora_request"

    class Counter:
        def __init__(self, total, desc):
            self.total, self.n = total, 0
            Counter.last = self

        def update(self, k):
            self.n += k

        def close(self):
            pass

    llm.generate([prompt, prompt], SamplingParams(max_tokens=2, n=2), use_tqdm=Counter)
    assert (Counter.last.total, Counter.last.n) == (4, 4)
    assert len(llm.generate([prompt], params, use_tqdm=True)) == 1
