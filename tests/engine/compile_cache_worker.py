"""One engine start of tests/engine/test_compile_cache.py, in a process of its own:
`python -m tests.engine.compile_cache_worker MODEL ADAPTER CACHE_DIR [TENSOR_PARALLEL_SIZE]` starts an
engine with the warm-up, loads an aLoRA adapter and warms its steps, serves a base and an adapted
request, and prints one JSON line: the XLA compilations the process asked for (`requests`), how many of
them JAX's persistent cache answered (`hits`), the runner's executables (`executables`: its steps and
the functions behind them) and how many of them were read from jalora's own directory of compiled
variants (`loaded`: neither traced nor lowered, jalora/engine/executables.py), and the outputs."""

import json
import sys

from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # every compilation (a cache hit included)
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
counts = {"requests": 0, "hits": 0}


def _duration(name: str, *_args, **_kwargs) -> None:
    if name == _BACKEND_COMPILE:
        counts["requests"] += 1


def _event(name: str, *_args, **_kwargs) -> None:
    if name == _CACHE_HIT:
        counts["hits"] += 1


monitoring.register_event_duration_secs_listener(_duration)
monitoring.register_event_listener(_event)

INV = [7, 8]


def main(model: str, adapter: str, cache: str, tp: str = "1") -> None:
    from jalora import LLM, SamplingParams

    llm = LLM(model, num_kv_blocks=32, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32, max_loras=1,
              max_lora_rank=4, compile_cache=cache, tensor_parallel_size=int(tp))  # fmt: skip
    llm.load_adapter("judge", adapter)
    llm.engine.warmup_adapters(progress=False)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = llm.generate([[3, 4, 5], [3, 4, 5, *INV]], sp, adapter=[None, "judge"])
    runner = llm.engine.runner
    print(json.dumps({**counts, "executables": runner.num_compiled(), "loaded": runner.num_loaded(),
                      "tokens": [o.token_ids for o in outs], "cache": str(llm.engine.compile_cache)}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:5])
