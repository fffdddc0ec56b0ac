"""Where one engine step's time goes: host phases and device kernels, from a JAX profiler trace.

    python bench/profile_step.py                          # H200: Granite-3.2-8B shapes, batch 1, 1k context
    python bench/profile_step.py --batch 64 --adapters 8  # 64 decoding sequences over 8 aLoRAs (r=32, q/k/v)
    python bench/profile_step.py --preset tiny            # CPU smoke run

Host phases (schedule, prepare, dispatch, wait for the device, bookkeeping) are timed around the engine's
own methods over `--steps` decode steps. The device side comes from `jax.profiler` over the same number of
steps: kernel time summed by name (per step), the busy time of the GPU streams and the gaps between kernels.
"""

import argparse
import glob
import os
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench.common import GRANITE_8B, TINY, run_metadata, save, write_model_dir  # noqa: E402
from bench.pipeline import load_qkv_aloras  # noqa: E402
from jalora import LLM, SamplingParams  # noqa: E402
from jalora.engine.model_runner import pack_inputs  # noqa: E402


class PhaseTimer:
    """Wall time of named calls, accumulated (wraps bound methods of the engine's parts)."""

    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t0

        setattr(obj, name, timed)


def device_summary(trace_dir: str, steps: int, top: int) -> dict:
    """Kernel time per step by name, per device line, from the newest xplane.pb under trace_dir."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    out = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            events = [(e.start_ns, e.duration_ns, e.name) for e in line.events]
            if not events:
                continue
            by_name = defaultdict(lambda: [0.0, 0])
            for _, dur, name in events:
                by_name[name][0] += dur
                by_name[name][1] += 1
            events.sort()
            busy, end, gaps = 0.0, None, []
            for start, dur, _ in events:
                if end is not None and start > end:
                    gaps.append(start - end)
                s = start if end is None else max(start, end)
                busy += max(0.0, start + dur - s)
                end = start + dur if end is None else max(end, start + dur)
            span = end - events[0][0]
            rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
            out[f"{plane.name} | {line.name}"] = {
                "events_per_step": len(events) / steps,
                "busy_us_per_step": busy / steps / 1e3,
                "span_us_per_step": span / steps / 1e3,
                "gap_us_per_step": sum(gaps) / steps / 1e3,
                "top": [{"name": n[:160], "us_per_step": v[0] / steps / 1e3, "count_per_step": v[1] / steps}
                        for n, v in rows[:top]],
            }  # fmt: skip
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=0, help="aLoRA adapters (r=32, q/k/v); 0 = base model")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo", default=None, help="also write the compiled decode step's HLO text here")
    ap.add_argument("--modes", nargs="+", choices=("async", "sync"), default=["async", "sync"],
                    help="scheduling modes to time, in order (sync: each step read back before the next); the "
                         "device trace is taken in the first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    root = tempfile.mkdtemp(prefix="jalora-profile-")
    model_dir = write_model_dir(os.path.join(root, "model"), cfg)
    llm = LLM(model_dir, dtype="bfloat16", load_format="dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=2048, max_model_len=args.context + args.steps + 256,
              max_loras=max(args.adapters, 1), max_lora_rank=32, enable_prefix_caching=False, warmup=False)  # fmt: skip
    engine = llm.engine
    v = cfg["vocab_size"]
    invocations = load_qkv_aloras(llm, root, cfg, args.adapters)
    rng = np.random.default_rng(0)
    tail = lambda i: invocations[i % args.adapters] if args.adapters else [7, 7]  # noqa: E731
    prompts = [rng.integers(1, v - 20, args.context - 2).tolist() + tail(i) for i in range(args.batch)]
    names = [f"a{i % args.adapters}" if args.adapters else None for i in range(args.batch)]
    params = SamplingParams(max_tokens=(len(args.modes) + 3) * args.steps + 16, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, names)):
        engine.add_request(f"r{i}", p, params, a)
    started = set()
    while len(started) < args.batch:
        started |= {o.request_id for o in engine.step() if o.token_ids}
    for _ in range(3):
        engine.step()

    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "prepare", "prepare")
    timer.wrap(engine.runner, "_run", "dispatch")
    timer.wrap(engine.runner, "fetch", "wait+copy back")
    by_mode = {}
    for mode in args.modes:
        engine.async_scheduling = mode == "async"
        engine.step()  # settle into the mode
        timer.total.clear()
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            ts.append(time.perf_counter() - t0)
        host = {k: v / args.steps * 1e3 for k, v in timer.total.items()}
        host["other (engine bookkeeping)"] = float(np.mean(ts)) * 1e3 - sum(host.values())
        by_mode[mode] = {"step_ms_median": float(np.median(ts)) * 1e3, "host_ms_per_step": host}
    engine.async_scheduling = args.modes[0] == "async"
    step_s, host = by_mode[args.modes[0]]["step_ms_median"] / 1e3, by_mode[args.modes[0]]["host_ms_per_step"]

    trace_dir = os.path.join(root, "trace")
    engine.step()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        engine.step()
    jax.profiler.stop_trace()
    device = device_summary(trace_dir, args.steps, args.top)

    if args.hlo:
        runner, queued = engine.runner, engine._inflight
        inp, flags = runner.prepare(engine.scheduler.schedule(), queued and queued.step_id)
        weights = runner.lora_weights if inp.lora_slots is not None else {}
        packed, layout = pack_inputs(inp)
        prev = runner._no_prev_tokens
        text = runner._step.lower(runner.params, runner.kv_caches, weights, packed, prev, layout=layout, **flags)
        with open(args.hlo, "w") as f:
            f.write(text.compile().as_text())
    for i in range(args.batch):
        engine.abort_request(f"r{i}")
    engine.step()

    result = {**run_metadata(), "preset": args.preset, "batch": args.batch, "adapters": args.adapters,
              "context": args.context, "steps": args.steps, "mode": args.modes[0],
              "step_ms_median": step_s * 1e3,
              "host_ms_per_step": host, "by_mode": by_mode, "device_trace": device}  # fmt: skip
    name = args.out or f"profile_step_b{args.batch}_a{args.adapters}.json"
    save(name, result)
    for mode, m in by_mode.items():
        print(f"{mode}: step {m['step_ms_median']:.2f} ms (median of {args.steps})")
    print(f"{args.modes[0]}:")
    for k, v in host.items():
        print(f"  host {k:28s} {v:8.3f} ms")
    for line, s in device.items():
        print(f"{line}: {s['events_per_step']:.0f} events, busy {s['busy_us_per_step']:.0f} us, "
              f"span {s['span_us_per_step']:.0f} us, gaps {s['gap_us_per_step']:.0f} us per step")  # fmt: skip
        for row in s["top"][:12]:
            print(f"    {row['us_per_step']:9.1f} us  x{row['count_per_step']:5.1f}  {row['name'][:100]}")
    return result


if __name__ == "__main__":
    main()
