"""bench/http_bench.py's smoke run on the CPU: in-process and gRPC rounds through a real server on a loopback
port and a real client process, and the gRPC streams' server-side clocks beside the client's."""

import json

from bench.http_bench import main


def test_grpc_rounds_record_the_servers_clock_beside_the_clients(tmp_path):
    out = tmp_path / "http_bench.json"
    main(["--smoke", "--modes", "inproc", "grpc", "--clients", "1", "--out", str(out)])
    rounds = {r["mode"]: r for r in json.loads(out.read_text())["rounds"]}
    assert rounds["inproc"]["tokens"] == rounds["grpc"]["tokens"] > 0  # (every stream ran to max_tokens)
    grpc = rounds["grpc"]
    # The server's clock starts when it receives a request, after the client sent it, and its queue ends
    # before its first token: per stream, so for the medians too.
    assert 0 <= grpc["server_queue_median_s"] <= grpc["server_ttft_median_s"] <= grpc["ttft_median_s"]
    assert "server_ttft_median_s" not in rounds["inproc"]
    # The engine's clock (the clients' wall clock): every mode's requests reached the engine within the
    # round, its first step ended after its first request, and it ran at least one step per token of a
    # stream (a stream gets one token a step).
    streams = json.loads(out.read_text())["streams"]
    for r in rounds.values():
        assert 0 <= r["engine_first_add_s"] <= r["engine_last_add_s"] <= r["seconds"], r
        assert r["engine_first_add_s"] <= r["engine_first_step_end_s"] <= r["seconds"], r
        assert r["engine_steps"] >= r["tokens"] // streams, r


def test_the_engine_clock_restores_what_the_instance_held():
    """The clock's shadows go when the block ends: the class's methods again, or an instance attribute that
    was there before (another clock's, a wrapper's), and the times of the calls made inside are recorded."""
    from bench.http_bench import engine_clock

    class Engine:
        def add_request(self, *args):
            return "added"

        def step(self):
            return ["delta"]

    plain, wrapped = Engine(), Engine()
    wrapped.step = lambda: ["wrapped"]
    for engine in (plain, wrapped):
        before = engine.step()
        with engine_clock(engine) as seen:
            assert engine.add_request("r") == "added" and engine.step() == before
        assert len(seen["adds"]) == len(seen["steps"]) == 1
        assert engine.step() == before and "add_request" not in engine.__dict__
    assert "step" not in plain.__dict__ and wrapped.step() == ["wrapped"]
