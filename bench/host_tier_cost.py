"""What the host-memory KV tier costs a decode step, and which part of its copies costs it.

    python -m bench.host_tier_cost                  # H200: Granite-3.2-8B shapes, 16 sequences decoding
    python -m bench.host_tier_cost --preset tiny    # CPU smoke run (written under /tmp unless --out)

One engine (async scheduling, prefix caching, a host tier) decodes `--batch` sequences; before each
timed step the bench records `k` block moves with the tier's own calls, as the block manager does under
pressure: copies out (`keep`: the block's KV gathered on the device and sent to host RAM) or copies
back (`copy_back` of blocks already in the pool). The step then issues them as it does in a workload.
Variants of the copy out: `full` (the runner's own: gather, the result moved to pinned host memory by
the device where it has some, landed in the pool on the tier's thread), `no-land` (nothing waits for the
transfer or copies it into the pool), `gather-only` (no transfer), `device-array` (the tier's thread reads
the gathered device array itself: the transfer is its wait), `async-start` (`copy_to_host_async` called on
the engine's thread, the runner's first design); and `batched16`: the same blocks per step copied sixteen
steps' worth at a time (bursts: the block manager's copy-ahead spreads its copies over steps instead).
Every variant is timed over the same steps of the same engine, next to steps without moves. The copy back
has one variant, the tier's: its thread gathers the pool slots and puts them on the device, and the
engine's thread writes them into the cache at the next step (`land_loads`, timed apart).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from bench.harness import (
    GRANITE_8B,
    TINY,
    drain,
    kv_blocks,
    result_path,
    run_metadata,
    save,
    start_decoding,
    write_model_dir,
)
from jalora import LLM, SamplingParams


def timed_steps(engine, steps: int, before) -> dict:
    """Median/mean engine.step() time over `steps` steps, `before()` run ahead of each (untimed), and the
    time per step the engine's thread spent in the tier's issue() (copies started) and land_loads()
    (copies back written into the cache)."""
    tier = engine.host_tier
    spent = {"issue": 0.0, "land_loads": 0.0}

    def timed(name):
        call = getattr(tier, name)

        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return call(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return run

    for name in spent:
        setattr(tier, name, timed(name))
    ts = []
    try:
        for _ in range(steps):
            before()
            t0 = time.perf_counter()
            engine.step()
            ts.append(time.perf_counter() - t0)
    finally:
        for name in spent:
            delattr(tier, name)
    tier.drain()
    engine.block_manager.landed(tier.land_loads(engine.runner.scatter_kv_blocks, wait=True))
    return {"step_ms_median": float(np.median(ts)) * 1e3, "step_ms_mean": float(np.mean(ts)) * 1e3,
            "issue_ms_per_step": spent["issue"] / steps * 1e3,
            "land_ms_per_step": spent["land_loads"] / steps * 1e3}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--moves", type=int, nargs="+", default=[2, 16], help="blocks moved before each step")
    ap.add_argument("--host-kv-gb", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    meta = run_metadata(__spec__.name, argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    root = tempfile.mkdtemp(prefix="jalora-host-tier-cost-")
    variants = ["full", "no-land", "gather-only", "device-array", "async-start"]
    # every timed step is a decode step of the same batch: room for all of them, and a spare region of
    # the cache (never allocated: the running requests take blocks from the front) read and written by the moves
    n_steps = (1 + 2 * len(args.moves) * (len(variants) + 2)) * args.steps + 64
    tokens = args.context + n_steps
    spare = 2 * max(args.moves)
    llm = LLM(write_model_dir(os.path.join(root, "model"), cfg), dtype="bfloat16", load_format="dummy",
              max_num_seqs=max(args.batch, 8), max_num_batched_tokens=2048, max_model_len=tokens + 64,
              num_kv_blocks=kv_blocks(args.batch, tokens + 16) + spare, enable_prefix_caching=True,
              host_kv_cache_gb=args.host_kv_gb, warmup=False)  # fmt: skip
    engine = llm.engine
    tier, runner = engine.host_tier, engine.runner
    runner.warmup_kv_moves()  # the copies' sizes compiled, as the engine's warm-up does
    top = engine.num_total_blocks
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg["vocab_size"] - 8, args.context).tolist() for _ in range(args.batch)]
    ids = start_decoding(engine, prompts, [None] * args.batch, SamplingParams(max_tokens=n_steps, ignore_eos=True))
    held: list[bytes] = []

    def outs(k):
        def before():
            for i in range(k):
                h = os.urandom(16)
                tier.keep(top - 1 - i, h)
                held.append(h)
        return before

    def ins(k):
        def before():
            for i in range(k):
                h = held[-1 - (i % len(held))]
                hb = tier.find(h)
                tier.pin(hb)
                tier.copy_back(top - 1 - max(args.moves) - i, h, hb)
        return before

    gather, land = runner.gather_kv_blocks, tier._land
    def start_copy(array):
        array.copy_to_host_async()
        return array

    out = {"none": timed_steps(engine, args.steps, lambda: None)}
    print(f"no moves: step {out['none']['step_ms_median']:.2f} ms", flush=True)
    for k in args.moves:
        for v in variants:
            if v != "full":
                tier._land = lambda arriving, array: None  # nothing waits for the transfer or copies it
            if v == "gather-only":
                runner.gather_kv_blocks = lambda blocks: runner._gather(runner.kv_caches, blocks)
            if v == "device-array":  # the tier's thread reads the device array (the transfer is its wait)
                runner.gather_kv_blocks = lambda blocks: runner._gather(runner.kv_caches, blocks)
            if v == "async-start":  # the transfer started on the engine's thread
                runner.gather_kv_blocks = lambda blocks: start_copy(runner._gather(runner.kv_caches, blocks))
            r = out[f"out{k}-{v}"] = timed_steps(engine, args.steps, outs(k))
            tier._land, runner.gather_kv_blocks = land, gather
            print(f"{k} out per step, {v}: step {r['step_ms_median']:.2f} ms (mean {r['step_ms_mean']:.2f}), "
                  f"issue {r['issue_ms_per_step']:.2f} ms", flush=True)  # fmt: skip
        if k * 16 <= 64:  # the same blocks per step, copied in bursts of 16 steps' worth
            def batched(k=k, n=[0]):  # noqa: B006 (the step counter of this variant)
                n[0] += 1
                if n[0] % 16 == 1:
                    outs(16 * k)()

            r = out[f"out{k}-batched16"] = timed_steps(engine, args.steps, batched)
            print(f"{k} out per step, 16 steps' worth at once: step {r['step_ms_median']:.2f} ms "
                  f"(mean {r['step_ms_mean']:.2f}), issue {r['issue_ms_per_step']:.2f} ms", flush=True)  # fmt: skip
        tier.reset()
        held.clear()
        timed_steps(engine, 2, outs(max(args.moves)))  # blocks in the pool to copy back
        r = out[f"in{k}"] = timed_steps(engine, args.steps, ins(k))
        print(f"{k} back per step: step {r['step_ms_median']:.2f} ms (mean {r['step_ms_mean']:.2f}), "
              f"issue {r['issue_ms_per_step']:.2f} ms, land {r['land_ms_per_step']:.2f} ms", flush=True)  # fmt: skip
    for rid in ids:
        engine.abort_request(rid)
    drain(engine)
    result = {**meta, "preset": args.preset, "batch": args.batch, "context": args.context, "steps": args.steps,
              "block_bytes": tier.block_bytes, "results": out}  # fmt: skip
    path = result_path(args.out, "host_tier_cost.json", smoke=args.preset == "tiny")
    save(path, result)
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
