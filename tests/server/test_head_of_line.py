"""Slow work never holds up the streams: tokenizing big texts (Generate prompts, Tokenize calls) and
reading adapter files run beside the engine thread (server/engine_worker.py), and unary calls have an
admission bound of their own (server/call_gate.py).

The slow jobs are made to wait on an event the test sets (`HeldEngine`), after the small request has
completed: that the small one completed at all proves it never waited on them (had the job run on the
engine thread, no step could have run until the event was set). No timing is assumed; HANG only
guards against a hang.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from jalora import LLM
from jalora.api.limits import MAX_PROMPT_BYTES
from jalora.client import Client, ServerError
from jalora.errors import InvalidRequestError
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import EXTRA_ADAPTER, make_model_with_adapters
from tests.waiting import HANG

HOLD_BYTES = 1 << 20  # texts at least this long are held; a small prompt passes
# The largest text a request may carry (jalora/api/limits.py; a longer one, like the 10 MB of the probe
# that found this, is refused before any work), in few words so that the test stays quick.
BIG_TOKENS = MAX_PROMPT_BYTES // 100
BIG = ("t5" + " " * 98) * BIG_TOKENS


class Gate:
    def __init__(self):
        self.entered = threading.Semaphore(0)  # released by each job that reaches the gate
        self.release = threading.Event()

    def wait_entered(self, n: int) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=HANG), "a held job never reached the host pool"


class HeldEngine:
    """The real engine, except that while a method is held (`hold`) its calls on big texts (or every
    call, for prepare_adapter) wait for the test to open the gate."""

    def __init__(self, engine):
        self.engine = engine
        self.gates: dict[str, Gate] = {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def hold(self, method: str) -> Gate:
        self.gates[method] = gate = Gate()
        return gate

    def _pass(self, method: str, held: bool) -> None:
        gate = self.gates.get(method)
        if gate is not None and held:
            gate.entered.release()
            assert gate.release.wait(HANG)

    def encode_prompt(self, prompt, truncate=None):
        self._pass("encode_prompt", isinstance(prompt, str) and len(prompt) >= HOLD_BYTES)
        return self.engine.encode_prompt(prompt, truncate)

    def tokenize(self, text, *args, **kwargs):
        self._pass("tokenize", len(text) >= HOLD_BYTES)
        return self.engine.tokenize(text, *args, **kwargs)

    def prepare_adapter(self, path, roots=None):
        self._pass("prepare_adapter", True)
        return self.engine.prepare_adapter(path, roots)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_model_with_adapters(tmp_path_factory.mktemp("hol"))


@pytest.fixture(scope="module")
def engine(built):
    return LLM(built[0], max_num_seqs=8, max_num_batched_tokens=64, max_loras=2, max_lora_rank=8).engine


@pytest.fixture()
def held(engine, built):
    """A fresh server per test: unary calls admitted two at a time, four tokenizer threads."""
    held = HeldEngine(engine)
    config = ServerConfig(port=0, adapter_roots=[built[2]], max_pending_calls=2, tokenizer_threads=4)
    with ServerThread(held, config) as server:
        yield held, server
        for gate in held.gates.values():  # a failed test must not leave jobs waiting
            gate.release.set()


def _calls(target: str, *calls):
    """Starts each (method name, args, kwargs) on a Client of its own in a thread; returns the futures."""
    pool = ThreadPoolExecutor(len(calls))

    def run(method, args, kwargs):
        with Client(target, timeout=HANG) as c:
            return getattr(c, method)(*args, **kwargs)

    futures = [pool.submit(run, *call) for call in calls]
    pool.shutdown(wait=False)
    return futures


def test_small_generate_completes_while_big_tokenizations_wait(held):
    held, server = held
    encode, tokenize = held.hold("encode_prompt"), held.hold("tokenize")
    big_tokenize, big_generate = _calls(
        server.target, ("tokenize", (BIG,), {}), ("generate", (BIG,), {"max_tokens": 4})
    )
    encode.wait_entered(1)  # both big jobs hold a host thread now
    tokenize.wait_entered(1)
    worker = server.server.worker
    steps = worker.num_steps
    with Client(server.target, timeout=HANG) as c:
        small = c.generate("t1 t2 t3 t4", max_tokens=4, ignore_eos=True)
        assert c.server_info().num_running_requests == 1  # the big Generate, still tokenizing
    assert small.token_ids and small.usage.prompt_tokens == 4 and small.finish_reason == "length"
    assert worker.num_steps > steps
    assert not big_tokenize.done() and not big_generate.done()
    encode.release.set()
    tokenize.release.set()
    assert big_tokenize.result(timeout=HANG) == [5] * BIG_TOKENS
    with pytest.raises(ServerError) as err:  # refused by its size, before it is tokenized
        big_generate.result(timeout=HANG)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt"
    assert "bytes" in err.value.details


def test_unary_calls_have_their_own_bound(held):
    held, server = held
    gate = held.hold("tokenize")
    texts = ["t6 " * (HOLD_BYTES // 3 + 1), "t7 " * (HOLD_BYTES // 3 + 1)]
    futures = _calls(server.target, *[("tokenize", (t,), {}) for t in texts])
    gate.wait_entered(2)  # max_pending_calls=2 unary calls running
    with Client(server.target, timeout=HANG) as c:
        with pytest.raises(ServerError) as err:
            c.server_info()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_calls" in err.value.details
        # Generate is admitted by its own bound, and its prompt finds a free tokenizer thread
        assert c.generate("t1 t2 t3", max_tokens=2).usage.completion_tokens == 2
        gate.release.set()
        assert [len(f.result(timeout=HANG)) for f in futures] == [HOLD_BYTES // 3 + 1] * 2
        assert c.server_info().num_running_requests == 0


def test_adapter_files_are_read_beside_the_engine_thread(held):
    held, server = held
    gate = held.hold("prepare_adapter")
    name, tokens, _, _ = EXTRA_ADAPTER
    [load] = _calls(server.target, ("load_adapter", (name, name), {}))
    gate.wait_entered(1)
    with Client(server.target, timeout=HANG) as c:
        assert c.generate([1, 2, 3], max_tokens=3).usage.completion_tokens == 3
        assert name not in {a.name for a in c.list_adapters()}
        gate.release.set()
        info = load.result(timeout=HANG)
        assert info.name == name and info.invocation_tokens == tokens
        assert c.generate([1, 2, 3, *tokens], name, max_tokens=2).activation_index == 3
        c.unload_adapter(name)


def test_prompt_sizes_are_checked_before_tokens(engine, monkeypatch):
    """Engine.encode_prompt: a text by its bytes before it is tokenized, ids by their count before
    their values."""

    class NoTokenizer:
        def encode(self, *args, **kwargs):
            raise AssertionError("tokenized an oversized prompt")

    monkeypatch.setattr(engine, "tokenizer", NoTokenizer())
    with pytest.raises(InvalidRequestError, match="bytes") as err:
        engine.encode_prompt("t5 " * (engine.max_prompt_bytes // 3 + 1))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequestError, match="5000000 tokens") as err:
        engine.encode_prompt(["not an id"] * 5_000_000)
    assert err.value.field == "prompt"



def test_a_call_that_ends_while_its_prompt_waits_for_tokenizing_is_cancelled_not_a_server_error(held, caplog):
    """A request whose call ended (its HTTP client went away, its gRPC call was cancelled) while its prompt
    waited for the host pool is never admitted: its stream ends in RequestCancelledError, which is CANCELLED
    (HTTP 499, as a stream whose client left is logged), with no traceback logged and nothing left pending.
    The order is the test's: the pool's four threads are held by the tokenizing of four big prompts (which
    then fail on their size) while the request is submitted and its call ends."""
    import asyncio

    from jalora import SamplingParams
    from server.errors import RequestCancelledError, http_status_for, status_for

    held, server = held
    worker = server.server.worker
    gate = held.hold("encode_prompt")
    busy = _calls(server.target, *[("generate", (BIG,), {"max_tokens": 2})] * 4)
    gate.wait_entered(4)

    async def cancelled_while_waiting() -> BaseException:
        stream = worker.submit("left", "t5 t6", SamplingParams(max_tokens=2), None)
        assert worker.num_pending == 5
        stream.abort()
        gate.release.set()
        with pytest.raises(RequestCancelledError) as err:
            await asyncio.wait_for(stream.next(), HANG)
        return err.value

    exc = asyncio.run(cancelled_while_waiting())
    for big in busy:
        with pytest.raises(ServerError) as err:
            big.result(timeout=HANG)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert worker.num_pending == 0
    with caplog.at_level("ERROR", logger="server.errors"):
        assert status_for(exc)[0] == grpc.StatusCode.CANCELLED
        assert http_status_for(exc)[:3] == (499, "client_closed_request", "cancelled")
    # (an unexpected error would log its traceback here; the access log's lines are INFO)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    # Never admitted: the engine holds no request and no KV block, and it goes on serving.
    stats = held.engine.stats()
    assert stats.num_requests_running == stats.num_requests_waiting == stats.num_used_blocks == 0
    with Client(server.target, timeout=HANG) as c:
        assert len(c.generate("t5 t6", max_tokens=2).token_ids) == 2
