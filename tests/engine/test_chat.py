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
    # Neither config.json nor generation_config.json names an end-of-sequence token: the tokenizer's is the eos, as
    # vLLM takes it (the engine had none, and ran every request to its length)
    bare = _with_generation_config(tmp_path / "e", {})
    config = json.loads((bare / "config.json").read_text())
    del config["eos_token_id"]
    (bare / "config.json").write_text(json.dumps(config))
    eos_engine = LLM(str(bare), num_kv_blocks=16, max_num_seqs=2, warmup=False).engine
    assert eos_engine.eos_token_ids == (eos_engine.tokenizer.token_to_id("<|eos|>"),) == (2,)
    bad = _with_generation_config(tmp_path / "b", {"do_sample": True, "temperature": -1})
    with pytest.raises(InvalidRequestError) as err:
        LLM(str(bad), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    assert err.value.field == "generation_config.json"


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}  # fmt: skip


def _word_tokenizer(model_dir) -> None:
    """A tiny word-level tokenizer.json (BOS added by its post-processor) in `model_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "user", "assistant", "system", "hello", "there", "short", "T"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(model_dir / "tokenizer.json"))


_WORD_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {{ eos_token }} "
                  "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}")  # fmt: skip


@pytest.mark.parametrize("layout", ["added_token_dicts", "special_tokens_map", "jinja_beside_config"])
def test_template_files_are_read_as_transformers_reads_them(tiny_models, tmp_path, layout):
    """Special tokens written as AddedToken dicts (Llama-2's tokenizer_config.json) or only in
    special_tokens_map.json, and a chat_template.jinja beside a tokenizer_config.json template (the file wins in
    transformers): the rendered ids are AutoTokenizer's. The first two used to render an empty bos_token and
    eos_token ([5, 6, 3, 6, 7, 4] for [1, 5, 6, 2, 3, 6, 7, 2, 4]), the third the tokenizer_config.json
    template (its ids where AutoTokenizer's are [1, 6, 9, 6, 7, 9, 8])."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    _word_tokenizer(model)
    special = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "unk_token": "<unk>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": _WORD_TEMPLATE}
    if layout == "special_tokens_map":
        (model / "special_tokens_map.json").write_text(json.dumps(special))
    else:
        config.update(special)
    if layout == "jinja_beside_config":
        (model / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }} T "
                                                   "{% endfor %}{% if add_generation_prompt %}short{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello there"}]
    llm = LLM(str(model), num_kv_blocks=16, max_num_seqs=2, warmup=False)
    tok = AutoTokenizer.from_pretrained(model)
    for add_generation_prompt in (True, False):
        want = _hf_ids(tok, messages, add_generation_prompt)
        assert want[0] == 1  # (the template's bos_token)
        assert llm.engine.apply_chat_template(messages, add_generation_prompt) == want
