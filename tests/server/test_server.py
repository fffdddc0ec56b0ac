"""The gRPC server end to end: a real engine on a tiny random model, real PEFT adapters, a real server on
127.0.0.1 (port 0), and the real clients. No mocks.

Whatever a test must observe mid-generation (a cancellation, a full admission queue, streams sharing
steps, a passed deadline) is made certain with the worker's step limit (`EngineWorker.limit_steps`),
never by hoping that a request runs long enough. Every other time limit here is HANG: a guard against
a hang, never a margin that an event has to beat.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jalora import LLM, SamplingParams
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.client import AsyncClient, Client, ServerError, with_invocation
from server import cli
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import (
    ADAPTERS,
    EXTRA_ADAPTER,
    REPO,
    STEP_LIMIT,
    VOCAB,
    make_model_with_adapters,
    steps_limited,
)
from tests.waiting import HANG, until

ENGINE_ARGS = dict(max_num_seqs=32, max_num_batched_tokens=256, max_loras=4, max_lora_rank=8)
STARTUP_ADAPTERS = ("judge_a", "judge_b", "plain")
# Shared context of every request in the concurrency test: two full KV blocks (block_size 16) that a
# warm-up base request leaves in the prefix cache, so base and aLoRA requests alike must hit them.
CONTEXT = [(7 * i + 3) % 80 for i in range(40)]
# More tokens than STEP_LIMIT steps can make: a LONG request cannot finish while steps are limited.
LONG = dict(max_tokens=460, ignore_eos=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_model_with_adapters(tmp_path_factory.mktemp("server"))


def _llm(built) -> LLM:
    model_dir, dirs, _ = built
    llm = LLM(model_dir, **ENGINE_ARGS)
    for name in STARTUP_ADAPTERS:
        llm.load_adapter(name, dirs[name])
    return llm


@pytest.fixture(scope="module")
def offline(built):
    """The reference: the same engine configuration, driven offline through LLM.generate."""
    return _llm(built)


@pytest.fixture(scope="module")
def server(built):
    _, _, root = built
    with ServerThread(_llm(built).engine, ServerConfig(port=0, adapter_roots=[root])) as s:
        yield s


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=HANG) as c:
        yield c


def _wait_idle(client: Client, timeout: float = HANG):
    """Waits until no request is in flight and every KV block is back in the pool (free or cached)."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.server_info()
        if info.num_running_requests == 0 and info.num_free_blocks == info.num_total_blocks:
            return info
        assert time.monotonic() < deadline, f"server did not go idle: {info}"
        time.sleep(0.05)


def _pipeline_prompts():
    """32 requests: base, aLoRA judges and a plain LoRA, all over CONTEXT plus a request's own suffix."""
    judges = {name: tokens for name, (tokens, _, _) in ADAPTERS.items()}
    requests = []
    for i in range(32):
        suffix = [(5 * i + k) % 80 for k in range(3 + i % 5)]
        adapter = [None, "judge_a", None, "judge_b", None, "judge_a", "plain", "judge_b"][i % 8]
        prompt = CONTEXT + suffix + (judges[adapter] if adapter and judges[adapter] else [])
        requests.append((prompt, adapter, SamplingParams(max_tokens=6 + i % 7)))
    return requests


def test_concurrent_streams_match_offline_generate(server, offline, client):
    requests = _pipeline_prompts()
    expected = offline.generate([r[0] for r in requests], [r[2] for r in requests], [r[1] for r in requests])

    client.generate(CONTEXT, max_tokens=1)  # the base model computes CONTEXT's KV once

    async def one(prompt, adapter, params):
        async with AsyncClient(server.target, timeout=HANG) as c:
            chunks = [ch async for ch in c.generate_stream(prompt, adapter, max_tokens=params.max_tokens)]
        return chunks

    async def all_at_once():
        # No step runs until every request is in the engine, so they must share steps.
        with steps_limited(server.server.worker, 0):
            tasks = [asyncio.create_task(one(*r)) for r in requests]
            async with AsyncClient(server.target, timeout=HANG) as c:
                deadline = time.monotonic() + HANG
                while (await c.server_info()).num_running_requests < len(requests):
                    assert time.monotonic() < deadline and not any(t.done() for t in tasks)
                    await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks)

    results = asyncio.run(all_at_once())
    for (prompt, adapter, _), chunks, ref in zip(requests, results, expected):
        final = chunks[-1]
        assert final.finished and all(not c.finished for c in chunks[:-1])
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == ref.token_ids, (adapter, prompt)
        assert "".join(c.text for c in chunks) == ref.text
        assert final.finish_reason == ref.finish_reason
        assert final.activation_index == ref.activation_start
        assert final.usage.prompt_tokens == len(prompt)
        assert final.usage.completion_tokens == len(ref.token_ids)
        # The two full blocks of CONTEXT were computed by the base model: base and aLoRA requests
        # (whose activation comes after CONTEXT) reuse them; a plain LoRA adapts every token.
        if adapter != "plain":
            assert final.usage.cached_tokens >= 32, (adapter, final.usage)
        t = final.timings
        assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    kinds = {a for _, a, _ in requests}
    assert kinds == {None, "judge_a", "judge_b", "plain"}
    assert server.server.worker.max_outputs_per_step > 1  # concurrent streams shared engine steps
    _wait_idle(client)


def test_text_prompt_logprobs_and_tokenize_match_offline(offline, client):
    ids = client.tokenize("t5 t6 t7 t8")
    assert ids == [5, 6, 7, 8]
    params = SamplingParams(max_tokens=5, logprobs=2, prompt_logprobs=True)
    [ref] = offline.generate([ids + [90, 91]], params, "judge_a")
    result = client.generate(
        client.with_invocation("t5 t6 t7 t8", "judge_a"), "judge_a", max_tokens=5, logprobs=2, prompt_logprobs=True
    )
    assert result.token_ids == ref.token_ids and result.activation_index == 4
    assert len(result.logprobs) == len(ref.logprobs)
    for got, want in zip(result.logprobs, ref.logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-5 for k in want)
    assert result.prompt_logprobs[0] == {}
    for i, want in enumerate(ref.prompt_logprobs[1:], start=1):
        assert abs(result.prompt_logprobs[i][ref.prompt_token_ids[i]] - want) < 1e-5

    # min_p travels too: at 1 only the most likely token stays, so a sampled request draws the greedy tokens, and
    # the same seed and min_p give the offline tokens
    sampled = dict(max_tokens=6, temperature=1.0, seed=5)
    assert client.generate(ids, min_p=1.0, **sampled).token_ids == client.generate(ids, max_tokens=6).token_ids
    [ref_min_p] = offline.generate([ids], SamplingParams(min_p=0.2, **sampled))
    assert client.generate(ids, min_p=0.2, **sampled).token_ids == ref_min_p.token_ids
    # min_tokens: the greedy answer's first token as a stop token waits for the 4th
    free = client.generate(ids, max_tokens=6, ignore_eos=True).token_ids
    held = client.generate(ids, max_tokens=6, ignore_eos=True, stop_token_ids=[free[0]], min_tokens=4).token_ids
    [ref_held] = offline.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[free[0]],
                                                        min_tokens=4))  # fmt: skip
    assert held == ref_held.token_ids and len(held) >= 4 and free[0] not in held[:4]
    # and logit_bias (a map in the message): +100 on one token makes it every token, greedy or sampled
    assert client.generate(ids, max_tokens=4, logit_bias={5: 100.0}).token_ids == [5] * 4
    [ref_bias] = offline.generate([ids], SamplingParams(logit_bias={7: 3.0, 9: -2.0}, **sampled))
    assert client.generate(ids, logit_bias={7: 3.0, 9: -2.0}, **sampled).token_ids == ref_bias.token_ids

    # stop strings travel too (the proto used to have no place for them)
    [free] = offline.generate("t5 t6 t7 t8", SamplingParams(max_tokens=8, ignore_eos=True))
    stop = free.text.split()[2]  # a word of the answer
    [ref_stop] = offline.generate("t5 t6 t7 t8", SamplingParams(max_tokens=8, ignore_eos=True, stop=stop))
    got = client.generate("t5 t6 t7 t8", max_tokens=8, ignore_eos=True, stop=stop)
    assert (got.text, got.token_ids, got.finish_reason) == (ref_stop.text, ref_stop.token_ids, "stop")
    assert len(got.token_ids) < 8 and stop not in got.text

    # the penalties travel too: the offline tokens with the same penalties, which differ from the plain ones
    penalties, again = dict(presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.6), [5, 6, 5, 6, 7]
    [ref_pen] = offline.generate([again], SamplingParams(max_tokens=12, ignore_eos=True, **penalties))
    assert client.generate(again, max_tokens=12, ignore_eos=True, **penalties).token_ids == ref_pen.token_ids
    assert ref_pen.token_ids != client.generate(again, max_tokens=12, ignore_eos=True).token_ids
    # a 64-bit seed (the proto's int64), as offline
    [ref_seed] = offline.generate([again], SamplingParams(max_tokens=6, temperature=1.0, seed=-(2**40) - 3))
    assert client.generate(again, max_tokens=6, temperature=1.0, seed=-(2**40) - 3).token_ids == ref_seed.token_ids
    # allowed_token_ids too
    allowed = [9, 13, 40, 77]
    [ref_allowed] = offline.generate([again], SamplingParams(max_tokens=8, ignore_eos=True, allowed_token_ids=allowed))
    assert client.generate(again, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed).token_ids == \
        ref_allowed.token_ids  # fmt: skip
    assert set(ref_allowed.token_ids) <= set(allowed)
    # and truncate_prompt_tokens: a prompt longer than max_model_len keeps its last 12 tokens
    long = [5 + i % 80 for i in range(client.server_info().max_model_len + 40)]
    cut = client.generate(long, max_tokens=4, truncate_prompt_tokens=12)
    assert cut.prompt_token_ids == long[-12:]
    assert cut.token_ids == client.generate(long[-12:], max_tokens=4).token_ids

    text = client.generate("t5 t6 t7 t8", max_tokens=4, request_id="mine-1")
    [ref_text] = offline.generate("t5 t6 t7 t8", SamplingParams(max_tokens=4))
    assert text.request_id == "mine-1"
    assert text.token_ids == ref_text.token_ids and text.text == ref_text.text


def test_text_flags_are_keywords_of_both_clients_like_offline(server, offline, client):
    """skip_special_tokens and include_stop_str_in_output are keywords of generate / generate_stream as every other
    sampling field is (generate_stream had no parameter for them: a TypeError, only params= reached them), for the
    sync and the async client alike; the text is the offline one."""
    eos = VOCAB - 1  # the special "</s>"
    special = dict(max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})  # every token is "</s>"
    [ref_special] = offline.generate([[5, 6, 7, 8]], SamplingParams(skip_special_tokens=False, **special))
    assert ref_special.token_ids == [eos] * 3 and ref_special.text.split() == ["</s>"] * 3
    [free] = offline.generate("t5 t6 t7 t8", SamplingParams(max_tokens=8, ignore_eos=True))
    stop = free.text.split()[2]  # a word of the answer
    with_stop = dict(max_tokens=8, ignore_eos=True, stop=stop)
    [ref_stop] = offline.generate("t5 t6 t7 t8", SamplingParams(include_stop_str_in_output=True, **with_stop))
    assert ref_stop.text.endswith(stop)

    got = client.generate([5, 6, 7, 8], skip_special_tokens=False, **special)
    assert (got.token_ids, got.text) == (ref_special.token_ids, ref_special.text)
    got = client.generate("t5 t6 t7 t8", include_stop_str_in_output=True, **with_stop)
    assert (got.token_ids, got.text, got.finish_reason) == (ref_stop.token_ids, ref_stop.text, "stop")

    async def run():
        async with AsyncClient(server.target, timeout=HANG) as c:
            special_text = await c.generate([5, 6, 7, 8], skip_special_tokens=False, **special)
            stop_text = await c.generate("t5 t6 t7 t8", include_stop_str_in_output=True, **with_stop)
            return special_text.text, stop_text.text

    assert asyncio.run(run()) == (ref_special.text, ref_stop.text)


def test_chat_renders_the_conversation_like_offline(offline, client):
    """A `messages` request is the conversation in the model's chat template (t1 .. t2 turns, t3 the
    generation prompt); for an aLoRA adapter, with the invocation asked for, the invocation takes the
    generation prompt's place and activates there."""
    messages = [{"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t7"}]
    ids = offline.engine.apply_chat_template(messages)
    assert ids == [1, 5, 6, 2, 1, 7, 2, 3] == client.tokenize(messages)
    assert client.tokenize(messages, add_generation_prompt=False) == ids[:-1]
    [ref] = offline.generate([ids], SamplingParams(max_tokens=4))
    base = client.chat(messages, max_tokens=4)
    assert base.token_ids == ref.token_ids and base.usage.prompt_tokens == len(ids)

    judged = client.chat(messages, "judge_a", max_tokens=3)
    want = offline.engine.apply_chat_template(messages, add_generation_prompt=False) + [90, 91]
    [ref] = offline.generate([want], SamplingParams(max_tokens=3), "judge_a")
    assert judged.token_ids == ref.token_ids and judged.activation_index == len(want) - 2
    with pytest.raises(ServerError) as err:  # without the invocation the rendered chat lacks it
        client.chat(messages, "judge_a", with_invocation=False, max_tokens=3)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ServerError) as err:
        client.chat([], max_tokens=3)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServerError) as err:
        client.chat([{"role": "", "content": "t5"}], max_tokens=3)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "messages[0].role"
    # append_invocation on a token-id prompt: the same request as appending the tokens by hand.
    again = client.generate([5, 6, 7], "judge_a", append_invocation=True, max_tokens=3)
    assert again.token_ids == client.generate([5, 6, 7, 90, 91], "judge_a", max_tokens=3).token_ids
    # and with truncate_prompt_tokens: the model sees the last 4 of ids + invocation, so of the ids sent it kept the
    # last 2 (prompt_token_ids held the last 4 sent, two of which the model never saw)
    cut = client.generate([5, 6, 7, 8], "judge_a", append_invocation=True, max_tokens=3, truncate_prompt_tokens=4)
    assert cut.usage.prompt_tokens == 4 and cut.activation_index == 2 and cut.prompt_token_ids == [7, 8]
    assert cut.token_ids == client.generate([7, 8, 90, 91], "judge_a", max_tokens=3).token_ids


def test_step_limit_holds_requests_but_serves_calls(server, client):
    """The seam the cancellation tests rely on: a spent limit stops the steps, not the commands."""
    worker = server.server.worker
    # Counted with no step able to run (an earlier request may leave one more queued step behind it):
    # the call's round trip proves the engine thread took the zero limit.
    worker.limit_steps(0)
    client.server_info()
    steps, aborted = worker.num_steps, worker.num_aborted
    with steps_limited(worker):
        stream = client.generate_stream(CONTEXT[:21], **LONG)
        assert next(stream).token_ids
        until(lambda: worker.num_steps == steps + STEP_LIMIT, "the step limit to be spent")
        assert client.server_info().num_running_requests == 1  # an engine call, served while held
        assert worker.num_steps == steps + STEP_LIMIT
        stream.close()
        until(lambda: worker.num_aborted == aborted + 1, "the cancellation to reach the engine")
    _wait_idle(client)


def test_cancel_mid_stream_frees_blocks(server, client):
    worker = server.server.worker
    aborted = worker.num_aborted
    with steps_limited(worker):
        stream = client.generate_stream(CONTEXT[:20], **LONG)
        first, second = next(stream), next(stream)
        assert first.token_ids and second.token_ids and not second.finished
        stream.close()  # cancels the call
        until(lambda: worker.num_aborted == aborted + 1, "the cancellation to reach the engine")
    _wait_idle(client)
    assert worker.num_aborted == aborted + 1
    assert client.generate(CONTEXT[:20], max_tokens=3).finish_reason == "length"


def test_async_cancel_and_deadline_abort_the_request(server, client):
    worker = server.server.worker
    aborted = worker.num_aborted

    async def cancel_task():
        async with AsyncClient(server.target) as c:
            got = asyncio.Event()

            async def consume():
                async for _ in c.generate_stream(CONTEXT[:18], **LONG):
                    got.set()

            task = asyncio.create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with steps_limited(worker):
        asyncio.run(cancel_task())
        until(lambda: worker.num_aborted == aborted + 1, "the cancellation to reach the engine")
    _wait_idle(client)
    assert worker.num_aborted == aborted + 1

    # Under the step limit the request cannot finish, so its deadline passes while it runs. But the
    # deadline starts with the call, which could outlast it before reaching the engine (a slow
    # machine): a first chunk proves the request is in the engine first, and an attempt without one is
    # repeated with twice the deadline (each step limit is that attempt's own).
    late = 0  # attempts whose deadline came first: each may still reach the engine, and then be aborted
    timeout = 0.5
    with steps_limited(worker):
        while True:
            worker.limit_steps(STEP_LIMIT)
            stream = client.generate_stream(CONTEXT[:19], timeout=timeout, **LONG)
            try:
                assert next(stream).token_ids
                break
            except ServerError as err:
                assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
                late, timeout = late + 1, timeout * 2
        with pytest.raises(ServerError) as err:
            for _ in stream:  # LONG cannot finish within the step limit: only the deadline ends this
                pass
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        until(lambda: worker.num_aborted >= aborted + 2, "the deadline's abort to reach the engine")
    _wait_idle(client)
    assert aborted + 2 <= worker.num_aborted <= aborted + 2 + late


_DISCONNECTING_CLIENT = """
import sys
import threading
import grpc
from jalora.api.v1 import jalora_pb2 as pb, jalora_pb2_grpc as pb_grpc
stub = pb_grpc.JaloraStub(grpc.insecure_channel(sys.argv[1]))
request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(1, 17))),
                             sampling=pb.SamplingParams(max_tokens=460, ignore_eos=True))
for message in stub.Generate(request):
    print("streaming", flush=True)
"""


def test_client_killed_mid_stream_frees_blocks(server, client):
    worker = server.server.worker
    aborted = worker.num_aborted
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with steps_limited(worker):
        proc = subprocess.Popen(
            [sys.executable, "-c", _DISCONNECTING_CLIENT, server.target], stdout=subprocess.PIPE, env=env, cwd=REPO
        )
        try:
            assert proc.stdout.readline().strip() == b"streaming"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=HANG)
        until(lambda: worker.num_aborted == aborted + 1, "the disconnection to reach the engine")
    _wait_idle(client)
    assert worker.num_aborted == aborted + 1
    assert client.generate([1, 2, 3], max_tokens=2).usage.completion_tokens == 2


def _generate_request(**kwargs) -> pb.GenerateRequest:
    sampling = kwargs.pop("sampling", {})
    return pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **kwargs)


IDS = pb.TokenIds(ids=[1, 2, 3, 4])
BAD_GENERATE = {
    "no prompt": (_generate_request(), "INVALID_ARGUMENT", "prompt"),
    "empty text": (_generate_request(text=""), "INVALID_ARGUMENT", "prompt.text"),
    "empty ids": (_generate_request(token_ids=pb.TokenIds()), "INVALID_ARGUMENT", "prompt.token_ids"),
    "id past vocab": (_generate_request(token_ids=pb.TokenIds(ids=[1, 97])), "INVALID_ARGUMENT", "prompt_token_ids"),
    "negative id": (_generate_request(token_ids=pb.TokenIds(ids=[-1])), "INVALID_ARGUMENT", "prompt_token_ids"),
    "oversized prompt": (
        _generate_request(token_ids=pb.TokenIds(ids=[1] * 600)), "INVALID_ARGUMENT", "prompt"
    ),
    "max_tokens 0": (_generate_request(token_ids=IDS, sampling=dict(max_tokens=0)), "INVALID_ARGUMENT",
                     "sampling.max_tokens"),
    "temperature < 0": (_generate_request(token_ids=IDS, sampling=dict(temperature=-1)), "INVALID_ARGUMENT",
                        "sampling.temperature"),
    "temperature nan": (_generate_request(token_ids=IDS, sampling=dict(temperature=float("nan"))),
                        "INVALID_ARGUMENT", "sampling.temperature"),
    "top_p 0": (_generate_request(token_ids=IDS, sampling=dict(top_p=0.0)), "INVALID_ARGUMENT", "sampling.top_p"),
    "top_p > 1": (_generate_request(token_ids=IDS, sampling=dict(top_p=1.5)), "INVALID_ARGUMENT", "sampling.top_p"),
    "top_k < -1": (_generate_request(token_ids=IDS, sampling=dict(top_k=-2)), "INVALID_ARGUMENT", "sampling.top_k"),
    "min_p > 1": (_generate_request(token_ids=IDS, sampling=dict(min_p=1.5)), "INVALID_ARGUMENT", "sampling.min_p"),
    "repetition_penalty 0": (_generate_request(token_ids=IDS, sampling=dict(repetition_penalty=0.0)),
                             "INVALID_ARGUMENT", "sampling.repetition_penalty"),
    "presence_penalty > 2": (_generate_request(token_ids=IDS, sampling=dict(presence_penalty=3.0)),
                             "INVALID_ARGUMENT", "sampling.presence_penalty"),
    "stop too long": (_generate_request(token_ids=IDS, sampling=dict(stop=["x" * 300])), "INVALID_ARGUMENT",
                      "sampling.stop"),
    "min_tokens > max_tokens": (_generate_request(token_ids=IDS, sampling=dict(min_tokens=9, max_tokens=2)),
                                "INVALID_ARGUMENT", "sampling.min_tokens"),
    "logit_bias > 100": (_generate_request(token_ids=IDS, sampling=dict(logit_bias={5: 101.0})), "INVALID_ARGUMENT",
                         "sampling.logit_bias"),
    "logit_bias past vocab": (_generate_request(token_ids=IDS, sampling=dict(logit_bias={97: 1.0})),
                              "INVALID_ARGUMENT", "logit_bias"),
    "logprobs 100": (_generate_request(token_ids=IDS, sampling=dict(logprobs=100)), "INVALID_ARGUMENT",
                     "sampling.logprobs"),
    "stop id < 0": (_generate_request(token_ids=IDS, sampling=dict(stop_token_ids=[-3])), "INVALID_ARGUMENT",
                    "sampling.stop_token_ids"),
    "long request_id": (_generate_request(token_ids=IDS, request_id="x" * 300), "INVALID_ARGUMENT", "request_id"),
    "unknown adapter": (_generate_request(token_ids=IDS, adapter="nope"), "NOT_FOUND", "adapter"),
    "missing invocation": (_generate_request(token_ids=IDS, adapter="judge_a"), "FAILED_PRECONDITION", "prompt"),
}  # fmt: skip


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="jalora.v1.Jalora"))
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_request_gets_status_naming_the_field(server, case):
    request, code, field = BAD_GENERATE[case]
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(pb_grpc.JaloraStub(channel).Generate(request, timeout=HANG))
    assert err.value.code().name == code, err.value.details()
    assert err.value.details().startswith(f"{field}: ")
    assert err.value.details().lower().count(field.lower()) == 1, err.value.details()  # said once
    assert dict(err.value.trailing_metadata()).get("jalora-field") == field
    assert _health(server.target) == "SERVING"


def test_adapter_management_and_path_roots(server, client, built):
    _, dirs, root = built
    listed = {a.name: a for a in client.list_adapters()}
    assert set(listed) == set(STARTUP_ADAPTERS)
    assert listed["judge_a"].kind == "alora" and listed["judge_a"].invocation_tokens == [90, 91]
    assert listed["plain"].kind == "lora" and listed["plain"].invocation_tokens is None
    assert listed["judge_b"].rank == 8 and "gate_proj" in listed["judge_b"].targets

    name, tokens, _, _ = EXTRA_ADAPTER
    info = client.load_adapter(name, name)  # relative to the adapter root
    assert info.kind == "alora" and info.invocation_tokens == tokens and len(info.identity) == 64
    result = client.generate(with_invocation([1, 2, 3], info), name, max_tokens=3)
    assert result.activation_index == 3 and result.usage.completion_tokens == 3

    def code_of(call, *args):
        with pytest.raises(ServerError) as err:
            call(*args)
        assert err.value.details
        return err.value.code.name

    assert code_of(client.load_adapter, name, name) == "INVALID_ARGUMENT"  # already loaded
    assert code_of(client.load_adapter, "fifth", dirs["plain"]) == "RESOURCE_EXHAUSTED"  # max_loras slots full
    client.unload_adapter(name)
    assert client.load_adapter("judge_c_abs", dirs[name]).identity == info.identity  # absolute path
    client.unload_adapter("judge_c_abs")
    assert code_of(client.generate, with_invocation([1, 2, 3], info), name) == "NOT_FOUND"
    assert code_of(client.unload_adapter, name) == "NOT_FOUND"
    assert code_of(client.load_adapter, "x", "/etc") == "PERMISSION_DENIED"
    assert code_of(client.load_adapter, "x", "../model") == "PERMISSION_DENIED"
    assert code_of(client.load_adapter, "x", os.path.join(root, "..", "model")) == "PERMISSION_DENIED"
    assert code_of(client.load_adapter, "x", "missing") == "NOT_FOUND"
    assert code_of(client.load_adapter, "x", ".") == "INVALID_ARGUMENT"  # the root itself: no adapter files
    assert code_of(client.load_adapter, "", name) == "INVALID_ARGUMENT"
    assert {a.name for a in client.list_adapters()} == set(STARTUP_ADAPTERS)
    assert _health(server.target) == "SERVING"


def test_cli_with_invocation_of_a_plain_lora_is_one_line(server, capsys):
    """`jalora generate --with-invocation` needs an adapter that has an invocation sequence."""
    assert cli.main(["generate", "t1 t2", "--adapter", "plain", "--with-invocation", "--target", server.target]) == 2
    assert capsys.readouterr() == (
        "", "jalora generate: --with-invocation: adapter 'plain' is a lora adapter without invocation tokens\n"
    )


def test_cli_chat_sends_a_user_message(server, offline, capsys):
    """`jalora generate --chat` renders PROMPT as a user turn of the chat template; with an aLoRA adapter
    and --with-invocation the invocation opens the judge's turn."""
    target = ["--target", server.target, "--max-tokens", "3", "--show-ids"]
    assert cli.main(["generate", "t5 t6", "--chat", *target]) == 0
    [ref] = offline.chat([{"role": "user", "content": "t5 t6"}], SamplingParams(max_tokens=3))
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in ref.token_ids] and "prompt=5 " in err  # t1 t5 t6 t2 t3
    assert cli.main(["generate", "t5 t6", "--chat", "--adapter", "judge_a", "--with-invocation", *target]) == 0
    assert "activation=4 " in capsys.readouterr().err  # t1 t5 t6 t2, then the invocation t90 t91


def test_server_info_health_and_reflection(server, client, built):
    info = client.server_info()
    assert info.vocab_size == 97 and info.eos_token_ids == [96] and info.block_size == 16
    assert info.max_num_seqs == 32 and info.max_loras == 4 and info.platform == "cpu"
    assert info.adapter_roots == [built[2]] and info.num_total_blocks > 0
    assert client.health(timeout=HANG) == "SERVING" and _health(server.target) == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [answer] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in answer.list_services_response.service}
        [described] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="jalora.v1.Jalora")])
        )
    assert {"jalora.v1.Jalora", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_admission_queue_full_is_resource_exhausted(offline, built):
    """A second server (on the reference engine, now idle) that admits two requests at a time."""
    config = ServerConfig(port=0, max_pending_requests=2)
    with ServerThread(offline.engine, config) as small, Client(small.target, timeout=HANG) as c:
        worker = small.server.worker
        with steps_limited(worker, 0):  # no step until both LONG streams are in the engine
            streams = [c.generate_stream(CONTEXT[:10 + i], **LONG) for i in range(2)]
            # A stream is sent by its first next(), which returns with the first step: read it on a thread.
            openers = [threading.Thread(target=next, args=(s,)) for s in streams]
            for t in openers:
                t.start()
            until(lambda: worker.num_pending == 2, "both streams to be submitted")
            c.server_info()  # an engine command queued after both adds: they have reached the engine
            worker.limit_steps(STEP_LIMIT)  # both prefill in the first step; neither can finish
            for t in openers:
                t.join(HANG)
                assert not t.is_alive()
            with pytest.raises(ServerError) as err:
                c.generate([1, 2, 3], max_tokens=2)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_requests" in err.value.details
            assert c.server_info().num_running_requests == 2
            for s in streams:
                s.close()
        _wait_idle(c)
        assert c.generate([1, 2, 3], max_tokens=2).usage.completion_tokens == 2
        assert c.health(timeout=HANG) == "SERVING"
