"""Batch-1 greedy decode of the default model (SmolLM2-135M-Instruct) on a CPU: jalora beside
transformers, and beside the memory-bandwidth ceiling, in one run.

    python -m bench.cpu_decode                  # -> bench/results/cpu_decode.json
    python -m bench.cpu_decode --tokens 32 --max-model-len 2048,8192

Each engine answers the same chat prompt greedily; ms/token is (time of `max_tokens = 1 + N`) minus
(time of `max_tokens = 1`), over N, the median of --repeats, after one untimed pass (compilation).
jalora runs with its CPU step sizes (a 1-row step for batch-1 decode, model_runner.token_buckets) and,
for comparison, with the Pallas kernels' smallest step (16 rows) that the CPU had before, at each
--max-model-len (the pure-jnp attention reads every page a sequence may have, so its cost grows with
it). transformers runs the same converted checkpoint in float32 with torch's default threads. The
ceiling is the float32 weights' bytes over the machine's measured copy bandwidth: a decode step reads
every weight once.
"""

import argparse
import statistics
import time

import numpy as np

QUESTION = "Why is the sky blue? Answer in one sentence."


def _median_ms_per_token(run, tokens: int, repeats: int) -> tuple[float, list[int]]:
    """run(max_tokens) -> generated ids; returns (median ms per decoded token, the longer run's ids)."""
    run(1 + tokens)  # compiles (jalora) / warms the allocator (torch)
    per_token, ids = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        run(1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        ids = run(1 + tokens)
        per_token.append((time.perf_counter() - t - first) / tokens * 1e3)
    return statistics.median(per_token), ids


def jalora_ms(gguf: str, prompt: list[int], tokens: int, repeats: int, max_model_len: int, single: bool) -> tuple:
    from jalora import LLM, SamplingParams
    from jalora.engine.model_runner import token_buckets

    llm = LLM(gguf, max_model_len=max_model_len, num_kv_blocks=256, warmup=False, enable_prefix_caching=False)
    runner = llm.engine.runner
    runner.buckets = token_buckets(llm.engine.config.max_num_batched_tokens, single)

    def run(n):
        out = llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
        return list(out.token_ids)

    ms, ids = _median_ms_per_token(run, tokens, repeats)
    return ms, ids, runner.buckets


def transformers_ms(model_dir: str, prompt: list[int], tokens: int, repeats: int) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    ms, out = _median_ms_per_token(run, tokens, repeats)
    return ms, out, torch.get_num_threads()


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a numpy copy of `nbytes` (best of 5)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    from bench.harness import result_path, run_metadata, save
    from jalora.model.default_model import smollm2_gguf_path
    from jalora.model.gguf import converted_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens timed per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", default="2048,8192", help="comma-separated; 8192 is SmolLM2's own")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    gguf = str(smollm2_gguf_path())
    model_dir = str(converted_dir(gguf))
    from jalora import LLM

    probe = LLM(gguf, max_model_len=256, num_kv_blocks=16, warmup=False)
    prompt = probe.engine.apply_chat_template([{"role": "user", "content": QUESTION}])
    weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in probe.engine.runner.params)
    del probe

    rows = []
    hf_ms, hf_ids, threads = transformers_ms(model_dir, prompt, args.tokens, args.repeats)
    rows.append({"engine": "transformers", "ms_per_token": hf_ms, "torch_threads": threads})
    for mml in (int(x) for x in args.max_model_len.split(",")):
        for single in (True, False):
            ms, ids, buckets = jalora_ms(gguf, prompt, args.tokens, args.repeats, mml, single)
            rows.append({
                "engine": "jalora", "max_model_len": mml, "single_token_step": single, "smallest_step": buckets[0],
                "ms_per_token": ms, "tokens_equal_transformers": ids == hf_ids,
            })  # fmt: skip
    bw = copy_bandwidth_gbps()
    ceiling_ms = weight_bytes / (bw * 1e9) * 1e3
    for r in rows:
        r["x_ceiling"] = r["ms_per_token"] / ceiling_ms
    result = {
        **run_metadata(__spec__.name, argv),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "prompt_tokens": len(prompt),
        "decoded_tokens": args.tokens,
        "weight_bytes": weight_bytes,
        "copy_GBps": bw,
        "ceiling_ms_per_token": ceiling_ms,
        "rows": rows,
    }
    path = save(result_path(args.out, "cpu_decode.json"), result)
    print(stdout_table(result))
    print(f"saved {path}")
    return result


def stdout_table(r: dict) -> str:
    lines = [
        f"ceiling: {r['weight_bytes'] / 1e6:.0f} MB of weights / {r['copy_GBps']:.1f} GB/s = "
        f"{r['ceiling_ms_per_token']:.1f} ms per token",
        "",
        "| engine | max_model_len | smallest step | ms/token | x ceiling | tokens = transformers |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in r["rows"]:
        if row["engine"] == "transformers":
            lines.append(f"| transformers ({row['torch_threads']} threads) | - | 1 | {row['ms_per_token']:.1f} | "
                         f"{row['x_ceiling']:.2f} | - |")  # fmt: skip
        else:
            lines.append(f"| jalora | {row['max_model_len']} | {row['smallest_step']} | {row['ms_per_token']:.1f} | "
                         f"{row['x_ceiling']:.2f} | {row['tokens_equal_transformers']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
