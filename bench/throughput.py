"""Prefill and decode throughput of the engine, against the hardware ceilings measured in the same run.

    python bench/throughput.py                       # H200: Granite-3.2-8B shapes, dummy bf16 weights
    python bench/throughput.py --preset tiny         # CPU smoke run

Prefill: one request of N prompt tokens, max_tokens=1, one step (tokens/s and model-FLOP utilisation
against the measured bf16 matmul rate). Decode: B requests with a C-token context; the median
engine.step() time once every request is decoding, host work included, against the roofline
(weight bytes + KV bytes read) / measured copy bandwidth.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    GRANITE_8B,
    TINY,
    decode_step_seconds,
    measure_ceilings,
    run_metadata,
    save,
    write_model_dir,
)
from jalora import LLM, SamplingParams  # noqa: E402


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, size=n).tolist()


def bench_prefill(llm, n: int, reps: int) -> dict:
    cfg = llm.engine.cfg
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([prompt(n, cfg.vocab_size, 0)], p)  # compile
    ts = []
    for r in range(reps):
        ids = prompt(n, cfg.vocab_size, r + 1)
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
    engine = llm.engine
    cfg = engine.cfg
    prompts = [prompt(context, cfg.vocab_size, 100 + i) for i in range(batch)]
    t, replay_t = decode_step_seconds(engine, prompts, [None] * batch, steps)
    itemsize = np.dtype(engine.dtype).itemsize
    weight_bytes = cfg.num_params() * itemsize
    kv_bytes = batch * (context + 4 + steps / 2) * cfg.num_layers * 2 * cfg.kv_size * itemsize
    # device_step_seconds: a replay of the step (dispatch + device, waited on; bench.common)
    return {"batch": batch, "context": context, "step_seconds": t, "device_step_seconds": replay_t,
            "scheduling": "async" if engine.async_scheduling else "sync",
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
    ap.add_argument("--out", default="throughput.json")
    args = ap.parse_args(argv)
    meta = run_metadata()
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
    path = save(args.out, result)
    print("| prefill tokens | tokens/s | TFLOP/s | MFU |\n|---|---|---|---|")
    for p in prefill:
        mfu = p.get("mfu_vs_measured_matmul", 0)
        print(f"| {p['prompt_tokens']} | {p['tokens_per_s']:.0f} | {p['TFLOPs']:.1f} | {mfu:.2f} |")
    print("| decode batch | ctx | step ms | replay ms | tokens/s | roofline ms | x roofline |")
    print("|---|---|---|---|---|---|---|")
    for d in decode:
        print(f"| {d['batch']} | {d['context']} | {d['step_seconds'] * 1e3:.2f} | {d['device_step_seconds'] * 1e3:.2f} "
              f"| {d['tokens_per_s']:.0f} | {d.get('roofline_seconds', 0) * 1e3:.2f} | "
              f"{d.get('step_over_roofline', 0):.2f} |")  # fmt: skip
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
