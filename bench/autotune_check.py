"""Does the engine compute the same thing at another XLA autotuning level? Same model, same prompts, one
engine per level (`EngineConfig.autotune_level`), each level's results against the first level's.

    python -m bench.autotune_check --out /root/out/autotune_check.json        # GPU: Granite-8B shapes, 4 vs 2
    python -m bench.autotune_check --preset tiny --out /tmp/autotune_check.json   # CPU smoke (no autotuning there)

Level 2 (`autotune_level=2`, a faster cold start) skips what XLA's default level 4 (the engine's) adds: outputs
reinitialised between candidate kernels and each candidate's result checked against a reference. A candidate
that computed a wrong result would then go unnoticed, on these shapes or on others: a run that agrees says
so for its own shapes only. Each engine scores the same prompts (`prompt_logprobs`: every prompt position
through the prefill path) and decodes greedily (`logprobs=0`: the sampled token's logprob per decode step).
Compared with the first level: the largest difference of the prompt logprobs, and of the decode logprobs up
to the first token where the two greedy continuations part (random dummy weights leave close logits, so a
different but correct kernel choice may flip a token; the logprobs before it tell rounding from error).
"""

import argparse
import gc
import os
import tempfile

import numpy as np

from bench.harness import GRANITE_8B, TINY, kv_blocks, result_path, run_metadata, save, write_model_dir
from jalora import LLM, SamplingParams


def run_level(model_dir: str, level: int, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict:
    """One engine at autotuning `level`: its compiler options and, per prompt, its prompt logprobs, greedy
    tokens and their logprobs."""
    longest = max(len(p) for p in prompts) + max_tokens
    llm = LLM(model_dir, dtype=dtype, load_format="dummy", autotune_level=level, compile_cache="none",
              max_num_seqs=len(prompts), max_model_len=longest + 16, enable_prefix_caching=False, warmup=False,
              num_kv_blocks=kv_blocks(len(prompts), longest + 16))  # fmt: skip
    options = dict(llm.engine.runner._executables()[0]._compiler_options or {})
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=True)
    outs = llm.generate(prompts, params)
    result = {
        "level": level,
        "compiler_options": options,
        "prompt_logprobs": [[x for x in o.prompt_logprobs if x is not None] for o in outs],
        "tokens": [list(o.token_ids) for o in outs],
        "logprobs": [[lp[t] for lp, t in zip(o.logprobs, o.token_ids, strict=True)] for o in outs],
    }
    del llm, outs
    gc.collect()
    return result


def compare(base: dict, other: dict) -> dict:
    """`other` against `base`: the largest prompt-logprob difference, how many greedy tokens agree before the
    continuations part (per prompt), and the largest decode-logprob difference up to there."""
    prompt_diff = max(float(np.abs(np.subtract(a, b)).max()) for a, b in
                      zip(base["prompt_logprobs"], other["prompt_logprobs"], strict=True))  # fmt: skip
    agree, decode_diff = [], 0.0
    for ta, tb, la, lb in zip(base["tokens"], other["tokens"], base["logprobs"], other["logprobs"], strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ta, tb, strict=True)) if a != b), len(ta))
        agree.append(n)
        # (position n itself: the same context, so its logprob is still comparable)
        upto = min(n + 1, len(ta))
        decode_diff = max(decode_diff, float(np.abs(np.subtract(la[:upto], lb[:upto])).max()))
    return {"level": other["level"], "against": base["level"], "prompt_logprob_max_diff": prompt_diff,
            "decode_logprob_max_diff": decode_diff, "tokens_agree": agree,
            "all_tokens_equal": all(n == len(t) for n, t in zip(agree, base["tokens"], strict=True))}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("granite-8b", "tiny"), default="granite-8b")
    ap.add_argument("--levels", type=int, nargs="+", default=[4, 2], help="autotuning levels; the first is the base")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="result file (default bench/results/autotune_check.json)")
    args = ap.parse_args(argv)
    if len(args.levels) < 2 or any(not 0 <= x <= 5 for x in args.levels):
        ap.error("--levels: at least two levels, each 0 to 5")
    for name in ("prompts", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    meta = run_metadata(__spec__.name, argv)
    cfg = GRANITE_8B if args.preset == "granite-8b" else TINY
    model_dir = write_model_dir(os.path.join(tempfile.mkdtemp(prefix="jalora-autotune-"), "model"), cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg["vocab_size"] - 1, args.prompt_len).tolist() for _ in range(args.prompts)]
    dtype = "bfloat16" if args.preset == "granite-8b" else "float32"
    runs = [run_level(model_dir, level, prompts, args.max_tokens, dtype) for level in args.levels]
    comparisons = [compare(runs[0], r) for r in runs[1:]]
    result = {**meta, "preset": args.preset, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "dtype": dtype,
              "levels": [{"level": r["level"], "compiler_options": r["compiler_options"]} for r in runs],
              "comparisons": comparisons}  # fmt: skip
    path = result_path(args.out, "autotune_check.json", smoke=args.preset == "tiny")
    save(path, result)
    for c in comparisons:
        print(f"level {c['level']} vs {c['against']}: prompt logprobs max diff {c['prompt_logprob_max_diff']:.3g}, "
              f"decode logprobs max diff {c['decode_logprob_max_diff']:.3g}, greedy tokens agree "
              f"{c['tokens_agree']} of {args.max_tokens}")  # fmt: skip
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
