"""Start to ready with a cold and a warm compilation cache: `LLM(...)` with its warm-up, then two aLoRA
adapters (r=32, q/k/v) loaded and `warmup_adapters()`, on Granite-3.2-8B shapes with dummy bf16 weights.

    python -m bench.startup_gpu                       # H200 -> bench/results/startup_gpu.json
    python -m bench.startup_gpu --quick               # CPU smoke run: tiny shapes (written under /tmp)
    python -m bench.startup_gpu --quick --layers 30 --compare-unrolled   # the layer loop vs 30 unrolled layers

Each start runs in a fresh Python process, as a restarted server does. The starts of one variant share
one new, empty compilation cache directory (EngineConfig.compile_cache): the first (cold) compiles
every executable and writes it there, the second (warm) loads them. Each process reports

    llm_s          `LLM(..., warmup=False)`: config, weights (made on the device), KV cache
    warmup_s       `engine.runner.warmup()`: every token bucket's step and the functions behind it
    adapters_s     loading the adapters (reading and placing their weights)
    warmup_adapters_s  `engine.warmup_adapters()`: every bucket's adapted step
    ready_s        the sum: what a server waits before it reports SERVING
    compiles       XLA compilations the process asked for; `cache_hits` of them came from the cache
    cpu_s          the process's CPU time over the same span (on a shared CPU machine a steadier measure
                   of compile work than wall time)

`--compare-unrolled` adds the same cold/warm pair with `scan_layers=False` (one copy of the layer body
per layer over the same stacked arrays; its warm-up also runs each step, which that program makes slow on
a CPU, so compare its `compiles` and cold-minus-warm time rather than its ready time). The step time of
the looped decoder is measured by `python -m bench.profile_step`, to compare with the per-layer program's
`bench/results/profile_step_b1.json`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.harness import GRANITE_8B, TINY, result_path, run_metadata, save, write_adapter, write_model_dir

QKV = ["q_proj", "k_proj", "v_proj"]
NUM_ADAPTERS = 2
MODEL_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")  # fmt: skip


def engine_kwargs(quick: bool) -> dict:
    if quick:  # CPU: the reference kernels; few buckets
        return dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, num_kv_blocks=256)
    return dict(dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=65536 + 1024)


def _child(args) -> None:
    """One start, in this process: prints its timings and compile counts as one JSON line."""
    from jax import monitoring

    counts = {"compiles": 0, "cache_hits": 0}

    def on_duration(name, *_a, **_k):
        if name == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1

    def on_event(name, *_a, **_k):
        if name == "/jax/compilation_cache/cache_hits":
            counts["cache_hits"] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    import jax

    from jalora import LLM

    spec = json.loads(args.child)
    cpu0, t = time.process_time(), time.perf_counter()
    llm = LLM(spec["model"], load_format="dummy", max_loras=4, max_lora_rank=32, warmup=False,
              compile_cache=spec["cache"], scan_layers=spec["scan"], **spec["engine"])  # fmt: skip
    times = {"llm_s": time.perf_counter() - t}
    t = time.perf_counter()
    llm.engine.runner.warmup(progress=False)
    times["warmup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for i, path in enumerate(spec["adapters"]):
        llm.load_adapter(f"a{i}", path)
    times["adapters_s"] = time.perf_counter() - t
    t = time.perf_counter()
    llm.engine.warmup_adapters(progress=False)
    times["warmup_adapters_s"] = time.perf_counter() - t
    times["ready_s"] = sum(times.values())
    times["cpu_s"] = time.process_time() - cpu0
    runner = llm.engine.runner
    print(json.dumps({**times, **counts, "step_variants": runner._step._cache_size(), "buckets": runner.buckets,
                      "platform": jax.default_backend(), "device": jax.devices()[0].device_kind}))  # fmt: skip


def _start(spec: dict) -> dict:
    from bench.harness import REPO_ROOT

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.startup_gpu", "--child", json.dumps(spec)], cwd=REPO_ROOT,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"bench.startup_gpu: a start failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, float32")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--compare-unrolled", action="store_true", help="also start with scan_layers=False")
    p.add_argument("--out", default=None, help="result file (default: bench/results/startup_gpu.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return None
    cfg = dict(TINY if args.quick else GRANITE_8B)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    root = tempfile.mkdtemp(prefix="jalora-startup-gpu-")
    model = write_model_dir(os.path.join(root, "model"), cfg)
    v = cfg["vocab_size"]
    adapters = [write_adapter(os.path.join(root, f"a{i}"), cfg, 32, QKV, [v - 3 - i, v - 2], seed=i)
                for i in range(NUM_ADAPTERS)]  # fmt: skip
    engine = engine_kwargs(args.quick)
    variants = {"scan": True, **({"unrolled": False} if args.compare_unrolled else {})}
    runs = {}
    for name, scan in variants.items():
        cache = os.path.join(root, f"compile-cache-{name}")
        spec = {"model": model, "adapters": adapters, "cache": cache, "scan": scan, "engine": engine}
        cold = _start(spec)
        print(f"{name} cold: ready in {cold['ready_s']:.1f} s", flush=True)
        warm = _start(spec)
        print(f"{name} warm: ready in {warm['ready_s']:.1f} s", flush=True)
        runs[name] = {"cold": cold, "warm": warm, "cache_bytes": _dir_bytes(cache)}
    result = {
        **run_metadata(__spec__.name, argv),
        "model": {k: cfg[k] for k in MODEL_KEYS},
        "engine": {**engine, "max_loras": 4, "max_lora_rank": 32, "adapters": f"{NUM_ADAPTERS} aLoRA r=32 q/k/v"},
        "runs": runs,
        "goal_s": {"cold": 30.0, "warm": 10.0},
    }
    path = save(result_path(args.out, "startup_gpu.json", smoke=args.quick), result)
    print(stdout_table(result))
    print(f"saved {path}")
    return result


def stdout_table(r: dict) -> str:
    rows = ["| layers | cache | LLM() s | warm-up s | adapters s | warmup_adapters s | ready s | CPU s | compiles "
            "(cache hits) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, run in r["runs"].items():
        for temp in ("cold", "warm"):
            s = run[temp]
            rows.append(f"| {name} | {temp} | {s['llm_s']:.1f} | {s['warmup_s']:.1f} | {s['adapters_s']:.1f} | "
                        f"{s['warmup_adapters_s']:.1f} | {s['ready_s']:.1f} | {s['cpu_s']:.1f} | "
                        f"{s['compiles']} ({s['cache_hits']}) |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
