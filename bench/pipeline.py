"""Base -> aLoRA judges pipeline: what the base-aligned prefix cache saves each judge.

    python bench/pipeline.py --model tiny                  # CPU: tiny random model, 3 aLoRA judges
    python bench/pipeline.py --model granite-8b            # GPU: Granite-3.2-8B shapes, dummy bf16 weights

The base model answers a prompt; then each judge evaluates prompt + answer + its invocation sequence.
Every judge runs twice, as aLoRA (base-aligned reuse) and as a plain LoRA over the same projections
(adapter-keyed blocks: full recompute), and the script prints, per judge call, the prompt tokens that
came from the cache, the prefill tokens computed, and time to first token / end to end.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import GRANITE_8B, TINY, run_metadata, save, write_model_dir  # noqa: E402
from jalora import LLM, SamplingParams  # noqa: E402

JUDGES = ("certainty", "hallucination", "safety")


def write_adapter(path: str, cfg: dict, r: int, targets: list[str], invocation: list[int] | None, seed: int):
    """A PEFT-format adapter with random weights (what a trained intrinsic looks like to the engine)."""
    rng = np.random.default_rng(seed)
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // heads
    out = {"q_proj": heads * hd, "k_proj": kv * hd, "v_proj": kv * hd}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, d)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out[m], r)) * 0.02).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
            "bias": "none", "alora_invocation_tokens": invocation}  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(acfg, f)
    return path


def load_qkv_aloras(llm, root: str, cfg: dict, n: int, rank: int = 32) -> list[list[int]]:
    """Loads aLoRA adapters a0..a{n-1} (random weights, rank `rank` on q/k/v) into `llm`; adapter i is
    invoked by [V-2-i, V-1], two tokens no random prompt of the benchmarks holds. Returns the invocations."""
    v = cfg["vocab_size"]
    invocations = [[v - 2 - i, v - 1] for i in range(n)]
    for i, inv in enumerate(invocations):
        path = write_adapter(os.path.join(root, f"a{i}"), cfg, rank, ["q_proj", "k_proj", "v_proj"], inv, i)
        llm.load_adapter(f"a{i}", path)
    return invocations


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
    ap.add_argument("--out", default=None)
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
    meta = {**run_metadata(), "model": args.model, "answer_len": answer_len, "eval_len": args.eval_len}
    name = args.out or f"pipeline_{args.model}.json"
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
            save(name, {**meta, "pass": rep, "passes": args.repeat, "runs": runs})
    result = {**meta, "pass": args.repeat - 1, "passes": args.repeat, "runs": runs}
    path = save(name, result)
    print("| prompt | judge | kind | prompt tokens | cached | prefill computed | saved | TTFT ms | e2e ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        for name, j in r["judges"].items():
            saved = j["cached_tokens"] / j["prompt_tokens"]
            print(f"| {r['prompt_len']} | {name} | {r['kind']} | {j['prompt_tokens']} | {j['cached_tokens']} | "
                  f"{j['prefill_tokens']} | {saved:.0%} | {j['ttft_s'] * 1e3:.1f} | {j['e2e_s'] * 1e3:.1f} |")
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
