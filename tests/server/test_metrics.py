"""Metrics and logs of a real server: a tiny random model with a real aLoRA adapter behind a real gRPC server
on 127.0.0.1, its Prometheus endpoint scraped over HTTP and parsed with prometheus_client's own parser, and
its access log read as JSON lines. The counters must equal what the test sent. No mocks; every time limit
is HANG, a guard against a hang, never a margin an event has to beat.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jalora import LLM
from jalora.client import AsyncClient, Client, ServerError
from server.app import ServerThread
from server.config import ServerConfig
from server.logs import ACCESS_LOGGER, REQUEST_ID, JsonFormatter, RateLimitFilter, RequestIdFilter
from tests.server.support import ADAPTERS, REPO, VOCAB, make_model_with_adapters
from tests.waiting import HANG, until

ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_loras=2, max_lora_rank=8, warmup=False)
BLOCK = 16  # the engine's default block_size
CONTEXT = [(7 * i + 3) % 80 for i in range(40)]  # two full blocks and a partial one
INVOCATION = ADAPTERS["judge_a"][0]  # [90, 91]
# A judge's prompt: CONTEXT, the invocation (activation index 40, inside block 2), then 20 more tokens,
# so that block 2 (tokens 32..47), which straddles the activation, is full and keyed by the adapter.
JUDGE_PROMPT = CONTEXT + INVOCATION + [(3 * i + 1) % 80 for i in range(20)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_model_with_adapters(tmp_path_factory.mktemp("metrics"))


@pytest.fixture(scope="module")
def access_log():
    """The access lines of the module's servers, as the JSON formatter writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def server(built, access_log):
    model_dir, dirs, _ = built
    llm = LLM(model_dir, **ENGINE_ARGS)
    llm.load_adapter("judge_a", dirs["judge_a"])
    with ServerThread(llm.engine, ServerConfig(port=0, metrics_port=0)) as s:
        yield s


def scrape(server: ServerThread) -> dict:
    """{sample name: [(labels, value)]} of the server's metrics endpoint, parsed by prometheus_client."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=HANG) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """The one sample `jalora:<name>` whose labels include `labels` (a histogram's `le` too)."""
    found = [v for got, v in samples.get("jalora:" + name, []) if labels.items() <= got.items()]
    assert len(found) == 1, (name, labels, samples.get("jalora:" + name))
    return found[0]



def _access_lines(access_log: io.StringIO) -> dict[str, dict]:
    lines = [json.loads(line) for line in access_log.getvalue().splitlines()]
    return {line["request_id"]: line for line in lines}


def test_metrics_count_what_was_sent(server, access_log):
    fresh = scrape(server)
    assert value(fresh, "request_success_total", finished_reason="length") == 0
    assert value(fresh, "prompt_tokens_total") == value(fresh, "prefix_cache_queries_total") == 0

    with Client(server.target, timeout=HANG) as client:
        base = client.generate(CONTEXT, max_tokens=4, ignore_eos=True, request_id="m-base")
        # The judge finds the two blocks of CONTEXT the base request computed: base-keyed, shared.
        judge1 = client.generate(JUDGE_PROMPT, "judge_a", max_tokens=3, ignore_eos=True, request_id="m-judge-1")
        # The second judge also finds block 2, keyed by the adapter (and the activation's offset in it).
        judge2 = client.generate(JUDGE_PROMPT, "judge_a", max_tokens=3, ignore_eos=True, request_id="m-judge-2")
        # Every token stops it: one token, finish reason "stop".
        stopped = client.generate(CONTEXT, max_tokens=4, stop_token_ids=list(range(VOCAB)), request_id="m-stop")
        with pytest.raises(ServerError):
            client.generate(CONTEXT, "nope", max_tokens=2, request_id="m-unknown")
        held = _aborted_while_waiting(server, client)
        info = client.server_info()
        assert info.num_running_requests == 0 and info.num_free_blocks == info.num_total_blocks

    results = [base, judge1, judge2, stopped]
    assert [r.finish_reason for r in results] == ["length", "length", "length", "stop"]
    assert [r.usage.cached_tokens for r in results] == [0, 2 * BLOCK, 3 * BLOCK, 2 * BLOCK]
    assert judge1.activation_index == judge2.activation_index == len(CONTEXT)

    m = scrape(server)
    assert value(m, "request_success_total", finished_reason="length") == 3
    assert value(m, "request_success_total", finished_reason="stop") == 1
    assert value(m, "request_success_total", finished_reason="abort") == 1
    # Tokens: the aborted request never ran, so its prompt was never computed.
    assert value(m, "prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert value(m, "generation_tokens_total") == sum(r.usage.completion_tokens for r in results) == 11
    # The prefix cache, in tokens: every computed request queried, hits are the cached_tokens reported.
    assert value(m, "prefix_cache_queries_total") == sum(r.usage.prompt_tokens for r in results)
    assert value(m, "prefix_cache_hits_total") == sum(r.usage.cached_tokens for r in results) == 7 * BLOCK
    assert value(m, "prefix_cache_hits_by_block_key_total", block_key="base", request="base") == 2 * BLOCK
    assert value(m, "prefix_cache_hits_by_block_key_total", block_key="base", request="adapter") == 4 * BLOCK
    assert value(m, "prefix_cache_hits_by_block_key_total", block_key="adapter", request="adapter") == BLOCK
    assert value(m, "prefix_cache_evictions_total") == 0 and value(m, "num_preemptions_total") == 0
    assert value(m, "prefix_cache_blocks") > 0
    assert value(m, "host_kv_cache_capacity_blocks") == 0 and value(m, "host_kv_cache_hits_total") == 0  # off
    assert value(m, "host_kv_cache_bytes_total", direction="to_host") == 0
    # Histograms: a first token per computed request, an interval between each two of a request's
    # tokens, an end per finished request (the abort too).
    assert value(m, "time_to_first_token_seconds_count") == 4
    assert value(m, "inter_token_latency_seconds_count") == sum(r.usage.completion_tokens - 1 for r in results)
    assert value(m, "e2e_request_latency_seconds_count") == 5
    assert value(m, "e2e_request_latency_seconds_bucket", le="+Inf") == 5
    assert value(m, "request_queue_time_seconds_count") == 4
    assert value(m, "alora_activation_position_count") == 3  # both judges and the aborted one
    assert value(m, "alora_activation_position_sum") == 3 * len(CONTEXT)
    assert value(m, "alora_activation_position_bucket", le="32.0") == 0
    assert value(m, "alora_activation_position_bucket", le="64.0") == 3
    # The load, now that the server is idle.
    assert value(m, "num_requests_running") == value(m, "num_requests_waiting") == 0
    assert value(m, "kv_cache_usage_perc") == 0
    # One adapter, resident since its load: nothing was swapped.
    assert value(m, "lora_adapters_loaded") == value(m, "lora_adapters_resident") == 1
    assert value(m, "lora_swaps_total") == value(m, "lora_swap_seconds_total") == 0
    # No warm-up: each step variant compiled at its first use while serving.
    assert value(m, "step_compilations_total", phase="warmup") == 0
    assert value(m, "step_compilations_total", phase="serving") > 0
    assert value(m, "step_compile_seconds_total", phase="serving") > 0

    # While the aborted request waited, the metrics showed it and its adapter.
    assert value(held, "num_requests_waiting") == 1 and value(held, "num_requests_running") == 0
    [(labels, _)] = held["jalora:lora_requests_info"]
    assert labels == {"max_lora": "2", "waiting_lora_adapters": "judge_a", "running_lora_adapters": ""}

    # One access line per call, written before the call's status went out.
    lines = _access_lines(access_log)
    line = lines["m-judge-2"]
    assert line["logger"] == ACCESS_LOGGER and line["level"] == "INFO" and line["status"] == "OK"
    assert line["adapter"] == "judge_a" and line["finish_reason"] == "length"
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (len(JUDGE_PROMPT), 3, 48)
    assert line["activation_index"] == len(CONTEXT) and line["duration_s"] >= 0
    assert "m-judge-2" in line["message"] and "cached=48" in line["message"]
    assert lines["m-stop"]["finish_reason"] == "stop" and lines["m-base"]["adapter"] is None
    assert lines["m-unknown"]["status"] == "NOT_FOUND" and lines["m-unknown"]["prompt_tokens"] is None
    assert lines["m-held"]["status"] == "CANCELLED" and lines["m-held"]["finish_reason"] is None


def _aborted_while_waiting(server: ServerThread, client: Client) -> dict:
    """A judge request held before its first step (the engine runs no step), scraped while it waits, then
    cancelled: it ends by abort, with no token. Returns the scrape."""
    worker = server.server.worker
    aborted = worker.num_aborted

    async def held_then_cancelled() -> dict:
        async with AsyncClient(server.target, timeout=HANG) as c:
            stream = c.generate_stream(JUDGE_PROMPT, "judge_a", max_tokens=3, request_id="m-held")
            task = asyncio.create_task(anext(stream))
            # The engine thread publishes its stats once it has taken the request.
            await asyncio.to_thread(until, lambda: value(scrape(server), "num_requests_waiting") == 1, "the add")
            samples = scrape(server)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return samples

    worker.limit_steps(0)
    try:
        samples = asyncio.run(held_then_cancelled())
        until(lambda: worker.num_aborted == aborted + 1, "the cancellation to reach the engine")
    finally:
        worker.limit_steps(None)
    until(lambda: value(scrape(server), "request_success_total", finished_reason="abort") == 1, "the abort's end")
    until(lambda: client.server_info().num_running_requests == 0, "the server to go idle")
    return samples


def test_repeated_errors_are_rate_limited():
    """The first `burst` records of one message per period pass; the rest are counted, and the first
    record of the next period says how many were dropped. Other messages and INFO records are not limited."""
    now = [0.0]
    limit = RateLimitFilter(burst=3, period=60.0, clock=lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(limit)
    logger = logging.getLogger("tests.metrics.rate_limit")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(10):
            logger.error("step failed for request %s", i)  # one message: the same format string
        logger.warning("another message")
        for i in range(5):
            logger.info("request %s done", i)
        now[0] = 59.0
        logger.error("step failed for request %s", 10)
        assert limit.suppressed() == 8
        now[0] = 60.0  # a new period: the next record passes and reports the 8 dropped ones
        logger.error("step failed for request %s", 11)
        assert limit.suppressed() == 0
    finally:
        logger.removeHandler(handler)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    errors = [r for r in records if r["level"] == "ERROR"]
    assert [r["message"] for r in errors[:3]] == [f"step failed for request {i}" for i in range(3)]
    assert len(errors) == 4 and errors[3]["suppressed"] == 8
    assert errors[3]["message"].startswith("step failed for request 11 [8 more like this suppressed")
    assert sum(r["level"] == "WARNING" for r in records) == 1 and sum(r["level"] == "INFO" for r in records) == 5


def test_json_lines_carry_the_request_id_of_the_call():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("tests.metrics.request_id")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside a call")
        token = REQUEST_ID.set("call-7")
        try:
            logger.warning("inside %s", "a call", extra={"adapter": "judge_a"})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            REQUEST_ID.reset(token)
    finally:
        logger.removeHandler(handler)
    outside, inside, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert outside["request_id"] is None and outside["message"] == "outside a call"
    assert inside["request_id"] == "call-7" and inside["message"] == "inside a call" and inside["adapter"] == "judge_a"
    assert failed["request_id"] == "call-7" and "ValueError: boom" in failed["exception"]
    assert set(inside) >= {"time", "level", "logger", "message"}


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


def test_serve_with_json_logs_and_metrics(tmp_path):
    """`jalora serve --metrics-port 0 --log-format json`: stderr is JSON lines (the progress lines and the
    access lines alike), and the metrics endpoint it names counts the call."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    argv = ["serve", "--model", "tiny", "--port", "0", "--metrics-port", "0", "--log-format", "json", "--no-warmup"]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)  # fmt: skip
    out: queue.Queue = queue.Queue()
    err: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True).start()
    records = []

    def next_record() -> dict:
        line = err.get(timeout=HANG)
        assert line is not None, "serve ended"
        records.append(json.loads(line))  # every line of stderr is one JSON object
        return records[-1]

    try:
        line = out.get(timeout=HANG)
        target = re.fullmatch(r"jalora serving on (\S+)\n", line or "")
        assert target, line
        while "metrics on" not in (record := next_record())["message"]:
            pass
        url = re.search(r"http://\S+/metrics", record["message"]).group(0)
        with Client(target.group(1), timeout=HANG) as client:
            result = client.generate([5, 6, 7], max_tokens=2, ignore_eos=True, request_id="cli-1")
        while (record := next_record())["logger"] != ACCESS_LOGGER:
            pass
        assert record["request_id"] == "cli-1" and record["status"] == "OK" and record["completion_tokens"] == 2
        with urllib.request.urlopen(url, timeout=HANG) as response:
            text = response.read().decode()
        assert re.search(r"^jalora:generation_tokens_total 2\.0$", text, re.M), text
        assert result.usage.completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=HANG)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    while (line := err.get(timeout=HANG)) is not None:
        records.append(json.loads(line))
    assert any(r["message"].startswith("jalora: shutting down") for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
