"""Compilations a request can trigger after warm-up, and batch-1 decode time per kind of request.

    python -m bench.step_variants                      # the bundled tiny model (checkpoints/default), CPU
    python -m bench.step_variants --model DIR_OR_GGUF  # any model the engine loads

A step variant the warm-up did not compile is compiled by the first request that needs it, on the
engine thread, while every other stream waits. The run builds one engine with warm-up, counts XLA
compilations (jax.monitoring's backend-compile events) during the warm-up and during the first request
of each kind (greedy, sampled, top-n logprobs, prompt logprobs, all at once), then times batch-1 decode
of each kind: ms/token is (time of `max_tokens = 1 + N`) minus (time of `max_tokens = 1`), over N, the
median of --repeats. `step_executables` is the number of compiled variants of the step itself once
every kind has run.
"""

import argparse
import os
import statistics
import time

from jax import monitoring

from bench.harness import REPO_ROOT, result_path, run_metadata, save
from jalora import LLM, SamplingParams

KINDS = {
    "greedy": {},
    "sampled": {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1},
    "logprobs": {"logprobs": 5},
    "prompt_logprobs": {"prompt_logprobs": True},
    "all": {"temperature": 0.8, "top_p": 0.9, "seed": 1, "logprobs": 5, "prompt_logprobs": True},
}

_compiles = [0]


def _count(name: str, *_args, **_kwargs) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _compiles[0] += 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO_ROOT, "checkpoints", "default"))
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    monitoring.register_event_duration_secs_listener(_count)
    t0 = time.perf_counter()
    llm = LLM(args.model, max_model_len=512, num_kv_blocks=64, enable_prefix_caching=False, warmup=True)
    warmup_s = time.perf_counter() - t0
    warmup_compiles = _compiles[0]
    runner = llm.engine.runner
    vocab = llm.engine.model_config.vocab_size
    prompt = [(7 * i + 3) % (vocab - 1) for i in range(args.prompt_len)]

    first_use = {}
    for kind, fields in KINDS.items():
        before = _compiles[0]
        llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True, **fields))
        first_use[kind] = _compiles[0] - before

    def run(fields, n):
        llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, **fields))

    ms = {}
    for kind, fields in KINDS.items():
        per_token = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run(fields, 1)
            first = time.perf_counter() - t
            t = time.perf_counter()
            run(fields, 1 + args.tokens)
            per_token.append((time.perf_counter() - t - first) / args.tokens * 1e3)
        ms[kind] = statistics.median(per_token)

    result = {
        **run_metadata(__spec__.name, argv),
        "model": args.model,
        "buckets": list(runner.buckets),
        "warmup_s": warmup_s,
        "warmup_compiles": warmup_compiles,
        "first_use_compiles": first_use,
        "step_executables": len(runner._step),
        "decode_ms_per_token_batch1": ms,
    }
    path = save(result_path(args.out, "step_variants.json", smoke=args.out is None), result)
    print(f"buckets {result['buckets']}; warm-up {warmup_s:.1f} s, {warmup_compiles} compilations")
    print("first use compilations: " + ", ".join(f"{k} {v}" for k, v in first_use.items()))
    print(f"compiled variants of the step: {result['step_executables']}")
    print("batch-1 decode ms/token: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
