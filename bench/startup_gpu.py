"""Start to ready with a cold and a warm compilation cache: `LLM(...)` with its warm-up, then two aLoRA
adapters (r=32, q/k/v) loaded and `warmup_adapters()`, on Granite-3.2-8B shapes with dummy bf16 weights.

    python -m bench.startup_gpu                       # H200 -> bench/results/startup_gpu.json
    python -m bench.startup_gpu --quick               # CPU smoke run: tiny shapes (written under /tmp)
    python -m bench.startup_gpu --server-order        # as `jalora serve --adapter ...` starts (one warm-up;
                                                      # -> startup_gpu_server_order.json)
    python -m bench.startup_gpu --cold-only --tuning combine_axis_min_splits=0   # a kernel variant's compile cost

Each start runs in a fresh Python process, as a restarted server does. The two starts share one new,
empty compilation cache directory (EngineConfig.compile_cache): the first (cold) compiles every
executable and writes it there, the second (warm) loads them. Each process reports

    llm_s          `LLM(..., warmup=False)`: config, weights (made on the device), KV cache
    warmup_s       `engine.runner.warmup()`: every token bucket's step and the functions behind it
    adapters_s     loading the adapters (reading and placing their weights)
    warmup_adapters_s  `engine.warmup_adapters()`: every bucket's adapted step (with --server-order every
                   bucket's base-only and adapted steps, and `warmup_s` is 0)
    ready_s        the sum: what a server waits before it reports SERVING
    compiles       XLA compilations the process asked for; `cache_hits` of them came from JAX's cache
    executables    the runner's compiled steps and functions behind them; `executables_loaded` of them were
                   read from jalora's directory of compiled variants (neither traced nor lowered:
                   jalora/engine/executables.py), the rest traced, lowered and compiled (or found in JAX's
                   cache)
    cpu_s          the process's CPU time over the same span (on a shared CPU machine a steadier measure
                   of compile work than wall time)
    longest_compiles_s  the longest backend compiles' seconds (compiles run on several threads: the longest
                   bound the start's wall time)
    longest_variants  the longest compilations of the engine's functions, each with its variant (e.g.
                   "layer x8 T=8192 adapted"), timed around XLA's compile call
    warmup_phases  per warm-up call: reading or compiling the step variants, running them, reading or
                   compiling the functions behind them, running those; `compiled_alone`: compilations so
                   far that ran out of device memory beside others and were compiled again alone

The warm start's remaining time is loading the executables, running each bucket's step once and placing
the weights (what little it still compiles, small functions outside the runner's steps, comes from JAX's
cache); `--no-cache` adds a third start with the cache off (`compile_cache=None`), the baseline the
cold start's cost of writing the cache is read against.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.harness import GRANITE_8B, TINY, result_path, run_metadata, save, write_adapter, write_model_dir
from bench.profile_step import set_gpu_tuning, tuning_fields

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
    # Where a start's compile work goes (seconds, summed over the start and its threads): tracing to a jaxpr
    # and lowering it to MLIR, for what is not read back from jalora's own executables (JAX's cache is keyed
    # by the lowered module); the backend step compiles, or on a hit loads the executable (`cache_load_s` of
    # it reading JAX's cache).
    spent = {"trace_s": 0.0, "lower_s": 0.0, "backend_s": 0.0, "cache_load_s": 0.0}
    events = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "backend_s",
              "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s"}  # fmt: skip

    each: list[float] = []  # every backend compile's seconds: the longest ones bound a start's wall time

    def on_duration(name, secs, *_a, **_k):
        if name == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1
            each.append(round(secs, 2))
        if name in events:
            spent[events[name]] += secs

    def on_event(name, *_a, **_k):
        if name == "/jax/compilation_cache/cache_hits":
            counts["cache_hits"] += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    import jax

    from jalora import LLM

    spec = json.loads(args.child)
    if spec.get("tuning"):
        set_gpu_tuning(spec["tuning"])
    cpu0, t = time.process_time(), time.perf_counter()
    llm = LLM(spec["model"], load_format="dummy", max_loras=4, max_lora_rank=32, warmup=False,
              compile_cache=spec["cache"], **spec["engine"])  # fmt: skip
    times = {"llm_s": time.perf_counter() - t}

    def phase(name: str, fn) -> None:  # (each phase's time on stderr as it ends: a start cut off shows where)
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
        print(f"  {name} {times[name]:.1f} s ({counts['compiles']} compiles)", file=sys.stderr, flush=True)

    together = spec.get("together", False)  # `jalora serve --adapter ...`'s order: adapters first, one warm-up
    phase("warmup_s", lambda: None if together else llm.engine.runner.warmup(progress=False))
    phase("adapters_s", lambda: [llm.load_adapter(f"a{i}", path) for i, path in enumerate(spec["adapters"])])
    phase("warmup_adapters_s", lambda: llm.engine.warmup_adapters(progress=False, with_base=together))
    times["ready_s"] = sum(times.values())
    times["cpu_s"] = time.process_time() - cpu0
    runner = llm.engine.runner
    print(json.dumps({**times, **counts, "compile_work": spent, "longest_compiles_s": sorted(each)[::-1][:12],
                      "longest_variants": [(what, round(t, 2)) for what, t, _ in runner.compile_log()[:12]],
                      "compile_timeline": _timeline(runner.compile_log()),
                      "warmup_phases": runner.warmup_phases, "executables": runner.num_compiled(),
                      "executables_loaded": runner.num_loaded(),
                      "buckets": runner.buckets, "layers_per_launch": runner.layers_per_launch,
                      "tuning_in_effect": _tuning_in_effect(spec.get("tuning") or {}),
                      "platform": jax.default_backend(), "device": jax.devices()[0].device_kind}))  # fmt: skip


def _tuning_in_effect(fields: dict) -> dict:
    """The value of each field `--tuning` replaced in the GPU attention tuning of this process's device, the
    record its engine's kernel plan reads."""
    from pallas_kernels.ragged_paged_attention.tuning import gpu_attention_tuning

    return {k: getattr(gpu_attention_tuning(), k) for k in fields}


def _timeline(log: list) -> list:
    """Each compilation as [variant, seconds from the first one's start to its own, seconds], in the order
    they began: where the longest ones sat in their wave (the wave waits for its last)."""
    if not log:
        return []
    first = min(started for _, _, started in log)
    return [[what, round(started - first, 2), round(t, 2)] for what, t, started in sorted(log, key=lambda x: x[2])]


def _start(spec: dict) -> dict:
    from bench.harness import REPO_ROOT

    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.startup_gpu", "--child", json.dumps(spec)], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, text=True)  # fmt: skip (its stderr: this process's)
    if proc.returncode != 0:
        raise SystemExit("bench.startup_gpu: a start failed (its error is above)")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, float32")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--no-cache", action="store_true", help="also start once with the compilation cache off")
    p.add_argument("--cold-only", action="store_true", help="only the cold start (e.g. to compare XLA_FLAGS)")
    p.add_argument("--server-order", action="store_true",
                   help="as `jalora serve --adapter ...` starts: adapters loaded first, then one warm-up of the "
                        "base-only and adapted steps together (warmup_s is 0)")  # fmt: skip
    p.add_argument("--layers-per-launch", type=int, default=None, metavar="N",
                   help="EngineConfig.layers_per_launch: a compiled group of N layers launched per group "
                        "(0: one compiled step; default: the engine's, 8 on a GPU)")  # fmt: skip
    p.add_argument("--prefill-attention-impl", choices=("kernel", "cudnn"), default=None,
                   help="EngineConfig.prefill_attention_impl (default: the engine's)")
    p.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="GPU attention tuning fields to replace in the starts (as bench.profile_step's), recorded "
                        "in the result: e.g. what a kernel variant costs to compile")  # fmt: skip
    p.add_argument("--out", default=None, help="result file (default: bench/results/startup_gpu.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args)
        return None
    tuning = tuning_fields(args.tuning)  # (a bad field refused before anything is written)
    cfg = dict(TINY if args.quick else GRANITE_8B)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    root = tempfile.mkdtemp(prefix="jalora-startup-gpu-")
    model = write_model_dir(os.path.join(root, "model"), cfg)
    v = cfg["vocab_size"]
    adapters = [write_adapter(os.path.join(root, f"a{i}"), cfg, 32, QKV, [v - 3 - i, v - 2], seed=i)
                for i in range(NUM_ADAPTERS)]  # fmt: skip
    engine = engine_kwargs(args.quick) | {"layers_per_launch": args.layers_per_launch,
                                          "prefill_attention_impl": args.prefill_attention_impl}
    cache = os.path.join(root, "compile-cache")
    spec = {"model": model, "adapters": adapters, "cache": cache, "engine": engine, "together": args.server_order,
            "tuning": tuning}  # fmt: skip
    runs = {}
    result = {
        **run_metadata(__spec__.name, argv),
        "model": {k: cfg[k] for k in MODEL_KEYS},
        "engine": {**engine, "max_loras": 4, "max_lora_rank": 32, "adapters": f"{NUM_ADAPTERS} aLoRA r=32 q/k/v"},
        "runs": runs,
        "goal_s": {"cold": 30.0, "warm": 10.0},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "gpu_tuning_changes": tuning,
        "order": "server: adapters, then one warm-up" if args.server_order else "LLM(), warm-up, adapters, warm-up",
    }
    default = "startup_gpu_server_order.json" if args.server_order else "startup_gpu.json"
    path = result_path(args.out, default, smoke=args.quick)
    starts = [("cold", spec)] + ([] if args.cold_only else [("warm", spec)])
    starts += [("off", {**spec, "cache": "none"})] if args.no_cache else []
    for temp, s in starts:
        print(f"{temp} start:", file=sys.stderr, flush=True)
        runs[temp] = _start(s)
        print(f"{temp}: ready in {runs[temp]['ready_s']:.1f} s", flush=True)
        result["cache_bytes"] = _dir_bytes(cache)
        save(path, result)  # (after each start: a run cut off keeps the starts it finished)
    shutil.rmtree(root, ignore_errors=True)
    print(stdout_table(result))
    print(f"saved {path}")
    return result


def stdout_table(r: dict) -> str:
    rows = ["| cache | LLM() s | warm-up s | adapters s | warmup_adapters s | ready s | CPU s | compiles "
            "(cache hits) | trace s | lower s | compile or load s | step executables (loaded) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for temp, s in r["runs"].items():
        w = s.get("compile_work")  # (absent from runs before it was recorded)
        work = " - | - | - |" if w is None else f" {w['trace_s']:.1f} | {w['lower_s']:.1f} | {w['backend_s']:.1f} |"
        loaded = s.get("executables_loaded")  # (absent from runs before jalora kept its own executables)
        work += " - |" if loaded is None else f" {s['executables']} ({loaded}) |"
        rows.append(f"| {temp} | {s['llm_s']:.1f} | {s['warmup_s']:.1f} | {s['adapters_s']:.1f} | "
                    f"{s['warmup_adapters_s']:.1f} | {s['ready_s']:.1f} | {s['cpu_s']:.1f} | "
                    f"{s['compiles']} ({s['cache_hits']}) |" + work)  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
