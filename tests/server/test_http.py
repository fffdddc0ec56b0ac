"""The OpenAI-compatible HTTP front end to end: a real server (gRPC and HTTP on loopback ports, one engine),
driven by the official `openai` client, and compared with the same server's gRPC answers. No mocks.

What must be observed mid-generation (a disconnection, a full admission bound, a drain) is made certain
with the worker's step limit (`EngineWorker.limit_steps`), never by hoping a request runs long enough;
HANG only guards against a hang.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest

from jalora import LLM, SamplingParams
from jalora.client import Client
from server import cli
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import STEP_LIMIT, VOCAB, make_model_with_adapters, steps_limited, tiny_engine
from tests.waiting import HANG, until

MODEL = "tiny-llama"
ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_loras=4, max_lora_rank=8)
LONG = dict(max_tokens=40, extra_body={"ignore_eos": True})
TOKEN, ADMIN_TOKEN = "user-token-0123456789", "admin-token-9876543210"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_model_with_adapters(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def server(built):
    model_dir, dirs, root = built
    llm = LLM(model_dir, warmup=False, **ENGINE_ARGS)  # compiles only the step variants the tests use
    for name in ("judge_a", "plain"):
        llm.load_adapter(name, dirs[name])
    config = ServerConfig(port=0, http_port=0, adapter_roots=[root], model_name=MODEL)
    with ServerThread(llm.engine, config) as s:
        yield s


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=HANG) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.target, timeout=HANG) as c:
        yield c


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value


# ---- generation -----------------------------------------------------------------------------------


def test_completions_greedy_tokens_equal_grpc(oai, grpc_client):
    """Text and token-id prompts, base and aLoRA by model name, whole and streamed."""
    for prompt, model, adapter in [
        ("t5 t6 t7 t8", MODEL, None),
        ([5, 6, 7, 8, 9], MODEL, None),
        ([5, 6, 7, 8, 90, 91], "judge_a", "judge_a"),
        ([5, 6, 7], "plain", "plain"),
    ]:
        ref = grpc_client.generate(prompt, adapter, max_tokens=6, temperature=0.0)
        got = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        [choice] = got.choices
        assert choice.token_ids == ref.token_ids and choice.text == ref.text, (prompt, model)
        assert choice.finish_reason == ref.finish_reason and got.model == model
        assert got.usage.prompt_tokens == ref.usage.prompt_tokens
        assert got.usage.completion_tokens == len(ref.token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.jalora["activation_index"] == ref.activation_index
        t = got.jalora["timings"]
        assert 0 <= t["queue_seconds"] <= t["time_to_first_token_seconds"] <= t["total_seconds"]

        chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))  # fmt: skip
        *tokens, usage = chunks
        assert [t for c in tokens for t in c.choices[0].token_ids] == ref.token_ids
        assert "".join(c.choices[0].text for c in tokens) == ref.text
        assert [c.choices[0].finish_reason for c in tokens] == [None] * (len(tokens) - 1) + [ref.finish_reason]
        assert tokens[-1].jalora["activation_index"] == ref.activation_index
        assert usage.choices == [] and usage.usage.completion_tokens == len(ref.token_ids)


def test_chat_base_and_alora_equal_grpc(oai, grpc_client):
    messages = [{"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t7"},
                {"role": "user", "content": "t8"}]  # fmt: skip
    ref = grpc_client.chat(messages, max_tokens=5, temperature=0.0)
    got = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == ref.text
    assert got.choices[0].token_ids == ref.token_ids and got.usage.prompt_tokens == ref.usage.prompt_tokens

    # The judge: the server appends the invocation in place of the generation prompt when asked to.
    judged = grpc_client.chat(messages, "judge_a", max_tokens=3, temperature=0.0)
    got = oai.chat.completions.create(model="judge_a", messages=messages, max_tokens=3, temperature=0,
                                      extra_body={"append_invocation": True})  # fmt: skip
    assert got.choices[0].token_ids == judged.token_ids
    assert got.jalora["activation_index"] == judged.activation_index == judged.usage.prompt_tokens - 2

    # Without max_tokens a chat runs to the context, as OpenAI's and vLLM's do (the model sets no max_new_tokens);
    # a completion keeps 16, OpenAI's legacy default
    whole = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length" and whole.usage.total_tokens == 512
    assert oai.completions.create(model=MODEL, prompt=[1, 2], temperature=0).usage.completion_tokens == 16
    # ...and so does a chat in a pipeline session: its share would reserve a whole context per request (five
    # requests of 31 blocks each were refused over the share of 128)
    session = {"ignore_eos": True, "session": "chat-s", "end_session": True}
    in_session = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, n=5, extra_body=session)
    assert [len(c.token_ids) for c in in_session.choices] == [16] * 5

    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [t for c in chunks if c.choices for t in c.choices[0].token_ids] == ref.token_ids
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens and chunks[-1].choices == []


def test_n_choices_are_n_seeded_requests(server, oai, grpc_client):
    """OpenAI's n: choice c is the request drawn with seed + c (vLLM's rule; gRPC is the oracle), usage counts the
    prompt once and every choice's tokens; streamed, each event names its choice and the choices add up the same."""
    sampled = dict(max_tokens=5, temperature=1.0, extra_body={"ignore_eos": True})
    got = oai.completions.create(model=MODEL, prompt=[3, 4, 5], n=3, seed=11, logprobs=1, **sampled)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for c, choice in enumerate(got.choices):
        ref = grpc_client.generate([3, 4, 5], max_tokens=5, temperature=1.0, seed=11 + c, ignore_eos=True)
        assert choice.token_ids == ref.token_ids and choice.text == ref.text
        assert len(choice.logprobs.tokens) == 5
    assert len({tuple(c.token_ids) for c in got.choices}) > 1  # 5 draws at temperature 1: equal only by accident
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (3, 15, 18)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "t5"}], n=2, seed=4, **sampled)
    whole = oai.chat.completions.create(**chat)
    chunks = list(oai.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    for c in range(2):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == whole.choices[c].finish_reason
        assert [t for m in mine for t in m.token_ids] == whole.choices[c].token_ids
        assert "".join(m.delta.content or "" for m in mine) == whole.choices[c].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    assert server.server.worker.num_pending == 0


def test_missing_invocation_is_400_saying_how_to_fix_it(oai):
    err = _error(lambda: oai.completions.create(model="judge_a", prompt=[5, 6, 7], max_tokens=2))
    assert err.status_code == 400 and err.body["param"] == "prompt" and err.body["type"] == "invalid_request_error"
    assert "[90, 91]" in err.body["message"] and '"append_invocation": true' in err.body["message"]
    err = _error(lambda: oai.chat.completions.create(model="judge_a", messages=[{"role": "user", "content": "t5"}],
                                                     max_tokens=2, stream=True))  # fmt: skip
    assert err.status_code == 400 and err.body["param"] == "messages"
    # With the extension, the same prompt is the prompt with the invocation appended.
    appended = oai.completions.create(model="judge_a", prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                      extra_body={"append_invocation": True})  # fmt: skip
    by_hand = oai.completions.create(model="judge_a", prompt=[5, 6, 7, 90, 91], max_tokens=3, temperature=0)
    assert appended.choices[0].token_ids == by_hand.choices[0].token_ids and appended.jalora["activation_index"] == 3


def test_echo_shows_an_appended_invocation(oai):
    """With append_invocation the prompt that the completion continues ends with the invocation: echo shows it, whole
    and streamed, as it shows the invocation of a prompt that holds it."""
    kwargs = dict(model="judge_a", max_tokens=3, temperature=0, echo=True)
    for prompt in ("t5 t6 t7", [5, 6, 7]):
        by_hand = oai.completions.create(prompt="t5 t6 t7 t90 t91", **kwargs).choices[0].text
        appended = dict(prompt=prompt, extra_body={"append_invocation": True}, **kwargs)
        assert oai.completions.create(**appended).choices[0].text == by_hand
        assert "".join(c.choices[0].text for c in oai.completions.create(stream=True, **appended)) == by_hand


def test_a_judge_reports_cached_tokens_on_its_second_call(oai, grpc_client):
    """The context's two full blocks (block_size 16) lie before the activation: the first judge call
    computes them, the second finds them, and so does a base call (the base model's KV)."""
    context = [(11 * i + 7) % 80 for i in range(40)]
    prompt = context + [90, 91]
    first = oai.completions.create(model="judge_a", prompt=prompt, max_tokens=2)
    second = oai.completions.create(model="judge_a", prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32
    assert second.jalora["activation_index"] == 40
    base = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t1"}], max_tokens=1)
    assert base.usage.prompt_tokens_details.cached_tokens == 0  # another prefix: nothing to find
    assert grpc_client.generate(context + [1], max_tokens=1).usage.cached_tokens == 32


def test_stop_strings_logprobs_and_echo(oai, grpc_client):
    ref = grpc_client.generate("t5 t6 t7", max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True)
    words = ref.text.split()
    stop = " " + words[3]  # the text is "tA tB tC tD ...": stop before the fourth word
    got = oai.completions.create(model=MODEL, prompt="t5 t6 t7", max_tokens=8, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})  # fmt: skip
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == ref.text[: ref.text.index(stop)]
    assert got.choices[0].token_ids == ref.token_ids[:4]  # up to the token that completed the stop string
    kept = oai.completions.create(model=MODEL, prompt="t5 t6 t7", max_tokens=8, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})  # fmt: skip
    assert kept.choices[0].text == ref.text[: ref.text.index(stop) + len(stop)]  # vLLM's include_stop_str_in_output
    over_grpc = grpc_client.generate("t5 t6 t7", params=SamplingParams(
        max_tokens=8, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))  # fmt: skip
    assert (over_grpc.text, over_grpc.token_ids) == (kept.choices[0].text, kept.choices[0].token_ids)
    # vLLM's skip_special_tokens false keeps their text (end-of-sequence, made every token by a logit_bias)
    eos = {"ignore_eos": True, "logit_bias": {str(VOCAB - 1): 100}}
    skipped = oai.completions.create(model=MODEL, prompt="t5", max_tokens=2, temperature=0, extra_body=eos)
    shown = oai.completions.create(model=MODEL, prompt="t5", max_tokens=2, temperature=0,
                                   extra_body={**eos, "skip_special_tokens": False})  # fmt: skip
    assert skipped.choices[0].token_ids == shown.choices[0].token_ids == [VOCAB - 1] * 2
    assert (skipped.choices[0].text, shown.choices[0].text) == ("", " </s> </s>")  # (its decoder joins with spaces)
    over_grpc = grpc_client.generate("t5", params=SamplingParams(
        max_tokens=2, ignore_eos=True, logit_bias={VOCAB - 1: 100.0}, skip_special_tokens=False))  # fmt: skip
    assert over_grpc.text == " </s> </s>"

    got = oai.completions.create(model=MODEL, prompt="t5 t6 t7", max_tokens=8, temperature=0, logprobs=2,
                                 extra_body={"ignore_eos": True})  # fmt: skip
    lp = got.choices[0].logprobs

    def text(token: int) -> str:
        return "</s>" if token == VOCAB - 1 else f"t{token}"

    assert lp.tokens == [text(t) for t in ref.token_ids]
    for token, value, top, want in zip(ref.token_ids, lp.token_logprobs, lp.top_logprobs, ref.logprobs):
        assert abs(value - want[token]) < 1e-5
        assert top.keys() == {text(t) for t in want} and all(abs(top[text(t)] - v) < 1e-5 for t, v in want.items())

    echoed = oai.completions.create(model=MODEL, prompt="t5 t6 t7", max_tokens=3, temperature=0, echo=True,
                                    logprobs=0)  # fmt: skip
    assert echoed.choices[0].text == "t5 t6 t7" + ref.text[: len(echoed.choices[0].text) - len("t5 t6 t7")]
    assert echoed.choices[0].logprobs.tokens[:3] == ["t5", "t6", "t7"]
    assert echoed.choices[0].logprobs.token_logprobs[0] is None

    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t5"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [f"t{t}" for t in chat.choices[0].token_ids]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_models_and_adapter_management(server, oai, built):
    _, dirs, root = built
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {MODEL, "judge_a", "plain"}
    assert models[MODEL].jalora == {"kind": "base"} and models["judge_a"].parent == MODEL
    assert models["judge_a"].jalora["kind"] == "alora" and models["judge_a"].jalora["invocation_tokens"] == [90, 91]
    assert models["plain"].jalora["kind"] == "lora" and models["plain"].jalora["invocation_tokens"] is None

    def post(path, body):
        return oai.post(path, body=body, cast_to=object)

    # judge_a's and plain's directories again, under other names: the projections they adapt are the
    # loaded adapters' already, so no step is compiled again.
    name = "judge_x"
    loaded = post("/load_lora_adapter", {"lora_name": name, "lora_path": "judge_a"})  # relative to the root
    assert loaded["id"] == name and loaded["jalora"]["invocation_tokens"] == [90, 91]
    assert loaded["jalora"]["identity"] == models["judge_a"].jalora["identity"]
    got = oai.completions.create(model=name, prompt=[1, 2, 3, 90, 91], max_tokens=2)
    assert got.jalora["activation_index"] == 3

    post("/load_lora_adapter", {"lora_name": "fourth", "lora_path": dirs["plain"]})  # an absolute path
    cases = [
        ({"lora_name": name, "lora_path": "judge_a"}, 400, "lora_name"),  # already loaded
        ({"lora_name": "x", "lora_path": "/etc"}, 403, "lora_path"),
        ({"lora_name": "x", "lora_path": "../model"}, 403, "lora_path"),
        ({"lora_name": "x", "lora_path": "missing"}, 404, "lora_path"),
        ({"lora_name": "x y", "lora_path": "plain"}, 400, "lora_name"),
        ({"lora_name": "x"}, 400, "lora_path"),
        ({"lora_name": "fifth", "lora_path": "plain"}, 409, None),  # max_loras slots full
    ]
    for body, status, param in cases:
        err = _error(lambda body=body: post("/load_lora_adapter", body))
        assert (err.status_code, err.body["param"]) == (status, param), (body, err.body)
        assert err.body["message"].startswith(f"{param}: " if param else "all 4 adapter slots"), err.body
    post("/unload_lora_adapter", {"lora_name": "fourth"})
    assert post("/unload_lora_adapter", {"lora_name": name}) == {"id": name, "object": "model", "deleted": True}
    err = _error(lambda: post("/unload_lora_adapter", {"lora_name": name}))
    assert err.status_code == 404 and err.body["param"] == "lora_name"
    err = _error(lambda: oai.completions.create(model=name, prompt=[1, 2, 3, 90, 91], max_tokens=2))
    assert err.status_code == 404 and err.body["param"] == "model" and err.body["type"] == "not_found_error"
    assert {m.id for m in oai.models.list()} == {MODEL, "judge_a", "plain"}


def _completion(**body):
    return ("/completions", {"model": MODEL, "prompt": [1, 2, 3], **body})


def _chat(**body):
    return ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "t1"}], **body})


BAD_REQUESTS = {
    "n 0": (_completion(n=0), 400, "n"),
    "skip_special_tokens text": (_completion(skip_special_tokens=0), 400, "skip_special_tokens"),
    "include_stop_str_in_output text": (_completion(include_stop_str_in_output="yes"), 400,
                                        "include_stop_str_in_output"),
    "best_of": (_completion(best_of=3), 400, "best_of"),
    "chat n past 128": (_chat(n=129), 400, "n"),
    "max_tokens 0": (_completion(max_tokens=0), 400, "max_tokens"),
    "max_tokens text": (_completion(max_tokens="8"), 400, "max_tokens"),
    "max_completion_tokens 0": (_chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    "temperature < 0": (_completion(temperature=-1), 400, "temperature"),
    "top_p 0": (_completion(top_p=0), 400, "top_p"),
    "seed past 64 bits": (_completion(seed=2**63), 400, "seed"),  # (OpenAI's seeds are 64-bit integers)
    "top_k past int32": (_completion(top_k=2**31, temperature=1), 400, "top_k"),
    "temperature past a float": (_completion(temperature=10**400), 400, "temperature"),
    "ignore_eos text": (_completion(ignore_eos="no"), 400, "ignore_eos"),
    "session_ttl past a float": (_completion(session="s", session_ttl=10**400), 400, "session_ttl"),
    "stop_token_ids past int32": (_completion(stop_token_ids=[2**31]), 400, "stop_token_ids"),
    "logprobs 100": (_completion(logprobs=100), 400, "logprobs"),
    "top_logprobs 100": (_chat(logprobs=True, top_logprobs=100), 400, "top_logprobs"),
    "top_logprobs alone": (_chat(top_logprobs=2), 400, "top_logprobs"),
    "stop empty": (_completion(stop=[""]), 400, "stop"),
    "stop 17": (_completion(stop=[f"s{i}" for i in range(17)]), 400, "stop"),
    "stop_token_ids < 0": (_completion(stop_token_ids=[-3]), 400, "stop_token_ids"),
    "stream not bool": (_completion(stream="yes"), 400, "stream"),
    "stream_options alone": (_completion(stream_options={"include_usage": True}), 400, "stream_options"),
    "include_usage text": (_completion(stream=True, stream_options={"include_usage": "yes"}), 400,
                           "stream_options.include_usage"),
    "presence_penalty > 2": (_completion(presence_penalty=2.5), 400, "presence_penalty"),
    "frequency_penalty string": (_chat(frequency_penalty="1"), 400, "frequency_penalty"),
    "repetition_penalty 0": (_completion(repetition_penalty=0), 400, "repetition_penalty"),  # (vLLM's extension)
    "min_p > 1": (_completion(min_p=1.5), 400, "min_p"),
    "logit_bias key": (_completion(logit_bias={"t5": 1}), 400, "logit_bias"),
    "logit_bias past 100": (_chat(logit_bias={"5": 101}), 400, "logit_bias"),
    "logit_bias past vocab": (_completion(logit_bias={"97": 1}), 400, "logit_bias"),
    "min_tokens past max_tokens": (_chat(min_tokens=4, max_tokens=2), 400, "min_tokens"),
    "guided_choice": (_chat(guided_choice=["t1", "t2"]), 400, "guided_choice"),
    "n true": (_completion(n=True), 400, "n"),
    "tool_choice required": (_chat(tool_choice="required"), 400, "tool_choice"),
    "top_k -2": (_completion(top_k=-2, temperature=1), 400, "top_k"),
    "add_generation_prompt false": (_chat(add_generation_prompt=False), 400, "add_generation_prompt"),
    "chat_template_kwargs": (_chat(chat_template_kwargs={"enable_thinking": True}), 400, "chat_template_kwargs"),
    "chat echo": (_chat(echo=True), 400, "echo"),
    "prompt_logprobs": (_completion(prompt_logprobs=1), 400, "prompt_logprobs"),
    # OpenAI's API refuses a max_tokens that the context cannot hold (max_model_len 512 here)
    "max_tokens past the context": (_completion(max_tokens=510), 400, "max_tokens"),
    "text prompt's max_tokens past the context": (_completion(prompt="t1 t2 t3", max_tokens=510), 400, "max_tokens"),
    "max_completion_tokens past the context": (_chat(max_completion_tokens=600, max_tokens=2), 400,
                                               "max_completion_tokens"),
    "tools": (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    "echo stream logprobs": (_completion(echo=True, stream=True, logprobs=1), 400, "echo"),
    "empty prompt": (_completion(prompt=""), 400, "prompt"),
    "empty ids": (_completion(prompt=[]), 400, "prompt"),
    "two prompts": (_completion(prompt=["t1", "t2"]), 400, "prompt"),
    "id past vocab": (_completion(prompt=[1, 97]), 400, "prompt"),
    "too many ids": (_completion(prompt=[1] * 600), 400, "prompt"),
    "no model": (("/completions", {"prompt": [1, 2]}), 400, "model"),
    "unknown model": (_completion(model="nope"), 404, "model"),
    "not a model name": (_completion(model="no such/name"), 404, "model"),
    "no messages": (("/chat/completions", {"model": MODEL}), 400, "messages"),
    "empty messages": (_chat(messages=[]), 400, "messages"),
    "empty role": (_chat(messages=[{"role": "", "content": "t1"}]), 400, "messages[0].role"),
    "image part": (_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
                   "messages[0].content[0]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_naming_the_param(server, oai, case):
    (path, body), status, param = BAD_REQUESTS[case]
    err = _error(lambda: oai.post(path, body=body, cast_to=object))
    assert err.status_code == status, err.body
    assert err.body["param"] == param and err.body["message"].startswith(f"{param}: "), err.body
    assert set(err.body) == {"message", "type", "param", "code"}
    assert server.server.worker.num_pending == 0


def test_neutral_values_of_unimplemented_parameters_are_served(server, oai):
    """Values that ask for nothing (vLLM's top_k -1, no tool call, an empty suffix, a penalty of 1, JSON null) are
    served as if left out; the full context is a max_tokens that still fits."""
    plain = oai.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0)
    neutral = dict(suffix="", repetition_penalty=1.0, min_p=0, min_tokens=0, skip_special_tokens=True,
                   logit_bias={}, best_of=None, presence_penalty=0.0)  # fmt: skip
    got = oai.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0, extra_body=neutral)
    assert got.choices[0].token_ids == plain.choices[0].token_ids
    sampled = dict(model=MODEL, prompt=[1, 2, 3], max_tokens=8, temperature=1.0, seed=3)  # all tokens, as top_k 0
    assert oai.completions.create(**sampled, extra_body={"top_k": -1}).choices[0].token_ids == \
        oai.completions.create(**sampled).choices[0].token_ids != \
        oai.completions.create(**sampled, extra_body={"top_k": 1}).choices[0].token_ids  # fmt: skip
    # vLLM's min_tokens is served: a stop token that would end the greedy answer at once waits for the 5th token
    free = oai.completions.create(**{**sampled, "temperature": 0}).choices[0].token_ids
    body = dict(extra_body={"ignore_eos": True, "stop_token_ids": [free[0]], "min_tokens": 5})
    held = oai.completions.create(**{**sampled, "temperature": 0}, **body).choices[0]
    assert len(held.token_ids) >= 5 and free[0] not in held.token_ids[:5]
    # OpenAI's logit_bias is served, greedy requests included: +100 on one token makes it every token
    for extra in ({"temperature": 0}, {"temperature": 1.0, "n": 2}):
        biased = oai.completions.create(**{**sampled, **extra}, logit_bias={"5": 100})
        assert all(choice.token_ids == [5] * 8 for choice in biased.choices)
    # vLLM's min_p is served: at 1 only the most likely token stays, so sampling draws the greedy tokens
    greedy = oai.completions.create(**{**sampled, "temperature": 0}).choices[0].token_ids
    assert oai.completions.create(**sampled, extra_body={"min_p": 1.0}).choices[0].token_ids == greedy
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "t5"}], max_tokens=3, temperature=0)
    ref = oai.chat.completions.create(**chat)
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto", "tools": []}, {"parallel_tool_calls": False},
                  {"add_generation_prompt": True, "continue_final_message": False, "chat_template_kwargs": {}}):
        assert oai.chat.completions.create(**chat, extra_body=extra).choices[0].token_ids == ref.choices[0].token_ids
    full = oai.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=509, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 509 and full.choices[0].finish_reason == "length"
    assert server.server.worker.num_pending == 0


def test_penalties_are_served_as_the_engine_applies_them(built, oai):
    """OpenAI's presence and frequency penalties and vLLM's repetition_penalty: each request's tokens over HTTP are
    the engine's own with the same parameters (tests/model/test_penalties.py checks those against transformers),
    greedy and sampled, completions and chat, and they differ from the unpenalized ones."""
    offline = LLM(built[0], warmup=False, **ENGINE_ARGS)
    penalties = dict(presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.6)
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 11}):
        body = dict(model=MODEL, prompt=[5, 6, 5, 6, 7], max_tokens=12, **extra)
        got = oai.completions.create(**body, presence_penalty=1.5, frequency_penalty=0.7,
                                     extra_body={"repetition_penalty": 1.6, "ignore_eos": True})  # fmt: skip
        params = SamplingParams(max_tokens=12, ignore_eos=True, **extra, **penalties)
        (want,) = offline.generate([[5, 6, 5, 6, 7]], params)
        assert got.choices[0].token_ids == want.token_ids
        plain = oai.completions.create(**body, extra_body={"ignore_eos": True}).choices[0].token_ids
        assert plain != want.token_ids
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t5 t6 t5"}], max_tokens=6,
                                       temperature=0, frequency_penalty=2.0)  # fmt: skip
    ids = offline.engine.apply_chat_template([{"role": "user", "content": "t5 t6 t5"}])
    (want,) = offline.generate([ids], SamplingParams(max_tokens=6, frequency_penalty=2.0))
    assert chat.choices[0].token_ids == want.token_ids
    # and vLLM's allowed_token_ids, which rides in the same rows: only those tokens, as the engine picks them
    allowed = [9, 13, 40, 77]
    got = oai.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                 extra_body={"allowed_token_ids": allowed, "ignore_eos": True})  # fmt: skip
    (want,) = offline.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True, allowed_token_ids=allowed))
    assert got.choices[0].token_ids == want.token_ids and set(want.token_ids) <= set(allowed)


def test_text_offsets_index_the_text(oai):
    """Each token's text_offset is where its piece of the choice's text begins (this tokenizer's pieces after the
    first word start with its space), echoed prompt tokens included; a whole request's offsets are its streamed
    ones."""
    kwargs = dict(model=MODEL, max_tokens=4, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    for echo in (False, True):
        choice = oai.completions.create(prompt="t5 t6 t7", echo=echo, **kwargs).choices[0]
        lp = choice.logprobs
        assert len(lp.tokens) == (7 if echo else 4)
        for token, offset in zip(lp.tokens, lp.text_offset):
            assert choice.text[offset:].lstrip(" ").startswith(token), (echo, lp.tokens, lp.text_offset)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(choice.text)
    chunks = list(oai.completions.create(prompt="t5 t6 t7", stream=True, **kwargs))
    whole = oai.completions.create(prompt="t5 t6 t7", **kwargs).choices[0].logprobs
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole.text_offset


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(oai):
    """vLLM's truncate_prompt_tokens: a prompt longer than max_model_len (512) is cut to its last k tokens, not
    refused; the answer is the one to those k tokens sent alone, echo shows them, and with append_invocation the cut
    prompt still ends with the adapter's invocation."""
    words = [f"t{5 + i % 80}" for i in range(600)]
    kwargs = dict(model=MODEL, max_tokens=5, temperature=0)
    cut = {"ignore_eos": True, "truncate_prompt_tokens": 12}
    want = oai.completions.create(prompt=" ".join(words[-12:]), extra_body={"ignore_eos": True}, **kwargs).choices[0]
    ids = [int(w[1:]) for w in words]
    for prompt in (" ".join(words), ids):
        got = oai.completions.create(prompt=prompt, echo=True, extra_body=cut, **kwargs)
        assert got.usage.prompt_tokens == 12 and got.choices[0].token_ids == want.token_ids
        assert got.choices[0].text == " ".join(words[-12:]) + want.text
    with pytest.raises(openai.BadRequestError) as err:  # (without it the prompt is refused, as before)
        oai.completions.create(prompt=ids, **kwargs)
    assert err.value.body["param"] == "prompt"
    short = oai.completions.create(prompt="t5  t6\tt7", echo=True, extra_body=cut, **kwargs).choices[0]
    assert short.text.startswith("t5  t6\tt7 ")  # (nothing cut: echo keeps the text as sent, not its decode)
    judged = oai.completions.create(**{**kwargs, "model": "judge_a"}, prompt=" ".join(words), echo=True,
                                    extra_body={**cut, "append_invocation": True})  # fmt: skip
    assert judged.choices[0].text.startswith(" ".join(words[-10:]) + " t90 t91")
    assert judged.usage.prompt_tokens == 12


def test_text_continues_the_prompt_and_text_parts_join_by_lines(oai):
    """A completion's text is what it adds to the prompt's text, so `echo` reads as the whole sequence decoded (this
    tokenizer joins words with spaces: the first word's space is the completion's); a message's text parts are
    joined with newlines, as vLLM joins them."""
    plain = oai.completions.create(model=MODEL, prompt="t5 t6", max_tokens=3, temperature=0)
    words = " ".join(f"t{t}" for t in plain.choices[0].token_ids)
    assert plain.choices[0].text == " " + words
    echoed = oai.completions.create(model=MODEL, prompt="t5 t6", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "t5 t6 " + words
    parts = [{"type": "text", "text": "t5"}, {"type": "text", "text": "t6"}]
    kwargs = dict(model=MODEL, max_tokens=2, temperature=0)
    by_parts = oai.chat.completions.create(messages=[{"role": "user", "content": parts}], **kwargs)
    joined = oai.chat.completions.create(messages=[{"role": "user", "content": "t5\nt6"}], **kwargs)
    assert by_parts.usage.prompt_tokens == joined.usage.prompt_tokens == 5  # t1 t5 t6 t2 t3
    assert by_parts.choices[0].token_ids == joined.choices[0].token_ids


def test_bodies_that_are_not_json_objects(server, oai):
    json_type = {"headers": {"Content-Type": "application/json"}}
    nested = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # (deeper than Python recurses)
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe", nested):
        err = _error(lambda content=content: oai.post("/completions", content=content, cast_to=object,
                                                      options=json_type))  # fmt: skip
        assert err.status_code == 400 and err.body["param"] is None and err.body["type"] == "invalid_request_error"


def test_disconnected_stream_aborts_its_request(server, oai):
    worker = server.server.worker
    aborted = worker.num_aborted
    with steps_limited(worker):
        stream = oai.completions.create(model=MODEL, prompt=[3, 4, 5], stream=True, **LONG)
        assert next(iter(stream)).choices[0].token_ids
        stream.close()
        until(lambda: worker.num_aborted == aborted + 1, "the disconnection to reach the engine")
    until(lambda: worker.num_pending == 0 and server.server.front.calls.num_calls == 0, "the call to end")


def test_cli_flag_and_config():
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--http-port", "8000"])
    assert cli.serve_plan(args).server_config.http_port == 8000
    assert ServerConfig().http_port is None
    for bad in (-1, 70000, "80"):
        with pytest.raises(ValueError) as err:
            ServerConfig(http_port=bad)
        assert err.value.field == "http_port"
    with pytest.raises(ValueError) as err:
        ServerConfig(port=9000, http_port=9000)
    assert err.value.field == "http_port"


# ---- tokens, overload, drain: servers of their own on the embedded tiny model ----------------------


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    (d / "token").write_text(TOKEN)
    (d / "admin").write_text(ADMIN_TOKEN)
    return str(d / "token"), str(d / "admin")


@pytest.fixture(scope="module")
def tiny():
    return tiny_engine()


def _raw(url: str, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """A request without the openai client (which always sends a token)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.removesuffix("/v1") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HANG) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_tokens_guard_every_route_but_health(tiny, tokens):
    from checkpoints import DEFAULT_MODEL_DIR

    config = ServerConfig(port=0, http_port=0, auth_token_file=tokens[0], admin_token_file=tokens[1],
                          adapter_roots=[str(DEFAULT_MODEL_DIR / "adapters")], model_name="tiny")  # fmt: skip
    with ServerThread(tiny, config) as s:
        assert _raw(s.http_url, "/health") == (200, {"status": "serving"})
        status, body = _raw(s.http_url, "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert "Authorization: Bearer" in body["error"]["message"]
        kwargs = dict(base_url=s.http_url, max_retries=0, timeout=HANG)
        with openai.OpenAI(api_key="wrong", **kwargs) as wrong, openai.OpenAI(api_key=TOKEN, **kwargs) as user, \
                openai.OpenAI(api_key=ADMIN_TOKEN, **kwargs) as admin:  # fmt: skip
            err = _error(lambda: wrong.completions.create(model="tiny", prompt=[1, 2], max_tokens=1))
            assert err.status_code == 401 and err.body["message"] == "invalid bearer token"
            assert user.completions.create(model="tiny", prompt=[1, 2], max_tokens=1).usage.completion_tokens == 1
            load = {"lora_name": "safety", "lora_path": "safety"}
            err = _error(lambda: user.post("/load_lora_adapter", body=load, cast_to=object))
            assert err.status_code == 403 and err.body["type"] == "permission_error"
            assert admin.post("/load_lora_adapter", body=load, cast_to=object)["jalora"]["kind"] == "alora"
            assert {m.id for m in user.models.list()} == {"tiny", "safety"}
            err = _error(lambda: user.post("/unload_lora_adapter", body={"lora_name": "safety"}, cast_to=object))
            assert err.status_code == 403
            admin.post("/unload_lora_adapter", body={"lora_name": "safety"}, cast_to=object)


def test_full_admission_bound_is_429(tiny):
    """Both fronts share the engine worker's bound: a gRPC stream and an HTTP stream fill it.

    The HTTP stream's response starts with its first token, so it is opened on a thread while no step
    may run: it counts as in flight from its submission on, whatever the engine thread is doing."""
    config = ServerConfig(port=0, http_port=0, max_pending_requests=2, model_name="tiny")
    with ServerThread(tiny, config) as s, Client(s.target, timeout=HANG) as g, \
            openai.OpenAI(base_url=s.http_url, api_key="x", max_retries=0, timeout=HANG) as c:  # fmt: skip
        worker = s.server.worker
        with steps_limited(worker):  # the gRPC stream cannot finish
            over_grpc = g.generate_stream([1, 2, 3], max_tokens=40, ignore_eos=True)
            next(over_grpc)
            worker.limit_steps(0)  # from here no request advances until the limit is lifted
            first_http: list = []
            opener = threading.Thread(target=lambda: first_http.append(next(iter(
                c.completions.create(model="tiny", prompt=[4, 5, 6], stream=True, **LONG)))))  # fmt: skip
            opener.start()
            until(lambda: worker.num_pending == 2, "the HTTP stream to be submitted")
            err = _error(lambda: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}]))
            assert err.status_code == 429 and err.body["type"] == "rate_limit_error"
            assert "max_pending_requests=2" in err.body["message"]
            over_grpc.close()
        opener.join(HANG)  # the limit is lifted: the HTTP stream gets its first token
        assert not opener.is_alive() and first_http[0].choices[0].token_ids
        until(lambda: worker.num_pending == 0, "the streams to end")
        assert c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2).usage.completion_tokens == 2
        assert len(c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, n=2).choices) == 2
        # n requests are admitted one by one: with one in flight, the second of n = 2 is over the bound, and the
        # first ends with the call
        with steps_limited(worker):
            held = g.generate_stream([1, 2, 3], max_tokens=40, ignore_eos=True)
            next(held)
            worker.limit_steps(0)
            err = _error(lambda: c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, n=2))
            assert err.status_code == 429 and "max_pending_requests=2" in err.body["message"]
            held.close()
        until(lambda: worker.num_pending == 0, "the held stream and the first of the n requests to end")
        # more than the bound could ever admit is a 400 naming n, before any is submitted (not a 429 to retry)
        err = _error(lambda: c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2, n=3))
        assert err.status_code == 400 and err.body["param"] == "n" and "max_pending_requests=2" in err.body["message"]
        assert worker.num_pending == 0


def test_drain_finishes_running_streams_and_refuses_new_calls(tiny):
    s = ServerThread(tiny, ServerConfig(port=0, http_port=0, grace=HANG, model_name="tiny")).start()
    worker = s.server.worker
    with openai.OpenAI(base_url=s.http_url, api_key="x", max_retries=0, timeout=HANG) as c:
        worker.limit_steps(STEP_LIMIT)  # the stream cannot finish until the limit is lifted
        stream = iter(c.completions.create(model="tiny", prompt=[3, 4, 5], stream=True, **LONG))
        tokens = list(next(stream).choices[0].token_ids)
        stopper = threading.Thread(target=s.stop)  # waits for the stream: the grace is HANG
        stopper.start()
        until(lambda: _raw(s.http_url, "/health")[0] == 503, "the drain to begin")
        err = _error(lambda: c.completions.create(model="tiny", prompt=[1, 2], max_tokens=2))
        assert err.status_code == 503 and "server is shutting down" in err.body["message"]
        assert stopper.is_alive()  # still draining: the stream is running
        worker.limit_steps(None)
        chunks = list(stream)
    tokens += [t for ch in chunks for t in ch.choices[0].token_ids]
    assert chunks[-1].choices[0].finish_reason == "length" and len(tokens) == LONG["max_tokens"]
    stopper.join(HANG)
    assert not stopper.is_alive()


def test_streams_past_the_grace_end_with_an_error_event(tiny):
    s = ServerThread(tiny, ServerConfig(port=0, http_port=0, grace=0, model_name="tiny")).start()
    s.server.worker.limit_steps(STEP_LIMIT)  # the stream cannot finish: the grace (0 s) ends it
    with openai.OpenAI(base_url=s.http_url, api_key="x", max_retries=0, timeout=HANG) as c:
        stream = iter(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}],
                                                stream=True, **LONG))  # fmt: skip
        assert next(stream).choices[0].delta.role == "assistant"
        s.stop()
        with pytest.raises(openai.APIError) as err:
            list(stream)
    assert "server is shutting down: the call did not finish within the 0 s grace" in str(err.value.message)


def test_chat_logprobs_bytes_are_each_tokens_own_bytes(tiny):
    """OpenAI's chat logprobs `bytes`: a byte-level token inside a multi-byte character gives its own byte (so a
    character's tokens add up to its UTF-8), not the UTF-8 of U+FFFD that the token decodes to alone; top_logprobs'
    entries too. The answer is held to the byte tokens of "é" and "€" (allowed_token_ids)."""
    from tokenizers import Tokenizer

    from checkpoints import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    fragments = sorted(set(tok.encode("é€", add_special_tokens=False).ids))
    assert all(tok.decode([t]) == "\ufffd" for t in fragments)
    config = ServerConfig(port=0, http_port=0, model_name="tiny")
    with ServerThread(tiny, config) as s, \
            openai.OpenAI(base_url=s.http_url, api_key="x", max_retries=0, timeout=HANG) as c:  # fmt: skip
        out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=4,
                                        temperature=1.0, seed=1, logprobs=True, top_logprobs=3,
                                        extra_body={"allowed_token_ids": fragments})  # fmt: skip
        choice = out.choices[0]
        own = dict(zip(fragments, tiny.token_bytes(fragments)))
        assert [bytes(e.bytes) for e in choice.logprobs.content] == [own[t] for t in choice.token_ids]
        assert all(len(own[t]) == 1 and own[t][0] >= 0x80 for t in fragments)
        for entry in choice.logprobs.content:
            assert all(bytes(top.bytes) != "\ufffd".encode() for top in entry.top_logprobs if top.token == "\ufffd")
