"""Offline generation demo on the embedded default model: `python -m jalora.demo`."""

import argparse
import os
import time

from jalora import LLM, SamplingParams

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "default")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    llm = LLM(args.model, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512)
    prompts = [
        "The capital of France is",
        "user: What is the capital of France? assistant:",
        "Activated LoRA applies the adapter only after",
    ]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=0))
    dt = time.perf_counter() - t0
    for o in outs:
        print(f"{o.prompt!r} -> {o.text!r} ({len(o.token_ids)} tokens, {o.finish_reason})")
    print(f"{sum(len(o.token_ids) for o in outs)} tokens in {dt:.2f} s (random weights: the text is noise)")


if __name__ == "__main__":
    main()
