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
    # round, its first step ended after its first request, and it stepped at least once per token.
    for r in rounds.values():
        assert 0 <= r["engine_first_add_s"] <= r["engine_last_add_s"] <= r["seconds"], r
        assert r["engine_first_add_s"] <= r["engine_first_step_end_s"] <= r["seconds"], r
        assert r["engine_steps"] >= r["tokens"] // 8  # (8 streams of 8 tokens: at least 8 steps)
