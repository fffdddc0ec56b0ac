"""Where one engine step's time goes: host phases and device kernels, from a JAX profiler trace.

    python -m bench.profile_step                          # H200: Granite-3.2-8B shapes, batch 1, 1k context
    python -m bench.profile_step --batch 64 --adapters 8  # 64 decoding sequences over 8 aLoRAs (r=32, q/k/v)
    python -m bench.profile_step --preset tiny            # CPU smoke run (written under /tmp unless --out)

One run times the decode step with async scheduling (the next step is enqueued before the last one is
read back) and with the synchronous loop (`--modes`): the mode is fixed when an engine is built, so the
run builds one engine per mode, each with a KV cache sized for this workload so that both fit on the
device. Host phases (schedule, prepare, dispatch, wait for the device, bookkeeping) are timed around
the public methods of each engine's scheduler and runner over `--steps` decode steps. The device side
comes from `jax.profiler` over the same number of steps of the first mode's engine: kernel time summed
by name (per step), the busy time of the GPU streams and the gaps between kernels.
"""

import argparse
import ast
import dataclasses
import functools
import glob
import os
import tempfile
import time
from collections import defaultdict
from types import MappingProxyType

import jax
import numpy as np

from bench.harness import (
    GEMV_ROWS,
    GEMV_WIDTHS,
    GRANITE_8B,
    TINY,
    copy_bandwidth,
    drain,
    gemv_bandwidth,
    kv_blocks,
    load_qkv_aloras,
    result_path,
    run_metadata,
    save,
    start_decoding,
    write_model_dir,
)
from jalora import LLM, SamplingParams


class PhaseTimer:
    """Wall time of named calls, accumulated: wraps public methods of one engine's parts (instance
    attributes of those objects; `restore` removes the wrappers)."""

    def __init__(self):
        self.total = defaultdict(float)
        self._wrapped = []

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t0

        setattr(obj, name, timed)
        self._wrapped.append((obj, name))

    def restore(self):
        for obj, name in self._wrapped:
            delattr(obj, name)  # the class's method shows through again
        self._wrapped.clear()


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


PREFILL_TOKENS_PER_STEP = 2048  # the engines' max_num_batched_tokens


def max_tokens(args) -> int:
    """Output tokens of each request: the steps that prefill the whole batch (the first requests decode
    meanwhile), its first token, 3 warm-up steps, settle + timed steps, settle + traced steps (first
    mode), and room, so that no request ends inside a measured window (the batch, and with it the
    compiled step, would change)."""
    prefill_steps = -(-args.batch * args.context // PREFILL_TOKENS_PER_STEP)
    return prefill_steps + 1 + 3 + 2 * (1 + args.steps) + 16


def set_gpu_tuning(fields: dict) -> None:
    """Every device's GPU attention tuning with `fields` replaced, for the engines built after."""
    from pallas_kernels.ragged_paged_attention import tuning

    change = functools.partial(dataclasses.replace, **fields)
    tuning.GPU_ATTENTION_TUNING = MappingProxyType({k: change(v) for k, v in tuning.GPU_ATTENTION_TUNING.items()})
    tuning.DEFAULT_GPU_ATTENTION_TUNING = change(tuning.DEFAULT_GPU_ATTENTION_TUNING)


def tuning_fields(pairs: list[str]) -> dict:
    """`--tuning` FIELD=VALUE pairs as a dict (values as Python literals); unknown fields and values the tuning
    record refuses are refused here, before any slow work."""
    from pallas_kernels.ragged_paged_attention.tuning import GpuAttentionTuning

    known = {f.name for f in dataclasses.fields(GpuAttentionTuning)}
    fields = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or name not in known:
            raise SystemExit(f"--tuning: expected FIELD=VALUE with FIELD one of {sorted(known)}, got {pair!r}")
        fields[name] = ast.literal_eval(value)
    try:
        dataclasses.replace(GpuAttentionTuning(), **fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--tuning: {e}") from e
    return fields


def build_engine(args, cfg: dict, root: str, mode: str):
    """An engine with `mode` scheduling and the run's adapters loaded. Its KV cache holds the run's
    requests and no more, so that the engines of both modes fit on the device together (the default,
    a share of the device memory still free, would leave the second engine no room for its weights)."""
    max_len = args.context + max(args.steps + 256, max_tokens(args) + 16)
    llm = LLM(write_model_dir(os.path.join(root, "model"), cfg), dtype="bfloat16", load_format="dummy",
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=PREFILL_TOKENS_PER_STEP, max_model_len=max_len,
              num_kv_blocks=kv_blocks(args.batch, args.context + max_tokens(args) + 16),
              max_loras=max(args.adapters, 1), max_lora_rank=32, enable_prefix_caching=False, warmup=False,
              async_scheduling=mode == "async", layers_per_launch=args.layers_per_launch,
              norm_impl=args.norm_impl)  # fmt: skip
    invocations = load_qkv_aloras(llm, os.path.join(root, f"adapters-{mode}"), cfg, args.adapters)
    return llm.engine, invocations


def time_mode(engine, args, prompts, names, trace_dir: str | None) -> dict:
    """Decode steps of `engine` (every request decoding): the median engine.step() time and the host
    phases per step; with `trace_dir`, then a profiler trace of as many steps more, summarised."""
    ids = start_decoding(engine, prompts, names, SamplingParams(max_tokens=max_tokens(args), ignore_eos=True))

    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.runner, "prepare", "prepare")
    timer.wrap(engine.runner, "launch", "dispatch")
    timer.wrap(engine.runner, "fetch", "wait+copy back")
    try:
        engine.step()  # settle
        timer.total.clear()
        ts = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            ts.append(time.perf_counter() - t0)
    finally:
        timer.restore()
    host = {k: v / args.steps * 1e3 for k, v in timer.total.items()}
    host["other (engine bookkeeping)"] = float(np.mean(ts)) * 1e3 - sum(host.values())
    out = {"step_ms_median": float(np.median(ts)) * 1e3, "host_ms_per_step": host}
    if trace_dir is not None:
        engine.step()
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            engine.step()
        jax.profiler.stop_trace()
        out["device_trace"] = device_summary(trace_dir, args.steps, args.top)
    for rid in ids:
        engine.abort_request(rid)
    drain(engine)
    return out


def ceiling_lines(ceilings: dict) -> list[str]:
    """The printed ceilings: the rates (`*_GBps`), not the entries that say how they were measured."""
    return [f"ceiling {name} {value:.0f} GB/s" for name, value in ceilings.items() if name.endswith("_GBps")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=0, help="aLoRA adapters (r=32, q/k/v); 0 = base model")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers-per-launch", type=int, default=None, metavar="N",
                   help="EngineConfig.layers_per_launch: a compiled group of N layers launched per group "
                        "(0: one compiled step; default: the engine's, 8 on a GPU)")  # fmt: skip
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--no-long-grid", action="store_true",
                    help="decode at long contexts with the attention kernel's default kv-split grid (the tuning's "
                         "long_split_rule off), the baseline of the long-context grid")  # fmt: skip
    ap.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="GPU attention tuning fields to replace for this run (e.g. combine_kernel=True), "
                         "recorded in the result")  # fmt: skip
    ap.add_argument("--norm-impl", choices=("reference", "gpu"), default=None,
                    help="the engines' norm_impl (gpu: residual add + RMSNorm in one kernel)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo", default=None, metavar="DIR",
                    help="also dump the HLO of the compiled steps (XLA's jit_step_fn modules, or with layer groups "
                         "jit_pre_fn, jit_layer_fn and jit_post_fn, before and after optimisation) into DIR, through "
                         "XLA_FLAGS=--xla_dump_to; takes effect only where this process has not used JAX "
                         "yet")  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=("async", "sync"), default=["async", "sync"],
                    help="scheduling modes to time, in order (sync: each step read back before the next), one "
                         "engine each; the device trace is taken in the first")  # fmt: skip
    ap.add_argument("--out", default=None,
                    help="result file (default bench/results/profile_step_b<batch>_a<adapters>.json)")
    args = ap.parse_args(argv)
    if args.hlo:  # read by XLA when the backend starts, below
        modules = "step_fn|pre_fn|layer_fn|post_fn"  # (the fused step; a GPU's layer groups, the default there)
        dump = f" --xla_dump_to={args.hlo} --xla_dump_hlo_as_text --xla_dump_hlo_module_re={modules}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + dump).strip()
    meta = run_metadata(__spec__.name, argv)
    tuning = tuning_fields(args.tuning) | ({"long_split_rule": None} if args.no_long_grid else {})
    if tuning:
        set_gpu_tuning(tuning)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    root = tempfile.mkdtemp(prefix="jalora-profile-")
    # The device's read ceilings, measured before the engine takes its memory: a batch-1 matmul's (what the
    # step's weight GEMMs could reach) and an elementwise copy's (read + write bytes)
    on_gpu = jax.default_backend() == "gpu"
    ceilings = {"hbm_gemv_GBps": gemv_bandwidth(2 << 30), "gemv_widths": list(GEMV_WIDTHS), "gemv_rows": GEMV_ROWS,
                "hbm_copy_GBps": copy_bandwidth(2 << 30)} if on_gpu else {}  # fmt: skip
    engines = {mode: build_engine(args, cfg, root, mode) for mode in args.modes}
    v = cfg["vocab_size"]
    rng = np.random.default_rng(0)
    invocations = engines[args.modes[0]][1]
    tail = lambda i: invocations[i % args.adapters] if args.adapters else [7, 7]  # noqa: E731
    prompts = [rng.integers(1, v - 20, args.context - 2).tolist() + tail(i) for i in range(args.batch)]
    names = [f"a{i % args.adapters}" if args.adapters else None for i in range(args.batch)]
    by_mode = {}
    device = {}
    for k, mode in enumerate(args.modes):
        trace_dir = os.path.join(root, "trace") if k == 0 else None
        by_mode[mode] = time_mode(engines[mode][0], args, prompts, names, trace_dir)
        device = by_mode[mode].pop("device_trace", device)
    step_s, host = by_mode[args.modes[0]]["step_ms_median"] / 1e3, by_mode[args.modes[0]]["host_ms_per_step"]

    result = {**meta, "preset": args.preset, "batch": args.batch, "adapters": args.adapters,
              "layers_per_launch": engines[args.modes[0]][0].runner.layers_per_launch,
              "long_grid": engines[args.modes[0]][0].runner.long_decode, "gpu_tuning_changes": tuning,
              "norm_impl": engines[args.modes[0]][0].runner.plan.norm,
              "context": args.context, "steps": args.steps, "mode": args.modes[0],
              "step_ms_median": step_s * 1e3,
              "host_ms_per_step": host, "by_mode": by_mode, "device_trace": device, "ceilings": ceilings}  # fmt: skip
    path = result_path(args.out, f"profile_step_b{args.batch}_a{args.adapters}.json", smoke=args.preset == "tiny")
    save(path, result)
    for line in ceiling_lines(ceilings):
        print(line)
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
    if args.hlo:
        print("HLO dumps in", args.hlo)
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
