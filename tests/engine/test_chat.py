"""Chat prompts rendered with the model's own template (transformers' renderer is the oracle), aLoRA
invocations in place of the generation prompt, and the model's generation_config as defaults."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from checkpoints import DEFAULT_MODEL_DIR
from jalora import LLM, InvalidRequestError, InvocationNotFoundError, SamplingParams

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? héllo 日本"},
    ],
]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(DEFAULT_MODEL_DIR, num_kv_blocks=64, max_num_seqs=4, max_model_len=256, warmup=False)
    llm.load_adapter("certainty", DEFAULT_MODEL_DIR / "adapters" / "certainty")
    return llm


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def _hf_ids(tok, messages, add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_rendering_matches_transformers(llm, hf_tokenizer, conversation, add_generation_prompt):
    got = llm.engine.apply_chat_template(conversation, add_generation_prompt)
    assert got == _hf_ids(hf_tokenizer, conversation, add_generation_prompt)


def test_chat_is_generate_on_the_rendered_conversation(llm, hf_tokenizer):
    params = SamplingParams(max_tokens=6)
    outs = llm.chat(CONVERSATIONS, params)
    refs = llm.generate([_hf_ids(hf_tokenizer, c, True) for c in CONVERSATIONS], params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert all(o.activation_start is None for o in outs)


def test_an_alora_answers_in_its_invocation_turn(llm, hf_tokenizer):
    invocation = next(a for a in llm.list_adapters() if a.name == "certainty").invocation_tokens
    (out,) = llm.chat(CONVERSATIONS[0], SamplingParams(max_tokens=4), adapter="certainty")
    rendered = _hf_ids(hf_tokenizer, CONVERSATIONS[0], False)
    assert out.prompt_token_ids == rendered + invocation and out.activation_start == len(rendered)
    with pytest.raises(InvocationNotFoundError):
        llm.chat(CONVERSATIONS[0], SamplingParams(max_tokens=4), adapter="certainty", with_invocation=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "messages, field",
    [([], "messages"), ("hello", "messages"), ([{"role": "user"}], "messages[0]"),
     ([{"role": "user", "content": "hi"}, {"role": "", "content": "x"}], "messages[1].role")],
)  # fmt: skip
def test_bad_conversations_name_the_field(llm, messages, field):
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.apply_chat_template(messages)
    assert err.value.field == field


def test_a_model_without_a_template_refuses_conversations(tiny_models):
    llm = LLM(tiny_models["llama"], num_kv_blocks=16, max_num_seqs=2, warmup=False)
    with pytest.raises(InvalidRequestError) as err:
        llm.chat(CONVERSATIONS[0])
    assert err.value.field == "messages"


def _with_generation_config(tmp_path, gen: dict):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model, ignore=shutil.ignore_patterns("adapters"))
    (model / "generation_config.json").write_text(json.dumps(gen))
    return model


def test_generation_config_gives_the_defaults_and_eos_ids(tmp_path, llm):
    (free,) = llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    stop = free.token_ids[2]  # a token the model emits greedily: the model's own end-of-turn below
    model = _with_generation_config(tmp_path, {"eos_token_id": [2, stop], "max_new_tokens": 8})
    other = LLM(str(model), num_kv_blocks=64, max_num_seqs=2, max_model_len=256, warmup=False)
    assert other.engine.default_sampling_params() == SamplingParams(max_tokens=8)
    assert stop in other.engine.info().eos_token_ids
    (out,) = other.generate([[1, 5, 6, 7]])  # no params: the model's defaults, its eos ids
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: free.token_ids.index(stop) + 1]

    sampled = _with_generation_config(tmp_path / "s", {"do_sample": True, "temperature": 0.7, "top_k": 20})
    engine = LLM(str(sampled), num_kv_blocks=16, max_num_seqs=2, warmup=False).engine
    assert engine.default_sampling_params() == SamplingParams(temperature=0.7, top_k=20)
    # repetition_penalty applies greedy or not (transformers' generate and vLLM take it so)
    penalized = _with_generation_config(tmp_path / "r", {"repetition_penalty": 1.4, "max_new_tokens": 8})
    engine = LLM(str(penalized), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert engine.engine.default_sampling_params() == SamplingParams(max_tokens=8, repetition_penalty=1.4)
    (dflt,) = engine.generate([[1, 5, 6, 7]])
    (explicit,) = llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=8, repetition_penalty=1.4))
    (plain,) = llm.generate([[1, 5, 6, 7]], SamplingParams(max_tokens=8))
    assert dflt.token_ids == explicit.token_ids != plain.token_ids
    bad = _with_generation_config(tmp_path / "b", {"do_sample": True, "temperature": -1})
    with pytest.raises(InvalidRequestError) as err:
        LLM(str(bad), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert err.value.field == "generation_config.json"
