"""Base -> aLoRA judges pipeline: what the base-aligned prefix cache saves each judge.

    python -m bench.pipeline --model tiny                  # CPU: tiny random model, 3 aLoRA judges
    python -m bench.pipeline --model granite-8b            # GPU: Granite-3.2-8B shapes, dummy bf16 weights

The base model answers a prompt; then each judge evaluates prompt + answer + its invocation sequence.
Every judge runs twice, as aLoRA (base-aligned reuse) and as a plain LoRA over the same projections
(adapter-keyed blocks: full recompute), and the script prints, per judge call, the prompt tokens that
came from the cache, the prefill tokens computed, and time to first token / end to end.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from bench.harness import GRANITE_8B, TINY, result_path, run_metadata, save, write_adapter, write_model_dir
from bench.report import pipeline_stdout
from jalora import LLM, SamplingParams

JUDGES = ("certainty", "hallucination", "safety")


def timed(out) -> dict:
    m = out.metrics
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "cached_tokens": out.num_cached_tokens,
        "prefill_tokens": len(out.prompt_token_ids) - out.num_cached_tokens,
        "ttft_s": m.first_token_time - m.arrival_time,
        "e2e_s": m.finished_time - m.arrival_time,
        "completion_tokens": len(out.token_ids),
    }


def run_pipeline(llm, prompt: list[int], answer_len: int, eval_len: int, kind: str, invocations: dict) -> dict:
    (base,) = llm.generate([prompt], SamplingParams(max_tokens=answer_len, ignore_eos=True))
    context = prompt + base.token_ids
    judges = {}
    for name in JUDGES:
        adapter = f"{name}-{kind}"
        (out,) = llm.generate([context + invocations[name]], SamplingParams(max_tokens=eval_len, ignore_eos=True),
                              adapter=adapter)  # fmt: skip
        judges[name] = timed(out)
    return {"base": timed(base), "judges": judges}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "granite-8b"), default="tiny")
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=None)
    ap.add_argument("--answer-len", type=int, default=None)
    ap.add_argument("--eval-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="passes over the sweep; the last is reported")
    ap.add_argument("--out", default=None, help="result file (default bench/results/pipeline_<model>.json)")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    cfg = TINY if tiny else GRANITE_8B
    prompt_lens = args.prompt_lens or ([256, 1024] if tiny else [256, 1024, 4096, 16384])
    answer_len = args.answer_len or (32 if tiny else 256)
    root = tempfile.mkdtemp(prefix="jalora-pipeline-")
    model_dir = write_model_dir(os.path.join(root, "model"), cfg)
    max_len = max(prompt_lens) + answer_len + args.eval_len + 64
    llm = LLM(model_dir, dtype="float32" if tiny else "bfloat16", load_format="dummy", max_num_seqs=8,
              max_num_batched_tokens=2048 if tiny else 8192, max_model_len=max_len, max_loras=6, max_lora_rank=32,
              warmup=False)  # fmt: skip
    invocations = {name: [cfg["vocab_size"] - 3 - i, cfg["vocab_size"] - 2] for i, name in enumerate(JUDGES)}
    for i, name in enumerate(JUDGES):  # the paper's setup: aLoRA r=32 vs LoRA r=8 on q/k/v
        llm.load_adapter(f"{name}-alora", write_adapter(os.path.join(root, f"{name}-alora"), cfg, 32,
                         ["q_proj", "k_proj", "v_proj"], invocations[name], seed=i))  # fmt: skip
        llm.load_adapter(f"{name}-lora", write_adapter(os.path.join(root, f"{name}-lora"), cfg, 8,
                         ["q_proj", "k_proj", "v_proj"], None, seed=10 + i))  # fmt: skip
    rng = np.random.default_rng(0)
    low = 1
    runs = []
    meta = {**run_metadata(__spec__.name, argv), "model": args.model, "answer_len": answer_len,
            "eval_len": args.eval_len}  # fmt: skip
    path = result_path(args.out, f"pipeline_{args.model}.json")
    start = time.perf_counter()
    for rep in range(args.repeat):  # earlier passes compile every shape; the last one is reported
        runs = []
        for n in prompt_lens:
            for kind in ("alora", "lora"):
                prompt = rng.integers(low, cfg["vocab_size"] - 8, n).tolist()  # a fresh context each run
                t0 = time.perf_counter()
                res = run_pipeline(llm, prompt, answer_len, args.eval_len, kind, invocations)
                res.update(prompt_len=n, kind=kind, pipeline_s=time.perf_counter() - t0)
                runs.append(res)
                print(f"pass {rep} prompt {n} {kind}: {res['pipeline_s']:.2f} s "
                      f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            # Saved as it goes, so a run cut short still leaves its numbers (the pass is recorded).
            save(path, {**meta, "pass": rep, "passes": args.repeat, "runs": runs})
    result = {**meta, "pass": args.repeat - 1, "passes": args.repeat, "runs": runs}
    save(path, result)
    print("\n".join(pipeline_stdout(result)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
