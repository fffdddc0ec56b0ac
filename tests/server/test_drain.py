"""Graceful drain (JaloraServer.stop, what `jalora serve` runs on SIGTERM): health turns NOT_SERVING,
new calls get UNAVAILABLE, running streams get the grace to finish, and those past it end with the
server's own message.

A running stream is held by the worker's step limit (`EngineWorker.limit_steps`), so it is certain to
be running when the stop begins and finishes only when the test lifts the limit. HANG only guards
against a hang; no event has to beat a timer.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jalora import LLM
from jalora.client import Client, ServerError
from server.app import ServerThread
from server.config import ServerConfig
from tests.server.support import STEP_LIMIT
from tests.waiting import HANG

LONG = dict(max_tokens=60, ignore_eos=True)
PROMPT = [3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLM(tiny_models["llama"], num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32).engine


def _watch(target: str) -> queue.Queue:
    """The statuses a health Watch of the Jalora service reports, in order (None once it ends)."""
    statuses: queue.Queue = queue.Queue()

    def run():
        with grpc.insecure_channel(target) as channel:
            request = health_pb2.HealthCheckRequest(service="jalora.v1.Jalora")
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=HANG):
                    statuses.put(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            except grpc.RpcError:
                pass  # the server stopped
        statuses.put(None)

    threading.Thread(target=run, daemon=True).start()
    return statuses


def test_stop_drains_running_streams_and_refuses_new_calls(engine):
    server = ServerThread(engine, ServerConfig(port=0, grace=HANG)).start()
    worker = server.server.worker
    watch = _watch(server.target)
    assert watch.get(timeout=HANG) == "SERVING"
    worker.limit_steps(STEP_LIMIT)  # the stream cannot finish until the limit is lifted
    with Client(server.target, timeout=HANG) as c:
        stream = c.generate_stream(PROMPT, **LONG)
        tokens = list(next(stream).token_ids)
        stopper = threading.Thread(target=server.stop)  # waits for the stream: the grace is HANG
        stopper.start()
        assert watch.get(timeout=HANG) == "NOT_SERVING"
        assert c.health("jalora.v1.Jalora", timeout=HANG) == "NOT_SERVING" and c.health(timeout=HANG) == "NOT_SERVING"
        with pytest.raises(ServerError) as err:
            c.generate(PROMPT, max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "server is shutting down" in err.value.details
        assert stopper.is_alive()  # still draining: the stream is running
        worker.limit_steps(None)
        chunks = list(stream)
    tokens += [t for ch in chunks for t in ch.token_ids]
    assert chunks[-1].finished and chunks[-1].finish_reason == "length" and len(tokens) == LONG["max_tokens"]
    stopper.join(HANG)
    assert not stopper.is_alive()
    assert watch.get(timeout=HANG) is None  # the server is gone


def test_streams_past_the_grace_get_the_servers_message(engine):
    server = ServerThread(engine, ServerConfig(port=0, grace=0)).start()
    server.server.worker.limit_steps(STEP_LIMIT)  # the stream cannot finish: the grace (0 s) ends it
    with Client(server.target, timeout=HANG) as c:
        stream = c.generate_stream(PROMPT, **LONG)
        assert next(stream).token_ids
        server.stop()
        with pytest.raises(ServerError) as err:
            list(stream)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.details == "server is shutting down: the call did not finish within the 0 s grace"


def test_a_second_stop_ends_the_grace_now(engine):
    """What a second SIGTERM does to `jalora serve`: the running calls end at once."""
    server = ServerThread(engine, ServerConfig(port=0, grace=HANG)).start()
    server.server.worker.limit_steps(STEP_LIMIT)
    watch = _watch(server.target)
    assert watch.get(timeout=HANG) == "SERVING"  # the watch is on before the stop
    with Client(server.target, timeout=HANG) as c:
        stream = c.generate_stream(PROMPT, **LONG)
        assert next(stream).token_ids
        stopper = threading.Thread(target=server.stop)  # would wait the whole grace for the stream
        stopper.start()
        assert watch.get(timeout=HANG) == "NOT_SERVING"
        asyncio.run_coroutine_threadsafe(server.server.stop(0), server._loop).result(timeout=HANG)
        with pytest.raises(ServerError) as err:
            list(stream)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "stopped at once" in err.value.details
    stopper.join(HANG)
    assert not stopper.is_alive()
