"""bench/pipeline_bench.py: its pure helpers, and part A through a tensor-parallel engine on CPU devices."""

import numpy as np
import pytest

from bench.pipeline_bench import (
    c_runs,
    concurrent_batch,
    merge,
    merge_rows,
    percentiles,
    poisson_arrivals,
    run_pipelines,
)
from jalora.outputs import FinishedRequest, RequestDelta, RequestMetrics


def test_poisson_arrivals_rate_and_order():
    a = poisson_arrivals(20.0, 4000, seed=1)
    assert len(a) == 4000 and a[0] == 0.0
    assert all(x <= y for x, y in zip(a, a[1:]))
    assert np.mean(np.diff(a)) == pytest.approx(1 / 20.0, rel=0.05)
    assert poisson_arrivals(5.0, 10, seed=3) == poisson_arrivals(5.0, 10, seed=3)
    assert poisson_arrivals(5.0, 0) == []


def test_percentiles():
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1) and p["p99"] == pytest.approx(99.01)
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([None, 2.0]) == {"p50": 2.0, "p90": 2.0, "p99": 2.0}


def test_concurrent_batch():
    assert concurrent_batch(670_000, 65_810, 64) == 10
    assert concurrent_batch(1000, 5000, 64) == 1
    assert concurrent_batch(10**7, 100, 64) == 64


def test_merge_rows_and_parts():
    key = lambda r: (r["n"], r["k"])  # noqa: E731
    old = [{"n": 1, "k": "a", "v": 0}, {"n": 2, "k": "a", "v": 0}]
    new = [{"n": 2, "k": "a", "v": 1}, {"n": 3, "k": "a", "v": 1}]
    assert [(r["n"], r["v"]) for r in merge_rows(old, new, key)] == [(1, 0), (2, 1), (3, 1)]
    o = {"parts": {"C": {"prompt": 256, "rows": [{"kind": "alora", "rate": 4.0}], "run": {"c": 1}}}}
    n = {"C": {"prompt": 256, "rows": [{"kind": "alora", "rate": 8.0}], "run": {"c": 2}}}
    parts = merge(o, n)
    assert [r["rate"] for r in parts["C"]["rows"]] == [4.0, 8.0] and parts["C"]["runs"] == [{"c": 1}, {"c": 2}]
    n2 = {"C": {"prompt": 512, "rows": [{"kind": "alora", "rate": 8.0}], "run": {"c": 3}}}
    assert [r["rate"] for r in merge(o, n2)["C"]["rows"]] == [8.0]  # another setup replaces the part
    n3 = {"C": {"prompt": 256, "rows": [{"kind": "alora", "rate": 4.0, "sessions": True}], "run": {"c": 4}}}
    rows = merge(o, n3)["C"]["rows"]  # a sessions row sits beside the row of the same rate without
    assert [(r["rate"], r.get("sessions", False)) for r in rows] == [(4.0, False), (4.0, True)]


def test_c_runs_attach_the_host_tier_for_tier_on_runs_only():
    """Part C: each rate plain, then with the host tier (--c-host-kv-gb), sessions (--c-sessions), both; the
    engine's tier attached to the block manager only for the tier's runs."""

    class Engine:
        host_tier = object()

        class block_manager:  # noqa: N801
            host_tier = None

    class Args:
        c_rates, c_host_kv_gb, c_sessions = [8.0, 16.0], 32.0, False

    def runs():
        return [(rate, gb, s, Engine.block_manager.host_tier) for rate, gb, s in c_runs(Args, Engine)]

    t = Engine.host_tier
    assert runs() == [(8.0, 0.0, False, None), (8.0, 32.0, False, t), (16.0, 0.0, False, None), (16.0, 32.0, False, t)]
    assert Engine.block_manager.host_tier is None
    Args.c_rates, Args.c_host_kv_gb, Args.c_sessions = [8.0], 0.0, True
    assert runs() == [(8.0, 0.0, False, None), (8.0, 0.0, True, None)]
    Args.c_host_kv_gb = 4.0
    assert runs() == [(8.0, 0.0, False, None), (8.0, 4.0, False, t), (8.0, 0.0, True, None), (8.0, 4.0, True, t)]
    Args.c_host_kv_gb, Args.c_sessions = 0.0, False
    assert runs() == [(8.0, 0.0, False, None)]


class _FakeEngine:
    """Hands out max_tokens tokens per request as the engine does, in deltas: one token per step, the
    last delta carrying the final record (and a delta of an unknown request, which is ignored)."""

    def __init__(self):
        self.pending, self.added, self.tokens = [], [], {}

    def add_request(self, rid, prompt, params, adapter, **session):
        self.pending.append((rid, params))
        self.added.append((rid, len(prompt), adapter, session))
        self.tokens[rid] = (list(prompt), 0)

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        deltas, still = [RequestDelta("someone-else", [1], "x", None)], []
        for rid, n in self.pending:
            prompt, done = self.tokens[rid]
            self.tokens[rid] = (prompt, done + 1)
            finished = None
            if done + 1 == n:
                metrics = RequestMetrics(arrival_time=0.0, first_token_time=0.0, finished_time=0.0)
                finished = FinishedRequest("length", prompt, n, 0, None, None, None, metrics)
            else:
                still.append((rid, n))
            deltas.append(RequestDelta(rid, [done], str(done), None, finished))
        self.pending = still
        return deltas

    def abort_request(self, rid):
        self.pending = [(r, p) for r, p in self.pending if r != rid]


class _Params(int):
    """max_tokens, with the one attribute run_pipelines reads."""

    logprobs = None


def test_run_pipelines_stages_and_arrivals():
    """Stages get the finished RequestOutputs folded from the deltas, in submission order."""

    def pipe(i):
        (base,) = yield [([1] * 4, _Params(3), None)]
        assert base.token_ids == [0, 1, 2] and base.text == "012" and base.finish_reason == "length"
        assert base.prompt_token_ids == [1] * 4
        judges = yield [([1] * (4 + len(base.token_ids)), _Params(2), f"j{k}", {"session": f"s{i}"}) for k in range(2)]
        return {"i": i, "judge_tokens": [len(j.token_ids) for j in judges]}

    eng = _FakeEngine()
    res = run_pipelines(eng, [pipe(i) for i in range(3)], arrivals=[0.02, 0.0, 0.01])
    assert [r["result"] for r in res] == [{"i": i, "judge_tokens": [2, 2]} for i in range(3)]
    assert all(r["end"] >= r["start"] for r in res)
    assert len(eng.added) == 9 and eng.added[0][1] == 4 and {a for _, n, a, _ in eng.added if n == 7} == {"j0", "j1"}
    assert {s["session"] for *_, s in eng.added if s} == {"s0", "s1", "s2"}  # a stage's add_request keywords


def test_part_a_runs_tensor_parallel(tmp_path, monkeypatch):
    """The multi-GPU run's script, on 2 of the test process's 8 CPU devices: pipeline A's aLoRA judge
    reuses the base model's blocks through the sharded engine as through one device (and `--no-plots`
    draws none)."""
    from bench import pipeline_bench
    from bench.pipeline_bench import main

    drawn = []
    monkeypatch.setattr(pipeline_bench, "plots", lambda *a: drawn.append(a) or [])
    out = str(tmp_path / "pipeline_bench_tiny_tp2.json")
    result = main(["--model", "tiny", "--quick", "--tensor-parallel-size", "2", "--parts", "A", "--prompt-lens", "64",
                   "--no-warmup", "--compile-cache", "", "--layers", "3", "--no-plots", "--out", out])  # fmt: skip
    assert drawn == []
    assert result["tensor_parallel_size"] == 2 and result["layers"] == 3
    rows = {r["kind"]: r for r in result["parts"]["A"]["rows"]}
    assert rows["alora"]["judge"]["cached_tokens"] >= 64 and rows["lora"]["judge"]["cached_tokens"] == 0


def test_layers_keeps_a_large_models_layer_shapes():
    """--layers N: a large model's layers (the multi-GPU run's shapes) N times, on one device."""
    from bench.harness import MODELS
    from bench.pipeline_bench import model_config

    cfg = model_config("llama-70b", 20)
    assert cfg["num_hidden_layers"] == 20 and MODELS["llama-70b"]["num_hidden_layers"] == 80  # (a copy)
    assert {k: v for k, v in cfg.items() if k != "num_hidden_layers"} == {
        k: v for k, v in MODELS["llama-70b"].items() if k != "num_hidden_layers"}
    assert model_config("llama-70b") == MODELS["llama-70b"]

