"""More aLoRA adapters than device slots: throughput with swapping against every adapter resident.

    python -m bench.adapter_swap                      # H200: Granite-8B shapes, 64 adapters, 8 vs 64 slots
    python -m bench.adapter_swap --quick              # CPU smoke run (tiny model; written under /tmp)

One workload, two engines in the same run, one after the other: `resident` (max_loras = the number of
adapters, every adapter in a slot from its load) and `swapping` (max_loras = --slots, max_cpu_loras = the
number of adapters: the others wait in host memory and are swapped into an idle slot on demand). Each
request is an aLoRA judge of a random adapter over its own random prompt (no prefix reuse between
requests), all queued at once, greedy, a fixed number of new tokens; throughput is tokens over the wall
time from the first request queued to the last one finished.

Step variants are compiled before the timed run by a warm pass: the same workload, other prompts and
adapters drawn, --warm-requests long (`--warmup` also compiles every bucket up front, which costs minutes
at Granite-8B shapes). A variant the warm pass missed compiles inside the timed run: the result reports
it (`compilations_in_run`, `compile_seconds_in_run`) and gives the throughput both with those seconds
and without them (`*_excl_compile`); the ratio is taken without them.

Swap cost, two ways: the engine's host seconds per swap during the run (EngineStats: issuing the host to
device copies and the slot writes, not waiting for them), and the same swap timed alone on the idle
engine, waiting until the slot's new weights are on the device (`swap_ms_blocking`, median).

The adapters' weights are written once (random, rank --rank on q/k/v, PEFT format) and prepared once
(`prepare_adapter`, on a thread pool, as a server prepares off its engine thread); both engines install
the same prepared host copies.
"""

import argparse
import concurrent.futures
import gc
import os
import tempfile
import time

import numpy as np

from bench.harness import GRANITE_8B, TINY, drain, result_path, run_metadata, save, write_adapter, write_model_dir

QKV = ["q_proj", "k_proj", "v_proj"]


def sizes(quick: bool) -> dict:
    if quick:
        return dict(adapters=16, slots=4, requests=192, warm_requests=64, prompt_len=32, max_tokens=16,
                    max_num_seqs=16, max_num_batched_tokens=64, dtype="float32")  # fmt: skip
    # Few buckets (16..128 token rows): each compiled step variant costs about 13 s at 40 layers.
    return dict(adapters=64, slots=8, requests=384, warm_requests=128, prompt_len=128, max_tokens=64,
                max_num_seqs=64, max_num_batched_tokens=128, dtype="bfloat16")  # fmt: skip


def workload(n: int, adapters: int, prompt_len: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt, adapter index) pairs: a random prompt (ids below the invocations) ending in the
    invocation of a random adapter."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = int(rng.integers(adapters))
        out.append((rng.integers(1, vocab - adapters - 2, size=prompt_len).tolist() + invocation(a, vocab), a))
    return out


def invocation(i: int, vocab: int) -> list[int]:
    return [vocab - 2 - i, vocab - 1]


def run(llm, requests, max_tokens: int, tag: str) -> dict:
    """Queues every request at once and steps until all are done; tokens and seconds."""
    from jalora import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    before = engine.stats()
    start = time.perf_counter()
    for i, (prompt, a) in enumerate(requests):
        engine.add_request(f"{tag}-{i}", prompt, params, f"a{a}")
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    after = engine.stats()
    compile_seconds = after.compile_seconds - before.compile_seconds
    generated = after.generation_tokens - before.generation_tokens
    prompt_tokens = after.prompt_tokens - before.prompt_tokens
    swaps = after.adapter_swaps - before.adapter_swaps
    swap_seconds = after.adapter_swap_seconds - before.adapter_swap_seconds
    return {
        "requests": len(requests),
        "seconds": seconds,
        "steps": steps,
        "generated_tokens": generated,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": generated / seconds,
        "total_tokens_per_s": (generated + prompt_tokens) / seconds,
        "output_tokens_per_s_excl_compile": generated / (seconds - compile_seconds),
        "swaps": swaps,
        "swap_host_ms_mean": 1e3 * swap_seconds / swaps if swaps else None,
        "swap_host_seconds": swap_seconds,
        "compilations_in_run": after.compilations - before.compilations,
        "compile_seconds_in_run": compile_seconds,
        "preemptions": after.num_preemptions - before.num_preemptions,
    }


def blocking_swap_ms(llm, names: list[str], iters: int) -> float | None:
    """Median ms of one swap into slot 0 of the idle engine, waiting for the slot's weights on the device."""
    import jax

    manager = llm.engine.adapters
    if manager.max_loras >= len(names):
        return None
    outside = [n for n in names if manager.slot_of(n) is None]
    ts = []
    for i in range(iters):
        jax.block_until_ready(manager.stacks)
        t0 = time.perf_counter()
        manager.place(outside[i % len(outside)], 0)
        jax.block_until_ready(manager.stacks)
        ts.append(time.perf_counter() - t0)
        outside = [n for n in names if manager.slot_of(n) is None]
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def build(model_dir: str, sz: dict, args, max_loras: int, max_cpu_loras: int | None, num_kv_blocks: int):
    from jalora import LLM

    return LLM(model_dir, load_format="dummy", dtype=sz["dtype"], max_num_seqs=sz["max_num_seqs"],
               max_num_batched_tokens=sz["max_num_batched_tokens"], max_model_len=sz["prompt_len"] + 2 +
               sz["max_tokens"], num_kv_blocks=num_kv_blocks, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
               max_lora_rank=args.rank, warmup=args.warmup, compile_cache=args.compile_cache or None)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes (tiny model)")
    ap.add_argument("--adapters", type=int, help="aLoRA adapters loaded (default 64; 16 with --quick)")
    ap.add_argument("--slots", type=int, help="device slots of the swapping engine (default 8; 4 with --quick)")
    ap.add_argument("--requests", type=int, help="requests of the timed run (default 384; 192 with --quick)")
    ap.add_argument("--warm-requests", type=int, help="requests of the warm pass (default 128; 64 with --quick)")
    ap.add_argument("--prompt-len", type=int, help="random prompt tokens before the invocation (default 128)")
    ap.add_argument("--max-tokens", type=int, help="new tokens per request (default 64)")
    ap.add_argument("--rank", type=int, default=32, help="adapter rank on q/k/v (the engine's max_lora_rank)")
    ap.add_argument(
        "--warmup",
        action="store_true",
        help="compile every bucket up front (engine and adapter warm-up) besides the warm pass",
    )
    ap.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="only the warm pass compiles (the default)"
    )
    ap.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "jalora-jax-cache"),
                    help="JAX persistent compilation cache, EngineConfig.compile_cache ('' to disable)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result file name (default adapter_swap.json)")
    args = ap.parse_args(argv)
    sz = sizes(args.quick)
    for key in ("adapters", "slots", "requests", "warm_requests", "prompt_len", "max_tokens"):
        if getattr(args, key) is not None:
            sz[key] = getattr(args, key)
    if not 1 <= sz["slots"] < sz["adapters"]:
        ap.error("--slots must be at least 1 and fewer than --adapters")

    cfg = TINY if args.quick else GRANITE_8B
    meta = run_metadata(__spec__.name if __spec__ else "bench.adapter_swap", argv)
    root = tempfile.mkdtemp(prefix="jalora-adapter-swap-")
    model_dir = write_model_dir(os.path.join(root, "model"), cfg)
    vocab, n = cfg["vocab_size"], sz["adapters"]
    seq_blocks = -(-(sz["prompt_len"] + 2 + sz["max_tokens"]) // 16)
    num_kv_blocks = 2 * sz["max_num_seqs"] * seq_blocks  # room for every running request, and some cache
    names = [f"a{i}" for i in range(n)]
    timings = {}

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        paths = list(pool.map(lambda i: write_adapter(os.path.join(root, names[i]), cfg, args.rank, QKV,
                                                      invocation(i, vocab), seed=i), range(n)))  # fmt: skip
    timings["write_adapters_s"] = time.perf_counter() - t0
    warm = workload(sz["warm_requests"], n, sz["prompt_len"], vocab, args.seed + 1)
    timed = workload(sz["requests"], n, sz["prompt_len"], vocab, args.seed)

    results, prepared = {}, None
    for case, max_loras, max_cpu_loras in (("resident", n, None), ("swapping", sz["slots"], n)):
        t0 = time.perf_counter()
        llm = build(model_dir, sz, args, max_loras, max_cpu_loras, num_kv_blocks)
        timings[f"{case}_engine_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if prepared is None:
            with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                prepared = list(pool.map(llm.engine.prepare_adapter, paths))
            timings["prepare_adapters_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        for name, p in zip(names, prepared):
            llm.load_adapter(name, p)
        timings[f"{case}_install_s"] = time.perf_counter() - t0
        if args.warmup:
            t0 = time.perf_counter()
            llm.engine.warmup_adapters(progress=False)
            timings[f"{case}_adapter_warmup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(llm, warm, sz["max_tokens"], "warm")
        timings[f"{case}_warm_pass_s"] = time.perf_counter() - t0
        results[case] = run(llm, timed, sz["max_tokens"], "timed")
        results[case]["swap_ms_blocking"] = blocking_swap_ms(llm, names, iters=9)
        drain(llm.engine)
        print(f"{case:9s} {results[case]['output_tokens_per_s_excl_compile']:9.1f} output tokens/s, "
              f"{results[case]['swaps']} swaps, {results[case]['compilations_in_run']} compilations in the run",
              flush=True)  # fmt: skip
        del llm
        gc.collect()
    key = "output_tokens_per_s_excl_compile"
    ratio = results["swapping"][key] / results["resident"][key]
    swap = results["swapping"]
    print(f"swapping / resident throughput: {ratio:.3f} (goal >= 0.8); mean swap {swap['swap_host_ms_mean']} ms "
          f"host, {swap['swap_ms_blocking']} ms alone, blocking")  # fmt: skip
    result = {
        **meta,
        "quick": args.quick,
        "model": "tiny" if args.quick else "granite-8b (dummy weights)",
        "sizes": {**sz, "rank": args.rank, "num_kv_blocks": num_kv_blocks, "warmup": args.warmup},
        "results": results,
        "throughput_ratio": ratio,
        "timings": timings,
    }
    save(result_path(args.out, "adapter_swap.json", smoke=args.quick), result)
    return result


if __name__ == "__main__":
    main()
