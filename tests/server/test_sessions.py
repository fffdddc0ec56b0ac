"""Pipeline sessions through the real servers on loopback: Generate's session fields, EndSession, the
Pipeline RPC (its judges reuse the base's blocks, its session ends with the call), the HTTP extension
fields, the engine thread's expiry of idle sessions (the engine's clock is the test's), and bad input
refused naming the field with nothing left retained. No mocks."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from jalora import LLM
from jalora.api.limits import MAX_STOP_TOKEN_IDS
from jalora.client import AsyncClient, Client, PipelineJudge, ServerError
from jalora.errors import InvalidRequestError
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import ADAPTERS, make_model_with_adapters
from tests.server.test_metrics import scrape, value
from tests.waiting import HANG

B = 8  # block size
ENGINE_ARGS = dict(block_size=B, num_kv_blocks=40, max_num_seqs=8, max_num_batched_tokens=64, max_loras=2,
                   max_lora_rank=8, warmup=False, session_cache_share=0.5, max_session_ttl=100.0)  # fmt: skip
INV = ADAPTERS["judge_a"][0]  # [90, 91]
PROMPT = [(7 * i + 3) % 80 for i in range(21)]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, dirs, root = make_model_with_adapters(tmp_path_factory.mktemp("sessions"))
    clock = Clock()
    llm = LLM(model_dir, clock=clock, **ENGINE_ARGS)
    for name in ("judge_a", "plain"):
        llm.load_adapter(name, dirs[name])
    config = ServerConfig(port=0, http_port=0, metrics_port=0, adapter_roots=[root])
    with ServerThread(llm.engine, config) as s, Client(s.target, timeout=HANG) as c:
        yield s, c, clock, model_dir, dirs


@pytest.fixture
def client(setup):
    server, c = setup[:2]
    yield c
    info = c.server_info()  # every test leaves nothing retained, nothing held
    assert info.num_free_blocks == info.num_total_blocks and info.num_running_requests == 0


def test_pipeline_streams_base_then_judges_that_reuse_its_blocks(setup, client):
    greedy = dict(max_tokens=11, ignore_eos=True)
    judges = [
        PipelineJudge("judge_a", sampling=dict(max_tokens=3, ignore_eos=True)),
        PipelineJudge("judge_a", invocation_text="t90 t91", sampling=dict(max_tokens=5, ignore_eos=True)),
    ]
    stages = list(client.pipeline(PROMPT, judges, **greedy))
    assert [s.judge for s in stages[:1]] == [None] and sorted(s.judge for s in stages[1:]) == [0, 1]
    base = stages[0]
    context = PROMPT + base.token_ids
    full = (len(context) - 1) // B * B  # every full block the base computed (its last token's KV never is)
    assert base.usage.cached_tokens == 0
    by_judge = {s.judge: s for s in stages[1:]}
    assert [by_judge[k].usage.cached_tokens for k in (0, 1)] == [full, full] and full == 24
    # The oracle: the same server's Generate without sessions.
    assert base.token_ids == client.generate(PROMPT, **greedy).token_ids
    for k, n in ((0, 3), (1, 5)):
        j = client.generate(context + INV, "judge_a", max_tokens=n, ignore_eos=True)
        got = by_judge[k]
        assert got.token_ids == j.token_ids and got.adapter == "judge_a" and got.activation_index == len(context)
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert setup[0].server.worker.engine.stats().num_sessions == 0  # the call's session ended with it

    async def async_pipeline():
        async with AsyncClient(setup[0].target, timeout=HANG) as c:
            return [stage async for stage in c.pipeline(PROMPT, judges, **greedy)]

    again = asyncio.run(async_pipeline())  # AsyncClient: the same stages, the base first
    assert again[0].judge is None and again[0].token_ids == base.token_ids
    assert {s.judge: s.token_ids for s in again[1:]} == {k: by_judge[k].token_ids for k in (0, 1)}


@pytest.mark.parametrize(
    "judges, code, field",
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "judges"),
        ([PipelineJudge("nope")], grpc.StatusCode.NOT_FOUND, "judges[0].adapter"),
        ([PipelineJudge("judge_a"), PipelineJudge("plain")], grpc.StatusCode.INVALID_ARGUMENT,
         "judges[1].invocation_text"),
        ([PipelineJudge(None)], grpc.StatusCode.INVALID_ARGUMENT, "judges[0].invocation_text"),
        ([PipelineJudge("judge_a", sampling=dict(top_p=2.0))], grpc.StatusCode.INVALID_ARGUMENT,
         "judges[0].sampling.top_p"),
        ([PipelineJudge("judge_a", sampling=dict(truncate_prompt_tokens=8))], grpc.StatusCode.INVALID_ARGUMENT,
         "judges[0].sampling.truncate_prompt_tokens"),
        ([PipelineJudge("judge_a", invocation_text="t5")], grpc.StatusCode.FAILED_PRECONDITION, "prompt"),
        ([PipelineJudge("judge_a"), PipelineJudge("judge_a", invocation_text="t90 t91 " + "t5 " * 1000)],
         grpc.StatusCode.INVALID_ARGUMENT, "judges[1].invocation_text"),
    ],
)  # fmt: skip
def test_bad_pipeline_is_refused_naming_the_field(setup, client, judges, code, field):
    """Refused before the base model runs, but for an invocation that is not the adapter's (found only in the
    judge's own prompt)."""
    before = setup[0].server.worker.engine.stats().generation_tokens
    with pytest.raises(ServerError) as e:
        list(client.pipeline(PROMPT, judges, max_tokens=2))
    assert (e.value.code, e.value.field) == (code, field), e.value
    ran = setup[0].server.worker.engine.stats().generation_tokens - before
    assert ran == (2 if field == "prompt" else 0), ran
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert setup[0].server.worker.engine.stats().num_sessions == 0


def test_pipeline_base_sampling_is_bounded_as_generates(setup, client):
    """The base answer's sampling is held to the bounds of Generate's and of each judge's: more than
    MAX_STOP_TOKEN_IDS stop ids are refused naming the field, before anything runs (the base's were not checked
    and ran)."""
    before = setup[0].server.worker.engine.stats().generation_tokens
    too_many = [1] * (MAX_STOP_TOKEN_IDS + 1)
    with pytest.raises(ServerError) as e:
        list(client.pipeline(PROMPT, [PipelineJudge("judge_a")], max_tokens=2, stop_token_ids=too_many))
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids"), e.value
    assert setup[0].server.worker.engine.stats().generation_tokens == before
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert setup[0].server.worker.engine.stats().num_sessions == 0


def test_pipeline_stages_carry_prompt_logprobs(client):
    """A stage whose sampling asks for prompt_logprobs has them, as a Generate of the same prompt does (the server sent
    them in each stage's completion; PipelineStage had no place for them and dropped them)."""
    judges = [PipelineJudge("judge_a", sampling=dict(max_tokens=2, prompt_logprobs=True)), PipelineJudge("judge_a")]
    stages = list(client.pipeline(PROMPT, judges, max_tokens=5, ignore_eos=True, prompt_logprobs=True))
    base, by_judge = stages[0], {s.judge: s for s in stages[1:]}
    context = PROMPT + base.token_ids
    for got, want in ((base, client.generate(PROMPT, max_tokens=5, ignore_eos=True, prompt_logprobs=True)),
                      (by_judge[0], client.generate(context + INV, "judge_a", max_tokens=2, prompt_logprobs=True))):
        assert got.token_ids == want.token_ids and len(got.prompt_logprobs) == len(want.prompt_logprobs)
        assert got.prompt_logprobs[0] == {} and len(want.prompt_logprobs) == got.usage.prompt_tokens
        for g, w in zip(got.prompt_logprobs, want.prompt_logprobs):
            assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-5 for t in w)
    assert by_judge[1].prompt_logprobs is None  # not asked


@pytest.mark.parametrize("base_tokens, judge_tokens, field", [
    (200, 2, "sampling.max_tokens"),
    (4, 200, "judges[0].sampling.max_tokens"),
])  # fmt: skip
def test_pipeline_past_the_session_share_names_its_own_field(setup, client, base_tokens, judge_tokens, field):
    """A stage whose max_tokens the call's session could not retain is refused naming that stage's max_tokens, a
    field of PipelineRequest (it named `session` or `judges[0].session`, which the request does not have: the
    session is the server's own), and nothing stays retained."""
    judges = [PipelineJudge("judge_a", sampling=dict(max_tokens=judge_tokens))]
    with pytest.raises(ServerError) as e:
        list(client.pipeline(PROMPT, judges, max_tokens=base_tokens))
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), e.value
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert setup[0].server.worker.engine.stats().num_sessions == 0


def test_pipeline_that_its_session_could_not_hold_is_refused_before_the_base_runs(setup, client):
    """Three judges that each fit, but whose worst case together (the base's blocks retained, each judge's own past
    them, whatever the answer's length) is more than a session may retain (20 blocks here), are refused before any
    token is generated, naming the judge that tips it over; at one token fewer each, the call is served in full
    (the engine's own checks, judge by judge, accept every stage: the bound is the engine's, not looser)."""
    engine = setup[0].server.worker.engine
    before = engine.stats().generation_tokens
    judges = [PipelineJudge("judge_a", sampling=dict(max_tokens=46, ignore_eos=True)) for _ in range(3)]
    stages = []
    with pytest.raises(ServerError) as e:
        for stage in client.pipeline(PROMPT, judges, max_tokens=4, ignore_eos=True):
            stages.append(stage)
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "judges[2].sampling.max_tokens")
    assert stages == [] and engine.stats().generation_tokens == before
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert engine.stats().num_sessions == 0
    judges = [PipelineJudge("judge_a", sampling=dict(max_tokens=41, ignore_eos=True)) for _ in range(3)]
    stages = list(client.pipeline(PROMPT, judges, max_tokens=4, ignore_eos=True))
    assert sorted(len(s.token_ids) for s in stages) == [4, 41, 41, 41]


def test_pipeline_with_a_plain_lora_judge_its_session_could_not_hold_is_refused_before_the_base_runs(setup, client):
    """A plain LoRA's blocks are keyed by its identity from the first, so its judge finds none of the base's retained
    blocks and the engine reserves all of its own beside them (21 + 4 tokens: 3 retained, then 19 of the judge's at
    130 tokens, past the 20 a session may retain): refused before the base runs (it was let through, and the judge
    refused after the base had generated); at 115 tokens (3 + 17) the call is served in full."""
    engine = setup[0].server.worker.engine
    before = engine.stats().generation_tokens

    def judge(max_tokens):
        return PipelineJudge("plain", invocation_text="t90 t91", sampling=dict(max_tokens=max_tokens, ignore_eos=True))

    stages = []
    with pytest.raises(ServerError) as e:
        for stage in client.pipeline(PROMPT, [judge(130)], max_tokens=4, ignore_eos=True):
            stages.append(stage)
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "judges[0].sampling.max_tokens")
    assert stages == [] and engine.stats().generation_tokens == before
    client.server_info()  # queued behind the call's clean-up on the engine thread
    assert engine.stats().num_sessions == 0
    stages = list(client.pipeline(PROMPT, [judge(115)], max_tokens=4, ignore_eos=True))
    assert [len(s.token_ids) for s in stages] == [4, 115]


def _engine_share_refusal(prompt_len, max_tokens, tails, judge_tokens, reuses, b, limit, share):
    """The oracle: the engine's own admission, answer length by answer length (Sessions.check_share, judge by judge,
    each reserving its full blocks less the retained blocks its prompt finds; a judge whose prompt reaches
    max_model_len is refused for it, with those after it). The first stage it could refuse for the share, or None."""
    if (min(prompt_len + max_tokens, limit) - 1) // b > share:
        return "sampling.max_tokens"
    for a in range(1, min(max_tokens, limit - prompt_len) + 1):
        retained = (prompt_len + a - 1) // b  # (Sessions.finish: the base's registered blocks)
        have = retained
        for k, (tail, m, reuse) in enumerate(zip(tails, judge_tokens, reuses)):
            if prompt_len + a + tail >= limit:
                break
            need = (min(prompt_len + a + tail + m, limit) - 1) // b - (retained if reuse else 0)
            if have + need > share:
                return f"judges[{k}].sampling.max_tokens"
            have += need
    return None


def test_the_up_front_share_check_refuses_exactly_what_the_engine_could():
    """Against the engine's admission tried at every answer length: the check refuses a call exactly when some answer
    length gets a stage refused for the share. Two judges that reach max_model_len at 60 tokens each (their blocks
    stop growing there while the retained ones still grow) are worst at an answer of 5 tokens, neither among the
    first block_size lengths nor the last (let through, and the second judge refused after the base ran); plain LoRA
    judges find none of the retained blocks."""
    import random
    import types

    from jalora.sampling_params import SamplingParams
    from server.pipeline import _check_share

    def check(prompt_len, max_tokens, tails, judge_tokens, reuses, b, limit, share):
        info = types.SimpleNamespace(block_size=b, max_model_len=limit, session_max_blocks=share)
        try:
            _check_share(prompt_len, SamplingParams(max_tokens=max_tokens), tails,
                         [SamplingParams(max_tokens=m) for m in judge_tokens], reuses, info)  # fmt: skip
        except InvalidRequestError as e:
            return e.field
        return None

    case = (46, 29, [2, 3], [8, 16], [True, True], 4, 70, 19)
    assert _engine_share_refusal(*case) == "judges[1].sampling.max_tokens" == check(*case)
    rng = random.Random(0)
    for _ in range(3000):
        b, limit, judges = rng.choice([2, 4, 8]), rng.randint(10, 80), rng.randint(1, 3)
        case = (rng.randint(1, limit - 3), rng.randint(1, 80), [rng.randint(1, 4) for _ in range(judges)],
                [rng.randint(1, 80) for _ in range(judges)], [rng.random() < 0.7 for _ in range(judges)], b, limit,
                rng.randint(1, 30))  # fmt: skip
        assert (check(*case) is None) == (_engine_share_refusal(*case) is None), case


def test_pipeline_truncates_its_prompt_as_generate_does(client):
    """truncate_prompt_tokens on the base: a prompt of token ids longer than max_model_len keeps its last 12 tokens,
    as Generate keeps them, and the judge reads those, the answer and its invocation (the judges were refused,
    their prompt counted at the ids' full length, and the share check counted those too)."""
    long = [5 + i % 80 for i in range(client.server_info().max_model_len + 40)]
    judges = [PipelineJudge("judge_a", sampling=dict(max_tokens=3, ignore_eos=True))]
    base, judge = client.pipeline(long, judges, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=12)
    assert base.usage.prompt_tokens == 12
    assert base.token_ids == client.generate(long[-12:], max_tokens=4, ignore_eos=True).token_ids
    want = client.generate(long[-12:] + base.token_ids + INV, "judge_a", max_tokens=3, ignore_eos=True)
    assert judge.token_ids == want.token_ids and judge.usage.prompt_tokens == 12 + 4 + len(INV)


def test_generate_session_end_session_and_expiry(setup, client):
    server, _, clock = setup[:3]
    engine = server.server.worker.engine
    prompt = PROMPT[::-1]  # not in the prefix cache yet
    out = client.generate(prompt, max_tokens=11, ignore_eos=True, session="s1", session_ttl=10)
    info = client.server_info()
    assert info.num_total_blocks - info.num_free_blocks == (len(prompt) + 11 - 1) // B == 3  # retained
    metrics = scrape(server)
    assert (value(metrics, "sessions"), value(metrics, "session_retained_blocks")) == (1, 3)
    judge = client.generate(prompt + out.token_ids + INV, "judge_a", max_tokens=2, session="s1")
    assert judge.usage.cached_tokens == 24
    client.end_session("s1")
    with pytest.raises(ServerError) as e:
        client.end_session("s1")
    assert (e.value.code, e.value.field) == (grpc.StatusCode.NOT_FOUND, "session")
    # end_session on the last request of a session
    client.generate(PROMPT, max_tokens=3, session="s2")
    client.generate(PROMPT, max_tokens=3, session="s2", end_session=True)
    assert engine.stats().num_sessions == 0
    # An idle session expires by the engine's clock: the engine thread checks it between commands.
    client.generate(PROMPT, max_tokens=3, session="s3", session_ttl=5)
    clock.t += 5
    # A command wakes the engine thread; the first turn that finds no command queued ends the session
    # (a call taken in the same turn as the waking one still sees its blocks).
    deadline = time.monotonic() + HANG
    while (info := client.server_info()).num_free_blocks != info.num_total_blocks:
        assert time.monotonic() < deadline, "the session did not expire"
    assert engine.stats().sessions_expired == 1
    metrics = scrape(server)  # the engine thread observed the expiry
    assert value(metrics, "sessions") == 0 and value(metrics, "sessions_ended_total", reason="expired") == 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(session="s", session_ttl=0), "session_ttl"),
        (dict(session="s", session_ttl=-3), "session_ttl"),
        (dict(session="s", session_ttl=float("inf")), "session_ttl"),
        (dict(session="s", session_ttl=100.5), "session_ttl"),  # over the server's max_session_ttl
        (dict(session_ttl=5), "session_ttl"),
        (dict(end_session=True), "end_session"),
        (dict(session="x" * 257), "session"),
        (dict(session="s", max_tokens=200), "session"),  # more blocks than session_cache_share allows
    ],
)
def test_bad_session_fields_are_invalid_argument(client, kwargs, field):
    with pytest.raises(ServerError) as e:
        client.generate(PROMPT, **{"max_tokens": 2, **kwargs})
    assert (e.value.code, e.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field), e.value


def test_http_session_extension(setup, client):
    server = setup[0]
    body = {"model": server.server.worker.engine.config.model, "prompt": PROMPT, "max_tokens": 11,
            "ignore_eos": True, "session": "h1", "session_ttl": 30}  # fmt: skip
    request = urllib.request.Request(server.http_url + "/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=HANG) as response:
        assert response.status == 200
    info = client.server_info()
    assert info.num_total_blocks - info.num_free_blocks == 3
    client.end_session("h1")
    bad = {**body, "session_ttl": "soon"}
    request = urllib.request.Request(server.http_url + "/completions", json.dumps(bad).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=HANG)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "session_ttl"


def test_pipeline_of_a_conversation(client):
    """A conversation is rendered with the chat template for the base; the judge extends those tokens."""
    conversation = [{"role": "user", "content": " ".join(f"t{(5 * i) % 80 + 4}" for i in range(20))}]
    rendered = client.tokenize(conversation)
    stages = list(client.pipeline(conversation, [PipelineJudge("judge_a")], max_tokens=9, ignore_eos=True))
    base, judge = stages
    assert base.token_ids == client.generate(rendered, max_tokens=9, ignore_eos=True).token_ids
    assert judge.activation_index == len(rendered) + 9 and judge.usage.prompt_tokens == len(rendered) + 9 + len(INV)
    assert judge.usage.cached_tokens == (len(rendered) + 9 - 1) // B * B


def test_pipeline_without_sessions_runs_its_stages_plainly(setup):
    """An engine whose sessions are off (session_cache_share 0) still serves Pipeline: the stages are those of the
    same requests sent alone (it used to fail at the base, on the session the call opened, naming a field the
    request does not have)."""
    model_dir, dirs = setup[3], setup[4]
    llm = LLM(model_dir, **{**ENGINE_ARGS, "session_cache_share": 0.0})
    llm.load_adapter("judge_a", dirs["judge_a"])
    with ServerThread(llm.engine, ServerConfig(port=0)) as s, Client(s.target, timeout=HANG) as c:
        base, judge = c.pipeline(PROMPT, [PipelineJudge("judge_a", sampling=dict(max_tokens=3))], max_tokens=4,
                                 ignore_eos=True)  # fmt: skip
        assert base.token_ids == c.generate(PROMPT, max_tokens=4, ignore_eos=True).token_ids
        assert judge.token_ids == c.generate(PROMPT + base.token_ids + INV, "judge_a", max_tokens=3).token_ids
        assert s.server.worker.engine.stats().num_sessions == 0
