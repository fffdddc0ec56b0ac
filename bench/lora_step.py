"""Masked multi-LoRA cost in the engine's whole step (attention, sampling and host work included).

    python -m bench.lora_step                    # H200: Granite-3.2-8B shapes, dummy bf16 weights
    python -m bench.lora_step --preset tiny      # CPU smoke run (written under /tmp unless --out)

(a) decode: 64 sequences over 8 aLoRA adapters (r=32 on q/k/v), every decode token adapted, against
    the same 64 sequences on the base model, median engine.step() time in one run, with async
    scheduling and with the synchronous loop (one engine per mode: the mode is fixed when an engine
    is built), plus a replay of each step (dispatch + device time, bench.harness).
(b) prefill: one 8k-token prompt whose invocation is its last 16 tokens (the adapter runs on 16 of
    8192 tokens) against the same prompt on the base model.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from bench.harness import (
    GRANITE_8B,
    TINY,
    decode_step_seconds,
    kv_blocks,
    load_qkv_aloras,
    result_path,
    run_metadata,
    save,
    write_model_dir,
)
from bench.report import lora_step_stdout
from jalora import LLM, SamplingParams


def prefill_time(llm, prompt, adapter, reps: int) -> float:
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([prompt], p, adapter=adapter)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        llm.generate([prompt], p, adapter=adapter)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=None, help="result file (default bench/results/lora_step.json)")
    args = ap.parse_args(argv)
    meta = run_metadata(__spec__.name, argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    root = tempfile.mkdtemp(prefix="jalora-lora-step-")
    model_dir = write_model_dir(os.path.join(root, "model"), cfg)
    # Each engine's KV cache holds the larger of the decode batch (prompt + the tokens
    # decode_step_seconds generates) and the prefill, and no more: the async and the sync engine then
    # fit on the device together (the default, a share of the free memory, leaves the second none).
    decode_tokens = args.context + args.steps + 16 + args.batch + 16
    num_blocks = max(kv_blocks(args.batch, decode_tokens), kv_blocks(1, args.prefill + 16))
    llms = {
        mode: LLM(model_dir, dtype="bfloat16", load_format="dummy", max_num_seqs=args.batch,
                  max_num_batched_tokens=max(args.prefill, 2048),
                  max_model_len=max(args.prefill, args.context + 512) + 64, num_kv_blocks=num_blocks,
                  max_loras=args.adapters, max_lora_rank=32, enable_prefix_caching=False, warmup=False,
                  async_scheduling=mode == "async")  # fmt: skip
        for mode in ("async", "sync")
    }
    v = cfg["vocab_size"]
    invocations = load_qkv_aloras(llms["async"], os.path.join(root, "async"), cfg, args.adapters)
    load_qkv_aloras(llms["sync"], os.path.join(root, "sync"), cfg, args.adapters)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, v - 20, args.context - 2).tolist() + invocations[i % args.adapters]
               for i in range(args.batch)]  # fmt: skip
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    base = [None] * args.batch
    engine = llms["async"].engine
    # *_device_*: replays of the step (dispatch + device, waited on each time; bench.harness)
    base_decode, base_replay = decode_step_seconds(engine, prompts, base, args.steps)
    lora_decode, lora_replay = decode_step_seconds(engine, prompts, names, args.steps)
    base_decode2, _ = decode_step_seconds(engine, prompts, base, args.steps)  # drift check
    sync = llms["sync"].engine  # the same, each step read back before the next is enqueued
    base_sync, _ = decode_step_seconds(sync, prompts, base, args.steps)
    lora_sync, _ = decode_step_seconds(sync, prompts, names, args.steps)
    onehot_max = engine.kernel_plan.lora_tuning.onehot_max_tokens  # what the engine takes on this platform
    lora_impl = ("one-hot matmuls for every step" if onehot_max is None
                 else f"one-hot at <= {onehot_max} token rows, else the Pallas kernel")  # fmt: skip
    long = rng.integers(1, v - 20, args.prefill - 16).tolist() + [5] * 14 + invocations[0]
    base_prefill = prefill_time(llms["async"], long, None, reps=3)
    lora_prefill = prefill_time(llms["async"], long, "a0", reps=3)
    result = {
        **meta,
        "preset": args.preset,
        "decode": {"batch": args.batch, "adapters": args.adapters, "rank": 32, "targets": "q,k,v",
                   "context": args.context, "base_step_s": base_decode, "base_step_again_s": base_decode2,
                   "alora_step_s": lora_decode, "overhead": lora_decode / base_decode - 1,
                   "base_device_step_s": base_replay, "alora_device_step_s": lora_replay,
                   "device_overhead": lora_replay / base_replay - 1, "scheduling": "async",
                   "sync": {"base_step_s": base_sync, "alora_step_s": lora_sync, "overhead": lora_sync / base_sync - 1},
                   "lora_impl": lora_impl},
        "prefill": {"tokens": args.prefill, "adapted_tokens": 16, "base_s": base_prefill, "alora_s": lora_prefill,
                    "overhead": lora_prefill / base_prefill - 1},
    }  # fmt: skip
    path = save(result_path(args.out, "lora_step.json", smoke=args.preset == "tiny"), result)
    print("\n".join(lora_step_stdout(result)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
