"""Prefill and decode throughput of the engine, against the hardware ceilings measured in the same run.

    python -m bench.throughput                       # H200: Granite-3.2-8B shapes, dummy bf16 weights
    python -m bench.throughput --preset tiny         # CPU smoke run (written under /tmp unless --out)

Prefill: one request of N prompt tokens, max_tokens=1, one step (tokens/s and model-FLOP utilisation
against the measured bf16 matmul rate). Decode: B requests with a C-token context; the median
engine.step() time once every request is decoding, host work included, against the roofline
(weight bytes + KV bytes read) / measured copy bandwidth.
"""

import argparse
import tempfile
import time

import numpy as np

from bench.harness import (
    GRANITE_8B,
    TINY,
    decode_step_seconds,
    measure_ceilings,
    result_path,
    run_metadata,
    save,
    write_model_dir,
)
from bench.report import throughput_stdout
from jalora import LLM, SamplingParams


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


def bench_prefill(llm, n: int, reps: int) -> dict:
    """Median time of one n-token prefill (max_tokens=1). Every prompt is new (its seed depends on n),
    so an engine with prefix caching on reuses nothing either."""
    cfg = llm.engine.model_config
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([prompt(n, cfg.vocab_size, n * 1000)], p)  # compile
    ts = []
    for r in range(reps):
        ids = prompt(n, cfg.vocab_size, n * 1000 + r + 1)
        t0 = time.perf_counter()
        llm.generate([ids], p)
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    # 2 * params per token for the matmuls (the logits only for the last token) + causal attention.
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * n / 2
    flops = 2 * matmul_params * n + attn + 2 * cfg.vocab_size * cfg.hidden_size
    return {"prompt_tokens": n, "seconds": t, "tokens_per_s": n / t, "flops": flops, "TFLOPs": flops / t / 1e12}


def bench_decode(llm, batch: int, context: int, steps: int) -> dict:
    """Median engine.step() time of `batch` decoding requests with `context`-token prompts (new prompts:
    nothing comes from the prefix cache), and a replay of that step (bench.harness)."""
    engine = llm.engine
    cfg = engine.model_config
    prompts = [prompt(context, cfg.vocab_size, 10_000_000 + 1000 * batch + i) for i in range(batch)]
    t, replay_t = decode_step_seconds(engine, prompts, [None] * batch, steps)
    itemsize = np.dtype(engine.dtype).itemsize
    weight_bytes = cfg.num_params() * itemsize
    kv_bytes = batch * (context + 4 + steps / 2) * cfg.num_layers * 2 * cfg.kv_size * itemsize
    # device_step_seconds: a replay of the step (dispatch + device, waited on; bench.harness)
    return {"batch": batch, "context": context, "step_seconds": t, "device_step_seconds": replay_t,
            "scheduling": "async" if engine.config.async_scheduling else "sync",
            "tokens_per_s": batch / t,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--prefill", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--attention", default=None, help="attention impl (default: the platform's kernel)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/throughput.json)")
    args = ap.parse_args(argv)
    meta = run_metadata(__spec__.name, argv)
    ceilings = measure_ceilings() if meta["platform"] == "gpu" else {}
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    model_dir = write_model_dir(tempfile.mkdtemp(prefix="jalora-bench-"), cfg)
    max_len = max(args.prefill + [args.context + args.decode_steps + max(args.decode_batches)]) + 32
    llm = LLM(
        model_dir, dtype="bfloat16", load_format="dummy", max_num_seqs=max(args.decode_batches),
        max_num_batched_tokens=max(args.prefill + [2048]), max_model_len=max_len, enable_prefix_caching=False,
        warmup=False, attention_impl=args.attention,
    )  # fmt: skip
    prefill = [bench_prefill(llm, n, reps=3) for n in args.prefill]
    decode = [bench_decode(llm, b, args.context, args.decode_steps) for b in args.decode_batches]
    if ceilings:
        for p in prefill:
            p["mfu_vs_measured_matmul"] = p["TFLOPs"] / ceilings["bf16_matmul_TFLOPs"]
        for d in decode:
            d["roofline_seconds"] = (d["weight_bytes"] + d["kv_bytes"]) / (ceilings["hbm_GBps"] * 1e9)
            d["step_over_roofline"] = d["step_seconds"] / d["roofline_seconds"]
    result = {**meta, "preset": args.preset, "attention": args.attention or "platform default",
              "ceilings": ceilings, "prefill": prefill, "decode": decode}  # fmt: skip
    path = save(result_path(args.out, "throughput.json", smoke=args.preset == "tiny"), result)
    print("\n".join(throughput_stdout(result)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
