"""What a request's sampling options cost a decode step: one engine, the same batch decoding with each option.

    python -m bench.sampling_cost                 # a GPU: Granite-3.2-8B shapes (dummy weights), batch 64, 1k context
    python -m bench.sampling_cost --preset tiny   # CPU smoke run (written under /tmp unless --out)

Every request of the batch asks for the same option: `greedy` (the step's argmax: no draw runs), `sampled`
(temperature and top-p: the draw), `logit_bias`, `penalties` (presence, frequency, repetition), `allowed`
(allowed_token_ids), `penalties_sampled`. The last four draw with the adjusted layout, whose per-request rows of
token counts live on the device (jalora/engine/penalties.py): each option's median engine.step() is reported beside
greedy's and sampled's, from the same engine and the same prompts, in one run. The engine's warm-up compiles every
draw first, so no option pays a compilation inside its window.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from bench.harness import GRANITE_8B, TINY, drain, kv_blocks, result_path, run_metadata, save, write_model_dir
from jalora import LLM, SamplingParams

OPTIONS = {
    "greedy": {},
    "sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 1},
    "logit_bias": {"logit_bias": {5: 2.0, 9: -3.0}},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2},
    "allowed": {"allowed_token_ids": list(range(100, 400))},
    "penalties_sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 1, "presence_penalty": 0.5,
                          "repetition_penalty": 1.2},
}


def step_ms(engine, prompts, params: SamplingParams, steps: int) -> float:
    """Median engine.step() milliseconds over `steps` decode steps, once every request decodes (3 steps after the
    last one's first token); the requests are aborted afterwards."""
    ids = [f"opt-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    started = set()
    while len(started) < len(ids):
        started |= {d.request_id for d in engine.step() if d.token_ids}
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for rid in ids:
        engine.abort_request(rid)
    drain(engine)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--options", nargs="+", choices=tuple(OPTIONS), default=list(OPTIONS))
    ap.add_argument("--out", default=None, help="result file (default bench/results/sampling_cost_b<batch>.json)")
    args = ap.parse_args(argv)
    meta = run_metadata(__spec__.name, argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    root = tempfile.mkdtemp(prefix="jalora-sampling-")
    longest = args.context + 3 * args.steps + args.batch + 64  # (prefill chunks, warm steps, the window)
    llm = LLM(write_model_dir(os.path.join(root, "model"), cfg), dtype="bfloat16", load_format="dummy",
              max_num_seqs=max(args.batch, 1), max_model_len=longest, num_kv_blocks=kv_blocks(args.batch, longest),
              enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg["vocab_size"] - 20, args.context).tolist() for _ in range(args.batch)]
    by_option = {}
    for name in args.options:
        params = SamplingParams(max_tokens=longest - args.context - 1, ignore_eos=True, **OPTIONS[name])
        by_option[name] = {"step_ms_median": step_ms(engine, prompts, params, args.steps), "params": OPTIONS[name]}
    for row in by_option.values():
        for base in ("greedy", "sampled"):
            if base in by_option:
                row[f"vs_{base}"] = row["step_ms_median"] / by_option[base]["step_ms_median"]
    result = {**meta, "preset": args.preset, "batch": args.batch, "context": args.context, "steps": args.steps,
              "compiled_while_serving": engine.runner.compiles.serving, "by_option": by_option}  # fmt: skip
    path = result_path(args.out, f"sampling_cost_b{args.batch}.json", smoke=args.preset == "tiny")
    save(path, result)
    for name, row in by_option.items():
        ratios = "  ".join(f"{k} {v:.3f}x" for k, v in row.items() if k.startswith("vs_"))
        print(f"{name:18s} {row['step_ms_median']:8.2f} ms  {ratios}")
    print(f"compiled while serving: {engine.runner.compiles.serving}")
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
