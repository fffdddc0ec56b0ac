"""A decoder's weight traffic with its layers unrolled vs looped (`lax.scan` over stacked weights): does
the loop copy each layer's weights out of the stack before its matmuls?

    python -m bench.scan_layers                       # H200: Granite-8B matmul shapes, 40 layers, bf16
    python -m bench.scan_layers --rows 16 512 4096    # the same at several step sizes (token rows)
    python -m bench.scan_layers --quick               # CPU smoke run (tiny shapes; written under /tmp)

Why: start-up compiles every step variant with 40 unrolled layers (bench/startup_gpu.py: compiling them
is most of a cold start), and a scanned decoder, which compiles one layer body, made
the batch-1 decode step 2.6x slower on the H200 (reverted). At batch 1 a decode step reads every weight
once; a loop whose body first copies the layer's slice of each stacked weight (a read and a write) and
then reads the copy moves about three times the bytes. This benchmark isolates that: the layers' four
matmuls (fused q/k/v, o, fused gate/up, down) with the norms and activation between them and no
attention, at the engine's smallest step (16 token rows) unless --rows says others, each variant in a
process of its own (XLA flags are read once per process):

    unrolled     one copy of the body per layer, each over its own weight arrays (what the engine's
                 compiled step is)
    scan         lax.scan over weights stacked [layers, ...]
    scan+dsf     the same with XLA's dynamic-slice fusion on (--xla_gpu_enable_dynamic_slice_fusion): a
                 matmul reads its operand at the loop's offset instead of from a copy (GPU only)
    scan+cublas  scan, compiled with XLA's Triton GEMM fusions off (the compile option
                 xla_gpu_enable_triton_gemm=False, for this executable only): the matmuls go to cuBLAS
    unrolled+cublas  the same option on the unrolled layers (GPU only)
    calls        one compiled layer (the body alone) launched once per layer from Python, each launch
                 with that layer's own weight arrays: compiles one layer like the scan, reads the weights
                 like the unrolled step, and pays a launch per layer on the host (`dispatch_ms`: the
                 time to enqueue the step's launches through jax.jit, which the device must not wait
                 for; `dispatch_compiled_ms` the same through the Compiled object). CPU smoke, 40 tiny
                 layers: 28 us a launch through jax.jit, 31 us through Compiled

Found on the H200 (bench/results/scan_layers*.json): the scan is 2.57x the unrolled step at 16 rows and
the cause is XLA's Triton GEMM fusions over the loop's dynamic slices, not a copy: with those off
(`scan+cublas`) the scan costs what the unrolled layers do with cuBLAS.

Each reports the step's median milliseconds, the weight bytes over the measured copy bandwidth (the
roofline), the seconds to trace and lower and to compile, and how many dynamic-slice and copy
instructions the optimized module has.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from bench.harness import GRANITE_8B, TINY, result_path, run_metadata, save

DSF_FLAG = "--xla_gpu_enable_dynamic_slice_fusion=true"
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}


def shapes(quick: bool, layers: int | None, rows: int = 16) -> dict:
    cfg = TINY if quick else GRANITE_8B
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"d": d, "f": f, "qkv": d + 2 * kv, "layers": layers or cfg["num_hidden_layers"], "rows": rows,
            "dtype": "float32" if quick else "bfloat16"}  # fmt: skip


def _child(spec: dict) -> None:
    import jax
    import jax.numpy as jnp

    from bench.harness import copy_bandwidth, timeit

    s, variant = spec["shapes"], spec["variant"]
    dt = jnp.dtype(s["dtype"])
    d, f, qkv, n = s["d"], s["f"], s["qkv"], s["layers"]
    keys = iter(jax.random.split(jax.random.key(0), 8))

    def stacked(shape):  # [layers, *shape], small values so 40 residual adds stay finite
        return (jax.random.normal(next(keys), (n, *shape), jnp.float32) * 0.02).astype(dt)

    w = {"qkv": stacked((d, qkv)), "o": stacked((d, d)), "gate_up": stacked((d, 2 * f)), "down": stacked((f, d))}
    norms = stacked((2, d)) + 1
    x = jax.random.normal(next(keys), (s["rows"], d), jnp.float32).astype(dt)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in w.values())

    def rms(h, g):
        hf = h.astype(jnp.float32)
        return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-5) * g.astype(jnp.float32)).astype(dt)

    def mm(h, m):
        return jnp.dot(h, m, preferred_element_type=jnp.float32).astype(dt)

    def layer(h, lw, g):
        q = mm(rms(h, g[0]), lw["qkv"])[:, :d]  # (attention left out: the weights' traffic alone)
        h = h + mm(q, lw["o"])
        gu = mm(rms(h, g[1]), lw["gate_up"]).astype(jnp.float32)
        return h + mm((jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(dt), lw["down"])

    if variant == "calls":  # one compiled layer, launched once per layer from this thread
        per_layer = [({k: a[i] for k, a in w.items()}, norms[i]) for i in range(n)]
        jax.block_until_ready(per_layer)
        del w
        t0 = time.perf_counter()
        lowered = jax.jit(layer).lower(x, *per_layer[0])
        t1 = time.perf_counter()
        compiled = lowered.compile(spec.get("compiler_options") or None)
        t2 = time.perf_counter()

        fast = jax.jit(layer)  # launched as an engine would: jax.jit's C++ dispatch, not Compiled.__call__

        def run(f):
            h = x
            for lw, g in per_layer:
                h = f(h, lw, g)
            return h

        def enqueue_ms(f):  # the host's time to enqueue the n launches (the device runs behind it)
            jax.block_until_ready(run(f))
            t = time.perf_counter()
            out = run(f)
            took = time.perf_counter() - t
            out.block_until_ready()
            return took * 1e3

        step = timeit(lambda: run(fast).block_until_ready(), warmup=3, iters=30)
        dispatch, dispatch_compiled = enqueue_ms(fast), enqueue_ms(compiled)
        hlo = compiled.as_text()
        bw = copy_bandwidth(1 << 30) * 1e9
        print(json.dumps({
            "step_ms": step * 1e3, "weight_bytes": weight_bytes, "roofline_ms": weight_bytes / bw * 1e3,
            "step_over_roofline": step / (weight_bytes / bw), "copy_bandwidth_GBps": bw / 1e9,
            "trace_lower_s": t1 - t0, "compile_s": t2 - t1, "dispatch_ms": dispatch,
            "dispatch_compiled_ms": dispatch_compiled,
            "dynamic_slices": hlo.count("dynamic-slice("), "copies": hlo.count(" copy("),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }))  # fmt: skip
        return
    if variant == "unrolled":
        per_layer = [({k: a[i] for k, a in w.items()}, norms[i]) for i in range(n)]  # separate arrays
        jax.block_until_ready(per_layer)
        del w

        def fn(h, layers):
            for lw, g in layers:
                h = layer(h, lw, g)
            return h

        args = (x, per_layer)
    else:

        def fn(h, stacks):
            ws, gs = stacks
            return jax.lax.scan(lambda c, lw_g: (layer(c, *lw_g), None), h, (ws, gs))[0]

        args = (x, (w, norms))
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(spec.get("compiler_options") or None)
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    step = timeit(lambda: compiled(*args).block_until_ready(), warmup=3, iters=30)
    bw = copy_bandwidth(1 << 30) * 1e9
    print(json.dumps({
        "step_ms": step * 1e3, "weight_bytes": weight_bytes, "roofline_ms": weight_bytes / bw * 1e3,
        "step_over_roofline": step / (weight_bytes / bw), "copy_bandwidth_GBps": bw / 1e9,
        "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
        "dynamic_slices": hlo.count("dynamic-slice("), "copies": hlo.count(" copy("),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }))  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, float32")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    p.add_argument("--rows", type=int, nargs="+", default=[16], help="token rows of the step (default: 16)")
    p.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    p.add_argument("--out", default=None, help="result file (default: bench/results/scan_layers.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        _child(json.loads(args.child))
        return None
    import jax

    gpu = jax.default_backend() == "gpu"
    variants = {"unrolled": "", "scan": "", "calls": ""}
    if gpu:
        variants |= {"scan+dsf": DSF_FLAG, "scan+cublas": "", "unrolled+cublas": ""}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants}
    result = {**run_metadata(__spec__.name, argv), "quick": args.quick, "shapes": shapes(args.quick, args.layers),
              "runs": {}}  # fmt: skip
    path = result_path(args.out, "scan_layers.json", smoke=args.quick)
    for rows, (name, flag) in [(r, v) for r in args.rows for v in variants.items()]:
        s = shapes(args.quick, args.layers, rows)
        key = name if args.rows == [16] else f"{name} @{rows}"
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        proc = subprocess.run([sys.executable, "-m", "bench.scan_layers", "--child",
                               json.dumps({"shapes": s, "variant": name.split("+")[0],
                                           "compiler_options": NO_TRITON_GEMM if "cublas" in name else None})],
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        if proc.returncode != 0:
            result["runs"][key] = {"error": f"exit {proc.returncode}", "rows": rows}
        else:
            result["runs"][key] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "rows": rows}
        print(key, json.dumps(result["runs"][key]), flush=True)
        save(path, result)
    print(stdout_table(result))
    print(f"saved {path}")
    return result


def stdout_table(r: dict) -> str:
    """One row per variant; the roofline is the weight bytes over the best copy bandwidth any variant's
    process measured (one process's measure varies by tens of percent)."""
    runs = {k: x for k, x in r["runs"].items() if "error" not in x}
    bw = max((x["copy_bandwidth_GBps"] for x in runs.values()), default=None)
    unrolled = {x.get("rows", 16): x["step_ms"] for k, x in runs.items() if k.split(" @")[0] == "unrolled"}
    rows = ["| variant | step ms | x unrolled | x weight roofline | trace+lower s | compile s | dynamic-slices | "
            "copies |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, x in r["runs"].items():
        if "error" in x:
            rows.append(f"| {name} | {x['error']} | | | | | | |")
            continue
        roof = x["weight_bytes"] / (bw * 1e9) * 1e3
        base = unrolled.get(x.get("rows", 16))
        rel = "-" if base is None else f"{x['step_ms'] / base:.2f}"
        rows.append(f"| {name} | {x['step_ms']:.2f} | {rel} | {x['step_ms'] / roof:.2f} | {x['trace_lower_s']:.2f} | "
                    f"{x['compile_s']:.2f} | {x['dynamic_slices']} | {x['copies']} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
