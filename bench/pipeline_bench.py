"""The aLoRA serving paper's pipelines on jalora, against plain LoRA and transformers + PEFT, in one script.

    python -m bench.pipeline_bench --model granite-8b                  # H200: every part (longer than 10 min)
    python -m bench.pipeline_bench --model tiny --quick                # CPU smoke run of every part (minutes)
    python -m bench.pipeline_bench --model granite-8b --parts A,B      # a subset; results merge into one JSON

Parts (`--parts`, comma separated; default all):
  ceilings  bf16 matmul rate and HBM bandwidth (bench.harness.measure_ceilings), prefill MFU and decode step
            against the weight+KV roofline (bench.throughput functions). GPU only.
  A         base -> adapter, one pipeline at a time: the base answers (256 tokens), the adapter evaluates
            prompt + answer + invocation and generates 16. aLoRA r=32 (base-aligned reuse) vs LoRA r=8
            (recompute), q/k/v. Adapter step: TTFT, e2e, queue / prefill / decode time, cache hit rate.
  Aconc     the paper's concurrent setting: `batch` pipelines at once, batch = KV capacity / longest sequence
            of the sweep (fixed for the whole sweep), each judge submitted as soon as its base finishes.
  B         base -> 5 adapters in parallel -> base consolidation (prompt + answer + the 5 judgements), 1k/16k.
  C         Poisson arrivals (prompt 256, answer 256, evaluation 16, 500 pipelines per rate) over a sweep of
            rates up to and past KV-cache overflow; the cache is capped at `--c-kv-pipelines` pipelines' worth
            of blocks. Pipeline latency p50/p90/p99 and adapter hit rate per rate; per-rate time limit. With
            --c-host-kv-gb G every rate runs twice on the same engine: host-memory KV tier off, then on (G GiB).
            `--c-sessions`: each rate also runs with pipeline sessions (each pipeline's session keeps its base's
            blocks for its judge, ended by the judge), same arrivals, same cap (`--c-session-share` of it);
            with both flags, also with both.
  baseline  the pipeline of A (1k, 4k) with transformers + PEFT on the same device (PEFT's aLoRA reusing the
            base's past_key_values, and plain LoRA), and pipeline throughput with 32 concurrent pipelines:
            PEFT batched generate vs jalora. The PEFT side runs in a child process (torch; no JAX on the GPU)
            before this process touches the GPU, so the two never share device memory.

Output: bench/results/pipeline_bench_<model>.json (device, JAX version, commit, exact command per part; a
later run of some parts replaces only those parts, and rows of the same prompt length / rate) and
pipeline_bench_<model>_{A,C}.png beside it; markdown tables on stdout (`python -m bench.report` renders
them for the README). A --quick run writes under /tmp unless --out is given.

H200 times (Granite-3.2-8B shapes, bf16, bench/results/pipeline_bench_granite-8b.json): warm-up
(compiling every bucket, base and LoRA) ~270 s, base 256-token answer ~1.45 s, 64k LoRA prefill ~6.4 s.
One device command is limited to 10 minutes, so split it:

    python -m bench.pipeline_bench --model granite-8b --parts baseline        # ~6 min (PEFT, then jalora 32x)
    python -m bench.pipeline_bench --model granite-8b --parts ceilings,A,B    # ~6 min
    python -m bench.pipeline_bench --model granite-8b --parts Aconc           # ~1.5 min (the paper's concurrent batch)
    python -m bench.pipeline_bench --model granite-8b --parts C --c-rates 8 16 32   # 7.5 min
    python -m bench.pipeline_bench --model granite-8b --parts C --c-rates 8 16 32 --c-host-kv-gb 16 \
        --c-pipelines 120 --c-max-seconds 25      # host-memory KV tier off vs on, same run
    python -m bench.pipeline_bench --model granite-8b --parts C --c-rates 8 16 32 --c-sessions --c-pipelines 200 \
        --c-max-seconds 40                                                         # sessions off vs on

`--tuning FIELD=VALUE ...` replaces GPU attention tuning fields for the run (recorded as `gpu_tuning_changes`), e.g.
the default against the long-chunk attention variant turned off, in two runs:

    python -m bench.pipeline_bench --model granite-8b --parts A --prompt-lens 65536 --tuning long_chunk_max_rows=0 \
        --out pipeline_bench_granite-8b_nolongchunk.json

`--parts baseline --reuse-peft` measures only jalora's side again against the stored PEFT numbers (which
keep their own run record), when the code under test is jalora's.

Each command compiles the step for every token bucket it needs (base and LoRA variants) before measuring;
`--compile-cache DIR` (default /tmp/jalora-jax-cache) keeps compilations for the next command on the same machine.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.harness import (
    MODELS,
    REPO_ROOT,
    TINY,
    drain,
    result_path,
    save,
    write_adapter,
    write_model_dir,
)
from bench.report import pipeline_bench_tables
from jalora.outputs import OutputAccumulator

PARTS = ("ceilings", "A", "Aconc", "B", "C", "baseline")
QKV = ["q_proj", "k_proj", "v_proj"]
KINDS = ("alora", "lora")
RANK = {"alora": 32, "lora": 8}  # the paper's setup
NUM_JUDGES = 5


# -- pure helpers (tested in tests/bench/test_pipeline_bench.py) ------------------------------------------------


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of `n` Poisson arrivals at `rate` per second; the first at 0."""
    if n <= 0:
        return []
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def percentiles(values, qs=(50, 90, 99)) -> dict:
    """{"p50": ..., ...} (linear interpolation, numpy's default); None for each when there are no values."""
    vals = [float(v) for v in values if v is not None]
    return {f"p{q}": (float(np.percentile(vals, q)) if vals else None) for q in qs}


def concurrent_batch(kv_tokens: int, longest: int, max_num_seqs: int) -> int:
    """The paper's batch: KV-cache capacity / longest sequence of the sweep, at least 1, at most max_num_seqs."""
    return max(1, min(kv_tokens // longest, max_num_seqs))


def merge_rows(old: list, new: list, key) -> list:
    """Rows of `old` whose key is not in `new`, then `new`, sorted by key (a split run replaces what it redid)."""
    keys = {key(r) for r in new}
    return sorted([r for r in old if key(r) not in keys] + list(new), key=key)


# -- sizes ----------------------------------------------------------------------------------------------


def model_config(model: str, layers: int | None = None) -> dict:
    """HF config of a --model name: tiny, or the shapes of bench/harness.py's MODELS; `layers` keeps that many
    of its decoder layers (--layers: a large model's layer shapes on one device)."""
    cfg = dict(TINY if model == "tiny" else MODELS[model])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def sizes(model: str, quick: bool) -> dict:
    if quick:  # CPU: the reference attention costs O(seqs * bucket * max_model_len) per step; keep all small
        return dict(prompt_lens=[64, 256, 768], answer_len=32, eval_len=8, b_prompts=[128, 512], consolidation_len=8,
                    c_prompt=64, c_answer=32, c_eval=8, c_pipelines=24, c_rates=[2.0, 4.0, 6.0, 20.0], c_kv_pipelines=4,
                    c_max_seconds=60.0, hf_prompts=[256, 768], tp_pipelines=8, tp_prompt=128, max_num_seqs=16,
                    max_num_batched_tokens=256, num_kv_blocks=512, dtype="float32")  # fmt: skip
    return dict(prompt_lens=[256, 1024, 4096, 16384, 65536], answer_len=256, eval_len=16, b_prompts=[1024, 16384],
                consolidation_len=32, c_prompt=256, c_answer=256, c_eval=16, c_pipelines=500,
                c_rates=[4.0, 8.0, 12.0, 16.0, 24.0, 32.0], c_kv_pipelines=32, c_max_seconds=150.0,
                hf_prompts=[1024, 4096], tp_pipelines=32, tp_prompt=1024, max_num_seqs=64,
                max_num_batched_tokens=8192, num_kv_blocks=None, dtype="bfloat16")  # fmt: skip


# -- driving the engine -----------------------------------------------------------------------------------


def greedy(n: int):
    from jalora import SamplingParams

    return SamplingParams(max_tokens=n, ignore_eos=True)



def req_metrics(out) -> dict:
    """What one finished request cost, from RequestOutput.metrics (time.monotonic seconds)."""
    m = out.metrics
    n = len(out.prompt_token_ids)
    first = m.first_token_time if m.first_token_time is not None else m.finished_time
    sched = m.first_scheduled_time if m.first_scheduled_time is not None else m.arrival_time
    return {
        "prompt_tokens": n,
        "cached_tokens": out.num_cached_tokens,
        "hit_rate": out.num_cached_tokens / n,
        "queue_s": sched - m.arrival_time,
        "prefill_s": first - sched,  # first scheduled -> first token: every prefill chunk (and what shared it)
        "ttft_s": first - m.arrival_time,
        "decode_s": m.finished_time - first,
        "e2e_s": m.finished_time - m.arrival_time,
        "completion_tokens": len(out.token_ids),
        "finish_reason": out.finish_reason,
    }


class EngineCounters:
    """Tokens the engine computed, preemptions and compilations while serving, over a window (the scheduler's
    batches, counted in the bench; the rest from the engine's stats)."""

    def __init__(self, engine):
        self.engine = engine
        self.tokens = 0
        self.steps = 0
        sched = engine.scheduler
        orig = sched.schedule

        def counting():
            batch = orig()
            self.tokens += batch.total_tokens
            self.steps += bool(batch.requests)
            return batch

        sched.schedule = counting  # an instance attribute: the engine's code is untouched

    def snapshot(self) -> tuple:
        st = self.engine.stats()
        return (self.tokens, self.steps, self.engine.scheduler.num_preemptions, st.host_kv_cache_hits,
                st.host_kv_cache_bytes_to_host, st.host_kv_cache_bytes_to_device, st.compilations,
                st.compile_seconds)  # fmt: skip

    def since(self, snap: tuple) -> dict:
        t, s, p, hh, b_out, b_in, c, c_s = self.snapshot()
        out = {"computed_tokens": t - snap[0], "steps": s - snap[1], "preemptions": p - snap[2],
               # step variants compiled while serving (after the warm-up): each held up its step's requests
               "compilations": c - snap[6], "compile_s": c_s - snap[7]}
        if self.engine.host_tier is not None:  # (built with --c-host-kv-gb)
            out.update(host_hit_tokens=hh - snap[3], host_bytes_to_host=b_out - snap[4],
                       host_bytes_to_device=b_in - snap[5])  # fmt: skip
        return out


def run_pipelines(engine, gens: list, arrivals: list[float] | None = None, time_limit: float | None = None) -> list:
    """Drives pipeline coroutines through one engine.

    A pipeline is a generator that yields a stage, a list of (prompt_ids, SamplingParams, adapter[, keywords])
    submitted together (keywords: more add_request arguments, e.g. a pipeline session),
    receives the finished RequestOutputs of that stage in order (folded from the engine's deltas),
    and returns its result dict. Pipeline i starts at arrivals[i] seconds (default: all at once). Returns one
    entry per pipeline: {"result", "start", "end"} (monotonic seconds; start is the scheduled arrival), or
    {"incomplete": True} if the time limit cut it.
    """
    n = len(gens)
    arrivals = arrivals or [0.0] * n
    order = sorted(range(n), key=lambda i: arrivals[i])
    t0 = time.monotonic()
    done: list = [None] * n
    stage: dict[int, list] = {}  # pipeline -> [request ids, outputs by id]
    owner: dict[str, int] = {}
    running: dict[str, OutputAccumulator] = {}  # request id -> its deltas so far
    counter = [0]
    nxt = 0

    def submit(i, reqs):
        ids = []
        for prompt, params, adapter, *more in reqs:
            rid = f"p{i}-{counter[0]}"
            counter[0] += 1
            engine.add_request(rid, prompt, params, adapter, **(more[0] if more else {}))
            owner[rid] = i
            running[rid] = OutputAccumulator(rid, None, params.logprobs is not None)
            ids.append(rid)
        stage[i] = [ids, {}]

    def advance(i, outs):
        try:
            reqs = gens[i].send(outs)
        except StopIteration as stop:
            del stage[i]
            done[i] = {"result": stop.value, "start": t0 + arrivals[i], "end": time.monotonic()}
            return
        submit(i, reqs)

    while nxt < n or stage:
        now = time.monotonic()
        if time_limit is not None and now - t0 > time_limit:
            for rid in list(owner):
                engine.abort_request(rid)
            drain(engine)
            break
        while nxt < n and t0 + arrivals[order[nxt]] <= now:
            i = order[nxt]
            nxt += 1
            submit(i, next(gens[i]))
        if not engine.has_unfinished_requests():
            if nxt < n:
                time.sleep(max(0.0, t0 + arrivals[order[nxt]] - time.monotonic()))
            continue
        for delta in engine.step():
            acc = running.get(delta.request_id)
            if acc is None:
                continue
            acc.add(delta)
            if not delta.is_final:
                continue
            out = running.pop(delta.request_id).output()
            i = owner.pop(out.request_id)
            ids, got = stage[i]
            got[out.request_id] = out
            if len(got) == len(ids):
                advance(i, [got[r] for r in ids])
    return [d if d is not None else {"incomplete": True} for d in done]


def pipeline_a(prompt, answer_len, eval_len, adapter, invocation, session=None):
    """base answers -> one adapter evaluates prompt + answer + invocation (in a pipeline session, if given,
    which keeps the base's blocks for the judge and ends with it)."""
    kw = {} if session is None else {"session": session}
    (base,) = yield [(prompt, greedy(answer_len), None, kw)]
    end = kw and {**kw, "end_session": True}
    (judge,) = yield [(prompt + base.token_ids + invocation, greedy(eval_len), adapter, end)]
    return {"base": req_metrics(base), "judge": req_metrics(judge)}


def pipeline_b(prompt, answer_len, eval_len, consolidation_len, adapters, invocations):
    """base answers -> len(adapters) judges at once -> the base reads prompt + answer + every judgement."""
    (base,) = yield [(prompt, greedy(answer_len), None)]
    context = prompt + base.token_ids
    judges = yield [(context + inv, greedy(eval_len), a) for a, inv in zip(adapters, invocations)]
    tail = [t for inv, j in zip(invocations, judges) for t in inv + j.token_ids]
    (cons,) = yield [(context + tail, greedy(consolidation_len), None)]
    return {"base": req_metrics(base), "judges": [req_metrics(j) for j in judges], "consolidation": req_metrics(cons)}


class Bench:
    """One engine for every jalora part (one compilation), with aLoRA and LoRA judges loaded."""

    def __init__(self, args, sz, cfg):
        from jalora import LLM

        self.args, self.sz, self.cfg = args, sz, cfg
        self.checkpoint = None  # (part, partial result) -> None: saves a part's rows as they come
        root = tempfile.mkdtemp(prefix="jalora-pipeline-bench-")
        model_dir = write_model_dir(os.path.join(root, "model"), cfg)
        longest = max(sz["prompt_lens"] + sz["b_prompts"]) + sz["answer_len"] + NUM_JUDGES * (2 + sz["eval_len"])
        self.max_len = longest + sz["consolidation_len"] + 64
        self.llm = LLM(model_dir, dtype=sz["dtype"], load_format="dummy", max_num_seqs=sz["max_num_seqs"],
                       max_num_batched_tokens=sz["max_num_batched_tokens"], max_model_len=self.max_len,
                       num_kv_blocks=sz["num_kv_blocks"], max_loras=2 * NUM_JUDGES, max_lora_rank=32,
                       tensor_parallel_size=args.tensor_parallel_size, warmup=False,
                       host_kv_cache_gb=args.c_host_kv_gb, compile_cache=args.compile_cache or None,
                       prefill_attention_impl=args.prefill_attention_impl)  # fmt: skip
        self.engine = self.llm.engine
        self.engine.block_manager.host_tier = None  # attached for part C's tier-on runs only (c_runs)
        self.counters = EngineCounters(self.engine)
        vocab = cfg["vocab_size"]
        self.invocations = [[vocab - 3 - i, vocab - 2] for i in range(NUM_JUDGES)]  # never in a random prompt
        self.names = {k: [f"judge{i}-{k}" for i in range(NUM_JUDGES)] for k in KINDS}
        for i in range(NUM_JUDGES):
            for k in KINDS:
                inv = self.invocations[i] if k == "alora" else None
                path = write_adapter(os.path.join(root, self.names[k][i]), cfg, RANK[k], QKV, inv, seed=i + 10 * len(k))
                self.llm.load_adapter(self.names[k][i], path)
        self.rng = np.random.default_rng(0)
        self.warmed = False
        self.warmup_s = 0.0

    def prompt(self, n: int) -> list[int]:
        """A fresh random context (no token is an invocation token, so no prefix is shared by accident)."""
        return self.rng.integers(1, self.cfg["vocab_size"] - 8, n).tolist()

    def kv_tokens(self) -> int:
        return self.engine.num_total_blocks * self.engine.config.block_size

    def warm(self):
        """The engine's own warm-up, base-only and adapted variants in one wave: every token bucket and the
        long-context decode variants (a home-made warm-up of short prompts missed those, and the first 64k
        pipeline compiled them while serving: ~12 s in its base's and its judge's TTFT on an H100)."""
        if self.warmed:
            return
        t0 = time.perf_counter()
        self.engine.warmup_adapters(progress=False, with_base=True)
        self.warmed = True
        self.warmup_s = time.perf_counter() - t0
        print(f"warm-up (every step variant, base and adapted): {self.warmup_s:.1f} s", flush=True)

    # -- A -----------------------------------------------------------------------------------------------

    def part_a(self) -> dict:
        sz = self.sz
        rows = []
        for n in sz["prompt_lens"]:
            for kind in KINDS:
                snap = self.counters.snapshot()
                gen = pipeline_a(self.prompt(n), sz["answer_len"], sz["eval_len"], self.names[kind][0],
                                 self.invocations[0])  # fmt: skip
                (res,) = run_pipelines(self.engine, [gen])
                row = {"prompt_len": n, "kind": kind, **res["result"], "pipeline_s": res["end"] - res["start"],
                       **self.counters.since(snap)}  # fmt: skip
                rows.append(row)
                j = row["judge"]
                print(f"A prompt {n} {kind}: judge TTFT {j['ttft_s'] * 1e3:.1f} ms, e2e {j['e2e_s'] * 1e3:.1f} ms, "
                      f"hit {j['hit_rate']:.0%}, compiled while serving {row['compilations']}", flush=True)  # fmt: skip
        return {"answer_len": sz["answer_len"], "eval_len": sz["eval_len"], "rows": rows}

    def part_aconc(self) -> dict:
        sz = self.sz
        longest = max(sz["prompt_lens"]) + sz["answer_len"] + 2 + sz["eval_len"]
        batch = self.args.a_batch or concurrent_batch(self.kv_tokens(), longest, sz["max_num_seqs"])
        rows = []
        for n in sz["prompt_lens"]:
            for kind in KINDS:
                snap = self.counters.snapshot()
                gens = [pipeline_a(self.prompt(n), sz["answer_len"], sz["eval_len"], self.names[kind][0],
                                   self.invocations[0]) for _ in range(batch)]  # fmt: skip
                t0 = time.monotonic()
                res = run_pipelines(self.engine, gens)
                wall = time.monotonic() - t0
                judges = [r["result"]["judge"] for r in res]
                row = {"prompt_len": n, "kind": kind, "batch": batch, "wall_s": wall, "pipelines_per_s": batch / wall,
                       "pipeline_s_mean": float(np.mean([r["end"] - r["start"] for r in res])),
                       **{f"judge_{k}_mean": float(np.mean([j[k] for j in judges]))
                          for k in ("ttft_s", "e2e_s", "prefill_s", "decode_s", "queue_s", "hit_rate")},
                       **self.counters.since(snap)}  # fmt: skip
                rows.append(row)
                print(f"Aconc prompt {n} {kind} x{batch}: judge TTFT {row['judge_ttft_s_mean'] * 1e3:.1f} ms, "
                      f"wall {wall:.2f} s, hit {row['judge_hit_rate_mean']:.0%}", flush=True)  # fmt: skip
        return {"batch": batch, "kv_tokens": self.kv_tokens(), "longest_seq": longest, "eval_len": sz["eval_len"],
                "rows": rows}

    # -- B -----------------------------------------------------------------------------------------------

    def part_b(self) -> dict:
        sz = self.sz
        rows = []
        for n in sz["b_prompts"]:
            for kind in KINDS:
                snap = self.counters.snapshot()
                gen = pipeline_b(self.prompt(n), sz["answer_len"], sz["eval_len"], sz["consolidation_len"],
                                 self.names[kind], self.invocations)  # fmt: skip
                (res,) = run_pipelines(self.engine, [gen])
                r = res["result"]
                js = r["judges"]
                row = {"prompt_len": n, "kind": kind, "pipeline_s": res["end"] - res["start"], "base": r["base"],
                       "judges": js, "consolidation": r["consolidation"],
                       "judges_wall_s": max(j["e2e_s"] for j in js), "judge_ttft_max_s": max(j["ttft_s"] for j in js),
                       "judge_hit_rate_mean": float(np.mean([j["hit_rate"] for j in js])),
                       **self.counters.since(snap)}  # fmt: skip
                rows.append(row)
                print(f"B prompt {n} {kind}: pipeline {row['pipeline_s'] * 1e3:.1f} ms", flush=True)
        return {"judges": NUM_JUDGES, "consolidation_len": sz["consolidation_len"], "rows": rows}

    # -- C -----------------------------------------------------------------------------------------------

    def part_c(self) -> dict:
        sz, bm, eng = self.sz, self.engine.block_manager, self.engine
        bs = eng.config.block_size
        per_pipeline = -(-(sz["c_prompt"] + sz["c_answer"] + 2 + sz["c_eval"]) // bs)
        cap = min(self.args.c_kv_pipelines * per_pipeline, eng.num_total_blocks)
        rows = []

        def result() -> dict:
            return {"prompt": sz["c_prompt"], "answer": sz["c_answer"], "eval": sz["c_eval"],
                    "pipelines": sz["c_pipelines"], "kv_blocks": cap, "kv_pipelines": self.args.c_kv_pipelines,
                    "blocks_per_pipeline": per_pipeline, "time_limit_s": sz["c_max_seconds"], "rows": rows}  # fmt: skip

        with reserved_blocks(bm, eng.num_total_blocks - cap), c_sessions(eng, cap, self.args) as sessions_on:
            for kind in self.args.c_kinds:
                for rate, host_gb, sessions in c_runs(self.args, eng):
                    sessions_on(sessions)
                    bm.reset_prefix_cache()
                    snap = self.counters.snapshot()
                    arrivals = poisson_arrivals(rate, sz["c_pipelines"], seed=int(rate * 1000))
                    gens = [pipeline_a(self.prompt(sz["c_prompt"]), sz["c_answer"], sz["c_eval"], self.names[kind][0],
                                       self.invocations[0], f"c{k}" if sessions else None)
                            for k in range(len(arrivals))]  # fmt: skip
                    t0 = time.monotonic()
                    res = run_pipelines(eng, gens, arrivals, time_limit=sz["c_max_seconds"])
                    wall = time.monotonic() - t0
                    ok = [r for r in res if "result" in r]
                    lat = [r["end"] - r["start"] for r in ok]
                    judges = [r["result"]["judge"] for r in ok]
                    hits = [j["hit_rate"] for j in judges]
                    row = {"kind": kind, "rate": rate, "host_kv_gb": host_gb, **sessions_on.row(sessions),
                           "offered": len(res), "completed": len(ok), "wall_s": wall,
                           "completed_per_s": len(ok) / wall, "latency": percentiles(lat),
                           "judge_ttft": percentiles([j["ttft_s"] for j in judges]),
                           "hit_rate_mean": float(np.mean(hits)) if hits else None,
                           "hit_rate_p10": float(np.percentile(hits, 10)) if hits else None,
                           **self.counters.since(snap)}  # fmt: skip
                    rows.append(row)
                    p = row["latency"]
                    tier = (f" + host {host_gb:g} GiB" if host_gb else "") + (" + sessions" if sessions else "")
                    print(f"C {kind}{tier} rate {rate}/s: {len(ok)}/{len(res)} done in {wall:.1f} s, p50 "
                          f"{fmt_s(p['p50'])} p99 {fmt_s(p['p99'])}, hit {row['hit_rate_mean'] or 0:.0%}, "
                          f"preemptions {row['preemptions']}", flush=True)  # fmt: skip
                    if self.checkpoint:  # a run cut short by a time limit keeps the rates it finished
                        self.checkpoint("C", result())
        bm.reset_prefix_cache()
        return result()

    # -- the jalora side of the baseline's throughput ------------------------------------------------------

    def throughput(self) -> dict:
        """32 concurrent pipelines per kind; with --tp-passes N the first N-1 passes only compile (a run
        with --no-warmup compiles just the buckets this part uses) and the last one is measured."""
        sz = self.sz
        out = {}
        for kind in KINDS:
            for p in range(self.args.tp_passes):
                gens = [pipeline_a(self.prompt(sz["tp_prompt"]), sz["answer_len"], sz["eval_len"],
                                   self.names[kind][0], self.invocations[0])
                        for _ in range(sz["tp_pipelines"])]  # fmt: skip
                t0 = time.monotonic()
                run_pipelines(self.engine, gens)
                wall = time.monotonic() - t0
                print(f"jalora {sz['tp_pipelines']} concurrent {kind} pipelines, pass {p + 1}/{self.args.tp_passes}: "
                      f"{wall:.2f} s", flush=True)  # fmt: skip
            out[kind] = {"wall_s": wall, "pipelines_per_s": sz["tp_pipelines"] / wall, "passes": self.args.tp_passes}
        return out

    # -- ceilings ------------------------------------------------------------------------------------------

    def ceilings(self, ceil: dict) -> dict:
        from bench import throughput as tp

        # Every prompt of these is new (bench.throughput seeds them by length and batch): nothing comes from
        # the prefix cache, which stays on as the other parts use it.
        prefill = [tp.bench_prefill(self.llm, n, reps=3) for n in (2048, 8192) if n <= sz_cap(self)]
        decode = [tp.bench_decode(self.llm, b, 1024, 32) for b in (1, 16, 64) if b <= self.sz["max_num_seqs"]]
        for p in prefill:
            p["mfu_vs_measured_matmul"] = p["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
        for d in decode:
            d["roofline_seconds"] = (d["weight_bytes"] + d["kv_bytes"]) / (ceil["hbm_GBps"] * 1e9)
            d["step_over_roofline"] = d["step_seconds"] / d["roofline_seconds"]
        return {"ceilings": ceil, "prefill": prefill, "decode": decode, "max_model_len": self.engine.max_model_len}

    def engine_only_ceilings(self) -> dict:
        """CPU: the engine-side measurements at small sizes (no device ceilings to compare with)."""
        from bench import throughput as tp

        prefill = [tp.bench_prefill(self.llm, min(256, sz_cap(self)), reps=2)]
        decode = [tp.bench_decode(self.llm, 1, 128, 8)]
        return {"ceilings": {}, "prefill": prefill, "decode": decode, "max_model_len": self.engine.max_model_len}


def sz_cap(bench) -> int:
    """The longest prefill one step can take (one chunk, below max_model_len)."""
    return min(bench.sz["max_num_batched_tokens"], bench.engine.max_model_len - 1)


def c_runs(args, engine):
    """(rate, host tier GiB, sessions) of each part-C run of one kind: every rate plain, then with
    --c-host-kv-gb the host-memory KV tier on, with --c-sessions pipeline sessions on (each pipeline's session
    keeps its base's blocks for its judge), with both flags also both. The same engine throughout: its tier is
    attached to the block manager for the tier's runs only."""
    bm, tier = engine.block_manager, engine.host_tier
    gbs = (0.0, args.c_host_kv_gb) if args.c_host_kv_gb else (0.0,)
    sessions = (False, True) if args.c_sessions else (False,)
    try:
        for rate in args.c_rates:
            for s in sessions:
                for gb in gbs:
                    bm.host_tier = tier if gb else None
                    yield rate, gb, s
    finally:
        bm.host_tier = None


class reserved_blocks:
    """Holds `n` KV blocks for a while, through the block manager's own allocate/release, as a request that
    is never scheduled would: the engine's cache size is fixed at construction, and a second engine with a
    smaller cache would compile every program again (and need device memory for a second set of weights)."""

    def __init__(self, bm, n: int):
        from jalora import SamplingParams
        from jalora.engine.request import Request

        self.bm, self.n = bm, max(0, n)
        self.holder = Request("reserved-blocks", [0], SamplingParams(), seed=0)

    def __enter__(self):
        self.bm.reset_prefix_cache()
        if not self.bm.allocate(self.holder, self.n * self.bm.block_size):
            raise RuntimeError(f"cannot reserve {self.n} KV blocks: {self.bm.num_free_blocks()} are free")
        return self

    def __exit__(self, *exc):
        self.bm.release(self.holder)


class c_sessions:
    """Pipeline sessions in part C: they may retain --c-session-share of C's capped cache (not of the whole
    one); before each run (and after the last) the sessions a time-limited run left are ended."""

    def __init__(self, engine, cap: int, args):
        self.engine, self.sessions = engine, engine.sessions
        self.max, self.evicted = int(args.c_session_share * cap), 0

    def __enter__(self):
        self.old, self.sessions.max_blocks = self.sessions.max_blocks, self.max
        return self

    def __call__(self, on: bool) -> None:
        for sid in list(self.sessions.live):
            self.engine.end_session(sid)
        self.evicted = dataclasses.replace(self.sessions.counters)

    def row(self, on: bool) -> dict:
        now, then = self.sessions.counters, self.evicted
        return {"sessions": on, "session_blocks": self.max, "sessions_evicted": now.evicted - then.evicted,
                "sessions_reclaimed": now.reclaimed - then.reclaimed}  # fmt: skip

    def __exit__(self, *exc):
        self(False)
        self.sessions.max_blocks = self.old


def fmt_s(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


# -- transformers + PEFT (child process) ---------------------------------------------------------------------


def hf_worker(args) -> dict:
    """The pipeline of A with transformers + PEFT: sync at each prompt length, then batched throughput."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    sz = sizes(args.model, args.quick)
    cfg = model_config(args.model, args.layers)
    dev = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    hf_cfg = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                        if k not in ("architectures", "model_type")})  # fmt: skip
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.eval()
    inv = [cfg["vocab_size"] - 3, cfg["vocab_size"] - 2]
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=64, target_modules=QKV,
                                             lora_dropout=0.0, alora_invocation_tokens=inv), adapter_name="alora")
    model.add_adapter("plain", LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=QKV,
                                         lora_dropout=0.0))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.02)
    adapters_dir = tempfile.mkdtemp(prefix="jalora-peft-")
    model.save_pretrained(adapters_dir, selected_adapters=["alora", "plain"])  # PEFT's own format, as served
    model.eval()
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    sync = lambda: torch.cuda.synchronize() if dev == "cuda" else None  # noqa: E731

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.t = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    def gen(ids, n, **kw):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, use_cache=True, **kw)  # fmt: skip

    @torch.no_grad()
    def pipeline(n, kind, batch=1):
        ids = torch.tensor(rng.integers(1, cfg["vocab_size"] - 8, (batch, n)), device=dev)
        sync()
        t0 = time.perf_counter()
        with model.disable_adapter():
            base = gen(ids, sz["answer_len"], return_dict_in_generate=True)
        sync()
        t1 = time.perf_counter()
        jids = torch.cat([base.sequences, torch.tensor([inv] * batch, device=dev)], dim=1)
        model.set_adapter({"alora": "alora", "lora": "plain"}[kind])  # PEFT warns on names containing "lora_"
        first = FirstToken() if batch == 1 else None
        kw = {"past_key_values": base.past_key_values} if kind == "alora" else {}  # PEFT's aLoRA cache reuse
        cached = base.past_key_values.get_seq_length() if kind == "alora" else 0
        t2 = time.perf_counter()
        out = gen(jids, sz["eval_len"], streamer=first, **kw)
        sync()
        t3 = time.perf_counter()
        assert out.shape[1] == jids.shape[1] + sz["eval_len"]
        row = {"prompt_len": n, "kind": kind, "batch": batch, "base_s": t1 - t0, "pipeline_s": t3 - t0,
               "judge": {"prompt_tokens": jids.shape[1], "cached_tokens": cached, "hit_rate": cached / jids.shape[1],
                         "e2e_s": t3 - t2}}  # fmt: skip
        if first is not None:
            row["judge"]["ttft_s"] = first.t - t2
        return row

    for kind in KINDS:  # warm-up: kernels, allocator, autotuning
        pipeline(64, kind)
    rows = []
    for n in sz["hf_prompts"]:
        for kind in KINDS:
            rows.append(pipeline(n, kind))
            j = rows[-1]["judge"]
            print(f"PEFT prompt {n} {kind}: judge TTFT {j['ttft_s'] * 1e3:.1f} ms, e2e {j['e2e_s'] * 1e3:.1f} ms",
                  flush=True)  # fmt: skip
    tput = {}
    for kind in KINDS:
        r = pipeline(sz["tp_prompt"], kind, batch=sz["tp_pipelines"])
        tput[kind] = {"wall_s": r["pipeline_s"], "pipelines_per_s": sz["tp_pipelines"] / r["pipeline_s"]}
        print(f"PEFT {sz['tp_pipelines']} batched {kind} pipelines: {r['pipeline_s']:.2f} s", flush=True)
    import peft
    import transformers

    return {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "dtype": str(dtype),
            "init_s": init_s, "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "rows": rows, "throughput": tput}  # fmt: skip


def run_hf_child(args) -> dict:
    """The PEFT baseline in a child process (JAX kept off the GPU there), before this process uses the GPU."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="jalora-peft-")
    os.close(fd)
    cmd = [sys.executable, "-m", __spec__.name, "--model", args.model, "--hf-worker", path]
    if args.quick:
        cmd.append("--quick")
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        return {"error": f"PEFT worker exited with {proc.returncode}", "seconds": time.perf_counter() - t0}
    with open(path) as f:
        return json.load(f)


# -- output --------------------------------------------------------------------------------------------------


def plots(r: dict, stem: str, folder: str) -> list[str]:
    """Writes <stem>_A.png and <stem>_C.png (the parts present) into `folder`; returns their names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    parts, written = r.get("parts", {}), []
    title = f"{r.get('model')} on {r.get('device')}"
    if "A" in parts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "ttft_s", "adapter TTFT"), (axes[1], "e2e_s", "adapter end-to-end")):
            for kind, color in (("alora", "tab:blue"), ("lora", "tab:red")):
                rows = [x for x in parts["A"]["rows"] if x["kind"] == kind]
                ax.plot([x["prompt_len"] for x in rows], [x["judge"][key] * 1e3 for x in rows], "o-", color=color,
                        label=f"{kind} r={RANK[kind]}, 1 pipeline")  # fmt: skip
                if "Aconc" in parts:
                    crows = [x for x in parts["Aconc"]["rows"] if x["kind"] == kind]
                    ax.plot([x["prompt_len"] for x in crows], [x[f"judge_{key}_mean"] * 1e3 for x in crows], "s--",
                            color=color, alpha=0.7, label=f"{kind}, {parts['Aconc']['batch']} concurrent (mean)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("ms")
            ax.set_title(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"A. base -> adapter: aLoRA reuse vs LoRA recompute ({title})", fontsize=10)
        fig.tight_layout()
        written.append(f"{stem}_A.png")
        fig.savefig(os.path.join(folder, written[-1]), dpi=110)
        plt.close(fig)
    if "C" in parts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        c = parts["C"]
        for (kind, sess), color in ((("alora", False), "tab:blue"), (("lora", False), "tab:red"),
                                    (("alora", True), "tab:green"), (("lora", True), "tab:purple")):  # fmt: skip
            rows = [x for x in c["rows"] if x["kind"] == kind and x.get("sessions", False) == sess]
            if not rows:
                continue
            kind += " sessions" if sess else ""
            rates = [x["rate"] for x in rows]
            for q, style in (("p50", "o-"), ("p90", "^--"), ("p99", "v:")):
                vals = [np.nan if x["latency"][q] is None else x["latency"][q] for x in rows]
                axes[0].plot(rates, vals, style, color=color, label=f"{kind} {q}")
            axes[1].plot(rates, [np.nan if x["hit_rate_mean"] is None else x["hit_rate_mean"] for x in rows], "o-",
                         color=color, label=f"{kind} mean")  # fmt: skip
            axes[1].plot(rates, [np.nan if x["hit_rate_p10"] is None else x["hit_rate_p10"] for x in rows], "v:",
                         color=color, label=f"{kind} p10")  # fmt: skip
        axes[0].set_yscale("log")
        axes[0].set_ylabel("pipeline latency, s")
        axes[1].set_ylabel("adapter cache hit rate")
        axes[1].set_ylim(-0.05, 1.05)
        for ax in axes:
            ax.set_xlabel("arrival rate, pipelines/s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"C. Poisson arrivals, KV cache {c['kv_blocks']} blocks ({c['kv_pipelines']} pipelines' "
                     f"worth) ({title})", fontsize=10)  # fmt: skip
        fig.tight_layout()
        written.append(f"{stem}_C.png")
        fig.savefig(os.path.join(folder, written[-1]), dpi=110)
        plt.close(fig)
    return written


def merge(old: dict | None, new_parts: dict) -> dict:
    parts = dict((old or {}).get("parts", {}))
    keys = {"A": lambda x: (x["prompt_len"], x["kind"]), "Aconc": lambda x: (x["prompt_len"], x["kind"]),
            "B": lambda x: (x["prompt_len"], x["kind"]),
            "C": lambda x: (x["kind"], x["rate"], x.get("host_kv_gb", 0.0), x.get("sessions", False))}  # fmt: skip
    for name, p in new_parts.items():
        o = parts.get(name)
        if name in keys and o and same_setup(o, p):
            p = {**p, "rows": merge_rows(o["rows"], p["rows"], keys[name]),
                 "runs": o.get("runs", [o["run"]]) + [p["run"]]}  # fmt: skip
        parts[name] = p
    return parts


def same_setup(old: dict, new: dict) -> bool:
    ignore = {"rows", "run", "runs"}
    return {k: v for k, v in old.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", *MODELS), default="granite-8b",
                    help="shapes (dummy weights); llama-70b and mistral-large need several GPUs")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="devices the model is split over")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="keep N of the model's decoder layers: a large model's layer shapes on one device")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--no-plots", action="store_true", help="no PNG beside the result file (its tables only)")
    ap.add_argument("--prompt-lens", type=int, nargs="*", help="A / Aconc prompt lengths")
    ap.add_argument("--a-batch", type=int, default=None, help="Aconc batch (default: KV capacity / longest sequence)")
    ap.add_argument("--b-prompts", type=int, nargs="*")
    ap.add_argument("--c-rates", type=float, nargs="*")
    ap.add_argument("--c-kinds", nargs="*", default=None, choices=KINDS, help="default: alora (both with --quick)")
    ap.add_argument("--c-pipelines", type=int)
    ap.add_argument("--c-kv-pipelines", type=int, help="KV cache for C, in pipelines' worth of blocks")
    ap.add_argument("--c-max-seconds", type=float, help="time limit per rate (the rest is aborted)")
    ap.add_argument("--c-host-kv-gb", type=float, default=0.0,
                    help="C: also run every rate with a host-memory KV tier of this many GiB (0: tier off only)")
    ap.add_argument("--c-sessions", action="store_true",
                    help="C: each rate without, then with pipeline sessions")  # fmt: skip
    ap.add_argument("--c-session-share", type=float, default=0.8,
                    help="C with --c-sessions: the share of the capped cache sessions may retain (bases that finish "
                         "together retain many blocks at once; 0.5 evicted sessions in CPU runs)")  # fmt: skip
    ap.add_argument("--num-kv-blocks", type=int, help="default: from device memory (GPU), 512 (--quick)")
    ap.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "jalora-jax-cache"),
                    help="JAX persistent compilation cache, EngineConfig.compile_cache ('' to disable)")  # fmt: skip
    ap.add_argument("--prefill-attention-impl", choices=("kernel", "cudnn", "reference"), default=None,
                    help="EngineConfig.prefill_attention_impl (one sequence's prefill chunks; default: the engine's)")
    ap.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="GPU attention tuning fields to replace for this run (e.g. long_chunk_max_rows=32), "
                         "recorded as gpu_tuning_changes")  # fmt: skip
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip compiling every bucket up front (then the first measurements include compilation)")
    ap.add_argument("--tp-passes", type=int, default=1,
                    help="baseline: run jalora's concurrent pipelines this many times, report the last")
    ap.add_argument("--out", default=None, help="result file name (default pipeline_bench_<model>.json)")
    ap.add_argument("--reuse-peft", action="store_true",
                    help="baseline: keep the transformers + PEFT numbers of the result file (their run is recorded "
                         "with them) and measure only jalora's side again")
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_worker:
        res = hf_worker(args)
        with open(args.hf_worker, "w") as f:
            json.dump(res, f)
        return res
    if args.tp_passes < 1:
        ap.error("--tp-passes must be >= 1")
    if not args.c_host_kv_gb >= 0:
        ap.error("--c-host-kv-gb must be >= 0")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")
    if "baseline" in parts and args.tensor_parallel_size > 1:
        ap.error("the PEFT baseline runs on one device; leave out the baseline part with --tensor-parallel-size")
    from bench.profile_step import set_gpu_tuning, tuning_fields

    tuning = tuning_fields(args.tuning)  # (refused now, before any slow work; applied before the engine is built)
    sz = sizes(args.model, args.quick)
    for k, v in (("prompt_lens", args.prompt_lens), ("b_prompts", args.b_prompts), ("c_rates", args.c_rates),
                 ("c_pipelines", args.c_pipelines), ("c_kv_pipelines", args.c_kv_pipelines),
                 ("c_max_seconds", args.c_max_seconds), ("num_kv_blocks", args.num_kv_blocks)):  # fmt: skip
        if v is not None:
            sz[k] = v
    args.c_rates, args.c_kv_pipelines = sz["c_rates"], sz["c_kv_pipelines"]
    args.c_kinds = args.c_kinds or (list(KINDS) if args.quick else ["alora"])
    t_start = time.perf_counter()
    new: dict = {}

    suffix = f"_tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    suffix += f"_l{args.layers}" if args.layers is not None else ""
    path = result_path(args.out, f"pipeline_bench_{args.model}{suffix}.json", smoke=args.quick)
    old = None
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    if old and (old.get("model") != args.model or old.get("quick") != args.quick
                or old.get("layers") != args.layers):  # fmt: skip
        old = None  # never mix a CPU smoke run with a GPU run

    # 1. transformers + PEFT first, in a child process, before JAX takes the GPU.
    peft_res = None
    if "baseline" in parts and args.reuse_peft:
        old_base = (old or {}).get("parts", {}).get("baseline") or {}
        if "peft" not in old_base:
            raise SystemExit(f"--reuse-peft: {path} holds no baseline part of a {args.model} run to reuse")
        stale = [k for k in ("tp_pipelines", "tp_prompt", "hf_prompts") if old_base.get(k) != sz[k]]
        if stale:
            raise SystemExit(f"--reuse-peft: the stored PEFT run used other {', '.join(stale)}; measure it again")
        peft_res = {**old_base["peft"], "measured_in_run": old_base["peft"].get("measured_in_run")
                    or old_base.get("run")}  # fmt: skip
    elif "baseline" in parts:
        peft_res = run_hf_child(args)
    if peft_res is not None and os.environ.get("OUT"):  # kept even if the jalora half runs out of time
        with open(os.path.join(os.environ["OUT"], "peft_baseline.json"), "w") as f:
            json.dump(peft_res, f, indent=2)

    if tuning:
        set_gpu_tuning(tuning)
    from bench.harness import measure_ceilings, run_metadata

    meta = run_metadata(__spec__.name, argv)
    run = lambda: {**meta, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # noqa: E731

    # 2. ceilings before the engine takes (almost) all the device memory for its KV cache.
    ceil = None
    if "ceilings" in parts:
        if meta["platform"] == "gpu":
            ceil = measure_ceilings()
        else:
            print("ceilings: GPU only (measure_ceilings allocates 2 GiB buffers); CPU runs the engine half only")
    cfg = model_config(args.model, args.layers)
    bench = Bench(args, sz, cfg)
    if not args.no_warmup:
        bench.warm()
    common = {"warmup_s": bench.warmup_s, "kv_tokens": bench.kv_tokens(), "max_model_len": bench.engine.max_model_len,
              "prefill_attention": bench.engine.runner.plan.prefill, "gpu_tuning_changes": tuning}

    def flush() -> dict:
        """Saves what is measured so far: a run cut short by a time limit keeps its finished parts."""
        result = {**meta, "model": args.model, "layers": args.layers, "tensor_parallel_size": args.tensor_parallel_size,
                  "quick": args.quick, "sizes": sz, **common,
                  "parts": merge(old, new), "seconds": time.perf_counter() - t_start}  # fmt: skip
        save(path, result)
        return result

    steps = [("ceilings", lambda: bench.ceilings(ceil) if ceil else bench.engine_only_ceilings()),
             ("A", bench.part_a), ("Aconc", bench.part_aconc), ("B", bench.part_b),
             ("baseline", lambda: {"peft": peft_res, "jalora_throughput": bench.throughput(),
                                   "tp_pipelines": sz["tp_pipelines"], "tp_prompt": sz["tp_prompt"],
                                   "hf_prompts": sz["hf_prompts"]}),
             ("C", bench.part_c)]  # fmt: skip

    def checkpoint(part: str, partial: dict) -> None:
        new[part] = {**partial, "run": run()}
        flush()

    bench.checkpoint = checkpoint
    for part, fn in steps:
        if part in parts:
            new[part] = {**fn(), "run": run()}
            flush()
            print(f"[{time.perf_counter() - t_start:.0f} s] part {part} done", flush=True)
    result = flush()
    print()
    print("\n".join(pipeline_bench_tables(result)))
    folder = os.path.dirname(os.path.abspath(path))
    written = [] if args.no_plots else plots(result, os.path.splitext(os.path.basename(path))[0], folder)
    out_dir = os.environ.get("OUT")
    if out_dir and os.path.abspath(out_dir) != folder:  # the device machine's return folder
        import shutil

        for w in written:
            shutil.copy(os.path.join(folder, w), os.path.join(out_dir, w))
    print("wrote", path, *[os.path.join(folder, w) for w in written])
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return result


if __name__ == "__main__":
    main()
