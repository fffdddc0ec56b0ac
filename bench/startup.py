"""Start-up time of `LLM(<model>.gguf)`: the first start converts the GGUF, the second reuses the conversion.

    python -m bench.startup                           # SmolLM2-135M-Instruct -> bench/results/startup_<platform>.json
    python -m bench.startup --gguf x.gguf --out /tmp/startup.json

Both starts run in fresh Python processes whose JALORA_CACHE_DIR is one new, empty directory: the
first converts the file into it (jalora/model/gguf.py), the second finds the conversion there. Each
process reports

    import_s   `from jalora import LLM` (JAX with it)
    resolve_s  the .gguf -> converted directory step (first: the conversion; second: hashing the file)
    llm_s      `LLM(gguf, warmup=False, ...)`: resolve, then config, tokenizer, weights and the KV cache
    warmup_s   then `engine.runner.warmup()`: compiling every step bucket, what warmup=True adds
    process_s  the whole process, from its launch to its exit (measured by the parent)

The GGUF cache acts on `llm_s`, the time until the model is loaded, and the acceptance is that the
second start's `llm_s` is at least 3x shorter than the first's. `warmup_s` is reported beside it and
not in that ratio: it does not depend on where the weights came from, and on a CPU it dominates a
start (the ratios with it are in `with_warmup`). The compilation cache (EngineConfig.compile_cache)
lives under the same JALORA_CACHE_DIR, so the second start loads the steps the first compiled; what
is left of its warm-up is running each bucket's step once (bench/startup_gpu.py separates the two). The
KV cache is sized explicitly (--num-kv-blocks), as the CPU default (every sequence at full length)
would time a multi-GB allocation instead of the model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RATIO_REQUIRED = 3.0


def _child(args) -> None:
    """One start, in this process: prints its timings as one JSON line."""
    t0 = time.perf_counter()
    import jax

    from jalora import LLM

    t_import = time.perf_counter() - t0
    import jalora.model.gguf as jgguf

    resolve = {}
    converted_dir = jgguf.converted_dir

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return converted_dir(*a, **k)
        finally:
            resolve["s"] = time.perf_counter() - t

    jgguf.converted_dir = timed
    t = time.perf_counter()
    llm = LLM(args.gguf, max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks, warmup=False)
    t_llm = time.perf_counter() - t
    t = time.perf_counter()
    llm.engine.runner.warmup(progress=False)
    t_warmup = time.perf_counter() - t
    print(json.dumps({
        "import_s": t_import, "resolve_s": resolve["s"], "llm_s": t_llm, "warmup_s": t_warmup,
        "buckets": list(llm.engine.runner.buckets), "model_dir": llm.engine.model_dir,
        "transformers_imported": "transformers" in sys.modules, "platform": jax.default_backend(),
    }))  # fmt: skip


def _start(args, cache: str) -> dict:
    env = dict(os.environ, JALORA_CACHE_DIR=cache)
    env.pop("JALORA_COMPILE_CACHE", None)  # the compilation cache under `cache` too (jalora/cache.py)
    cmd = [sys.executable, "-m", "bench.startup", "--child", "--gguf", args.gguf,
           "--max-model-len", str(args.max_model_len), "--num-kv-blocks", str(args.num_kv_blocks)]  # fmt: skip
    from bench.harness import REPO_ROOT

    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bench.startup: a start failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct, fetched if missing)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--out", default=None, help="result file (default: bench/results/startup_<platform>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return None
    from importlib.metadata import version

    from bench.harness import result_path, run_metadata, save
    from jalora.model.default_model import smollm2_gguf_path

    if args.gguf is None:
        args.gguf = str(smollm2_gguf_path())
    with tempfile.TemporaryDirectory(prefix="jalora-startup-") as cache:
        first = _start(args, cache)
        second = _start(args, cache)
        converted_bytes = _dir_bytes(first["model_dir"])
    assert first["model_dir"] == second["model_dir"]

    def ratio(key_sum):
        return sum(first[k] for k in key_sum) / sum(second[k] for k in key_sum)

    result = {
        **run_metadata(__spec__.name, argv),
        "gguf": os.path.abspath(args.gguf),
        "gguf_bytes": os.path.getsize(args.gguf),
        "converted_bytes": converted_bytes,
        "engine": {"max_model_len": args.max_model_len, "num_kv_blocks": args.num_kv_blocks, "warmup": False},
        "versions": {name: version(name) for name in ("gguf", "transformers", "tokenizers")},
        "first": first,
        "second": second,
        "llm_speedup": first["llm_s"] / second["llm_s"],
        "with_warmup": {
            "llm_plus_warmup_speedup": ratio(("llm_s", "warmup_s")),
            "process_speedup": first["process_s"] / second["process_s"],
        },
        "required_llm_speedup": RATIO_REQUIRED,
    }
    path = save(result_path(args.out, f"startup_{first['platform']}.json"), result)
    print(stdout_table(result))
    print(f"saved {path}")
    if result["llm_speedup"] < RATIO_REQUIRED:
        print(f"bench.startup: the second start is only {result['llm_speedup']:.1f}x faster", file=sys.stderr)
    return result


def stdout_table(r: dict) -> str:
    rows = ["| start | import s | resolve s | LLM() s | warm-up s | process s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name in ("first", "second"):
        s = r[name]
        rows.append(f"| {name} | {s['import_s']:.1f} | {s['resolve_s']:.2f} | {s['llm_s']:.2f} | "
                    f"{s['warmup_s']:.1f} | {s['process_s']:.1f} |")  # fmt: skip
    w = r["with_warmup"]
    rows.append("")
    rows.append(
        f"LLM() second start {r['llm_speedup']:.1f}x faster (required {r['required_llm_speedup']:.0f}x); "
        f"with the warm-up {w['llm_plus_warmup_speedup']:.2f}x, whole process {w['process_speedup']:.2f}x"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
