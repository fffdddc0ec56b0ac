"""Held-out accuracy of the trained aLoRA judges (checkpoints/smollm2_judges) against the base model asked
the same question by prompting.

    python -m bench.judge_accuracy             # writes bench/results/judge_accuracy.json

The held-out examples come from checkpoints/train_judges.py (same seed; their sums and countries never
occur in training). For each example and judge:
- **aLoRA judge** (served by jalora): the conversation, then the judge's invocation; the verdict is Y
  if the judge gives "Y" a higher probability than "N" as its next token.
- **base prompting** (no adapter): the conversation, then a user turn asking the judge's question and
  the template's generation prompt; the verdict is whichever of the two answers has the higher
  probability. Two phrasings are measured ("Answer Y or N." and "Answer Yes or No.") and the better one
  is the baseline, so the comparison does not rest on one wording.
Both read exact probabilities (prompt logprobs of the two continuations), not sampled text.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.harness import result_path, run_metadata, save
from checkpoints.train_judges import DATASETS, JUDGES, OUT

PHRASINGS = {"Y/N": ("Answer Y or N.", "Y", "N"), "Yes/No": ("Answer Yes or No.", "Yes", "No")}


def _choice_logprobs(llm, prompts: list[list[int]], yes: int, no: int, adapter: str | None):
    """For each prompt: (logprob of `yes`, logprob of `no`) as its next token, and its cached tokens."""
    from jalora import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=True)
    both = [p + [yes] for p in prompts] + [p + [no] for p in prompts]
    outs = llm.generate(both, params, adapter=adapter)
    n = len(prompts)
    return [(outs[i].prompt_logprobs[-1], outs[n + i].prompt_logprobs[-1]) for i in range(n)], [
        o.num_cached_tokens for o in outs[:n]
    ]


def _single_token(llm, text: str) -> int:
    ids = llm.engine.tokenize(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens; the comparison needs one")
    return ids[0]


def measure(llm, name: str, examples: list[dict], judges_root: str) -> dict:
    question, invocation = JUDGES[name]
    labels = [e["response"] == "Y" for e in examples]
    y, n = _single_token(llm, "Y"), _single_token(llm, "N")
    inv = llm.engine.tokenize(invocation, add_special_tokens=False)
    judged = [llm.engine.apply_chat_template(e["messages"], add_generation_prompt=False) + inv for e in examples]
    t0 = time.perf_counter()
    lps, _ = _choice_logprobs(llm, judged, y, n, name)
    judge_seconds = time.perf_counter() - t0
    judge_right = [(a > b) == label for (a, b), label in zip(lps, labels)]
    base = {}
    for phrasing, (ask, yes_text, no_text) in PHRASINGS.items():
        prompts = [llm.engine.apply_chat_template([*e["messages"], {"role": "user", "content": f"{question} {ask}"}])
                   for e in examples]  # fmt: skip
        yes, no = _single_token(llm, yes_text), _single_token(llm, no_text)
        base_lps, _ = _choice_logprobs(llm, prompts, yes, no, None)
        right = [(a > b) == label for (a, b), label in zip(base_lps, labels)]
        base[phrasing] = {"accuracy": sum(right) / len(right), "says_yes": sum(a > b for a, b in base_lps) / len(right)}
    best = max(base.values(), key=lambda b: b["accuracy"])["accuracy"]
    log_path = os.path.join(judges_root, name, "training_log.json")
    training = None
    if os.path.isfile(log_path):
        with open(log_path) as f:
            log = json.load(f)
        training = {k: log["result"][k] for k in ("steps", "seconds", "train_loss", "eval_loss", "eval_accuracy")}
        training["train_examples"] = log["train_examples"]
    accuracy = sum(judge_right) / len(judge_right)
    return {
        "invocation": invocation,
        "heldout_examples": len(examples),
        "heldout_yes_share": sum(labels) / len(labels),
        "judge_accuracy": accuracy,
        "judge_seconds": judge_seconds,
        "base_prompting": base,
        "base_prompting_best_accuracy": best,
        "points_above_base": 100 * (accuracy - best),
        "training": training,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="base model (default: smollm2, the bundled default)")
    p.add_argument("--judges", default=str(OUT), help=f"folder of the trained judges (default: {OUT})")
    p.add_argument("--dtype", default="float32", help="engine dtype")
    p.add_argument("--out", default=None, help="result file (default: bench/results/judge_accuracy.json)")
    args = p.parse_args(argv)

    from checkpoints import bundled
    from jalora import LLM

    found = bundled.resolve(args.model) if args.model in bundled.names() else None
    model = found.model if found is not None else args.model
    trained = [n for n in JUDGES if os.path.isfile(os.path.join(args.judges, n, "adapter_config.json"))]
    llm = LLM(model, dtype=args.dtype, max_num_seqs=32, max_model_len=512, max_num_batched_tokens=1024,
              max_loras=max(len(trained), 1), max_lora_rank=16, warmup=False)  # fmt: skip
    for name in trained:
        llm.load_adapter(name, os.path.join(args.judges, name))
    result = {**run_metadata(__spec__.name, argv), "model": args.model, "dtype": args.dtype,
              "goal": "correctness judge >= 95% held-out accuracy and >= 20 points above base prompting",
              "judges": {}}  # fmt: skip
    for name, make in DATASETS.items():
        if name not in trained:
            result["judges"][name] = {"not_trained": f"no adapter in {args.judges}/{name}"}
            print(f"{name}: not trained (no adapter in {args.judges}/{name})")
            continue
        result["judges"][name] = measure(llm, name, make()["heldout"], args.judges)
        r = result["judges"][name]
        print(f"{name}: judge {r['judge_accuracy']:.1%}, base prompting {r['base_prompting_best_accuracy']:.1%} "
              f"({r['points_above_base']:+.1f} points) on {r['heldout_examples']} held-out examples", flush=True)
    path = save(result_path(args.out, "judge_accuracy.json"), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
