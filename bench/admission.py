"""The host's work to admit a pipeline's adapter request after a long context, without the device.

    python -m bench.admission                          # 1k, 16k, 64k, 128k -> bench/results/admission.json
    python -m bench.admission --lengths 65536 --repeats 5 --out /tmp/admission.json

A pipeline's aLoRA judge arrives with its base request's prompt and answer plus the invocation. Before
its first step the engine's thread looks it up in the prefix cache (BlockManager.lookup): every full
block's chained SHA-256 hash (jalora/engine/block_hasher.py), then the cached blocks of the longest
prefix. This is part of the judge's queue time, hence of its time to first token, and it grows with the
context. The same run measures it two ways on the same requests and cache:

- `donors`: the engine as it is (block_hasher.HashDonors): the judge takes the hashes of the blocks it
  shares with its base request (before its activation index) from that request and hashes only the rest;
- `hash all`: no donors (the pool emptied), every block hashed again (the engine before HashDonors).

Per length and repeat, each way on a fresh block manager: the base request (`length` tokens, the first 64
a system prompt) is looked up and given blocks; `--others` requests of the same length and system prompt
are admitted while it decodes (the donor pool's other entries, each sharing the first 4 blocks); the base
is marked computed with an answer of `--answer` tokens and released, as the engine does when it finishes;
then the judge (prompt + answer + a 2-token invocation) is looked up. The ways alternate which goes first.
The judge's cache hits are checked to be the base's blocks both ways (the same blocks found). Reported:
the median milliseconds of the judge's lookup, and of a base request's first lookup (nothing to take).
"""

import argparse
import platform
import statistics
import time

import numpy as np

from bench.harness import result_path, run_metadata, save
from bench.host_stream import cpu_name
from bench.report import admission_stdout
from jalora.adapters.peft import ResolvedAdapter
from jalora.engine.block_hasher import HashDonors
from jalora.engine.block_manager import BlockManager
from jalora.engine.request import Request
from jalora.sampling_params import SamplingParams

BLOCK = 16
IDENTITY = b"\x01" * 32  # an adapter's content digest (any 32 bytes)
SYSTEM_TOKENS = 64  # a system prompt every request starts with (4 blocks)


def admit_judge(length: int, answer: int, repeats: int, others: int = 15, seed: int = 0) -> dict:
    """Median lookup milliseconds of the judge after a `length`-token base request, with and without
    donors, and of the base request's own first lookup."""
    rng = np.random.default_rng(seed)
    system = rng.integers(1, 40000, SYSTEM_TOKENS).tolist()
    prompt = system + rng.integers(1, 40000, length - SYSTEM_TOKENS).tolist()
    output = rng.integers(1, 40000, answer).tolist()
    other_prompts = [system + rng.integers(1, 40000, length - SYSTEM_TOKENS).tolist() for _ in range(others)]
    invocation = [49150, 49151]
    judge_ids = prompt + output + invocation
    params = SamplingParams(max_tokens=16)
    adapter = ResolvedAdapter(0, IDENTITY, len(prompt) + len(output))
    num_blocks = 2 * (len(judge_ids) // BLOCK + 2)
    times = {"donors": [], "hash all": [], "base": []}
    hits = {}
    for r in range(repeats):
        for way in ("donors", "hash all") if r % 2 == 0 else ("hash all", "donors"):  # (interleaved)
            bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=True)
            if way == "hash all":
                bm.donors = HashDonors(BLOCK, capacity=0)
            base = Request(f"base{r}", prompt, params, seed=0)
            t0 = time.perf_counter()
            bm.lookup(base)
            times["base"].append(time.perf_counter() - t0)
            assert bm.allocate(base, length + answer)
            for i, ids in enumerate(other_prompts):  # admitted while the base decodes
                bm.lookup(Request(f"other{r}-{i}", ids, params, seed=0))
            base.all_token_ids.extend(output)
            base.output_token_ids.extend(output)
            base.num_computed_tokens = length + answer
            bm.register(base)
            bm.release(base)
            judge = Request(f"judge{r}", judge_ids, params, seed=0, adapter_name="judge", adapter=adapter)
            t0 = time.perf_counter()
            reused = bm.lookup(judge)
            times[way].append(time.perf_counter() - t0)
            hits.setdefault(way, reused)
            assert reused == hits[way], "the judge's hits changed between repeats"
    assert hits["donors"] == hits["hash all"] == (length + answer) // BLOCK * BLOCK, hits
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "length": length,
        "judge_tokens": len(judge_ids),
        "judge_blocks": len(judge_ids) // BLOCK,
        "reused_tokens": hits["donors"],
        "others": others,
        "judge_lookup_ms": {"donors": ms["donors"], "hash all": ms["hash all"]},
        "base_lookup_ms": ms["base"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384, 65536, 131072])
    ap.add_argument("--answer", type=int, default=256, help="the base request's answer tokens")
    ap.add_argument("--repeats", type=int, default=9, help="lookups of each way per length (median)")
    ap.add_argument("--others", type=int, default=15, help="other requests of the same length admitted while "
                    "the base decodes (sharing its system prompt): the donor pool's other entries")  # fmt: skip
    ap.add_argument("--out", default=None, help="result file (default bench/results/admission.json)")
    args = ap.parse_args(argv)
    for name in ("lengths", "answer", "repeats", "others"):
        values = getattr(args, name)
        if any(v < (SYSTEM_TOKENS + 1 if name == "lengths" else 0 if name == "others" else 1) for v in
               (values if isinstance(values, list) else [values])):  # fmt: skip
            ap.error(f"--{name} out of range (lengths > {SYSTEM_TOKENS}, others >= 0, the rest >= 1)")
    result = {**run_metadata(__spec__.name, argv), "host_cpu": cpu_name(), "python": platform.python_version(),
              "block_size": BLOCK, "answer": args.answer, "repeats": args.repeats, "system_tokens": SYSTEM_TOKENS,
              "rows": []}  # fmt: skip
    for n in args.lengths:
        row = admit_judge(n, args.answer, args.repeats, args.others)
        result["rows"].append(row)
        print(admission_stdout({**result, "rows": [row]})[-1], flush=True)
    print("wrote", save(result_path(args.out, "admission.json"), result))
    return result


if __name__ == "__main__":
    main()
