"""Decode attention at the engine's step shapes, per kv-split count: picks the split heuristic with numbers.

    python bench/attention_splits.py                 # H200
    python bench/attention_splits.py --smoke         # CPU, interpret mode, tiny shapes

The engine pads a step to a token bucket (T >= 16, a power of two) and the sequence axis to
max_num_seqs (64), so a batch-1 decode step launches the kernel over 16 query rows and 64 sequence
slots of which one is real. Per (batch B, context C) this times the kernel at those padded shapes
for num_kv_splits in {1, 2, 4, 8, 16} and for the default heuristic (None), bytes = K + V read.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench.attention as att  # noqa: E402
from bench.common import run_metadata, save  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402


def engine_shaped(key, batch, ctx, bs, max_seqs):
    t = max(16, 1 << (batch - 1).bit_length())
    p = -(-ctx // bs)
    nblk = batch * p
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (t, att.HQ, att.D), att.DTYPE)
    k_pages = jax.random.normal(kk, (nblk, bs, att.HKV, att.D), att.DTYPE)
    v_pages = jax.random.normal(kv, (nblk, bs, att.HKV, att.D), att.DTYPE)
    pages = jnp.zeros((max_seqs, p), jnp.int32).at[:batch].set(
        jax.random.permutation(kp, nblk).astype(jnp.int32).reshape(batch, p)
    )
    kv_lens = jnp.zeros((max_seqs,), jnp.int32).at[:batch].set(ctx)
    cu = jnp.minimum(jnp.arange(max_seqs + 1, dtype=jnp.int32), batch)
    return q, k_pages, v_pages, kv_lens, pages, cu, jnp.array([batch], jnp.int32)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 65536])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=2 << 20, help="skip B * C above this (memory)")
    ap.add_argument("--out", default="attention_splits.json")
    args = ap.parse_args(argv)
    if args.smoke:
        att.INTERPRET = True
        args.batches, args.contexts, args.splits = [1, 4], [64], [1, 2]
    rows = []
    for b in args.batches:
        for c in args.contexts:
            if b * c > args.max_tokens:
                continue
            inputs = engine_shaped(jax.random.key(b * 7 + c), b, c, 16, 64)
            nbytes = b * c * att.HKV * att.D * 2 * 2
            row = {"batch": b, "context": c, "us": {}}
            for splits in [None, *args.splits]:
                fn = lambda q, *rest, _s=splits: ragged_paged_attention(  # noqa: E731
                    q, *rest, sm_scale=att.SM_SCALE, impl="gpu", interpret=att.INTERPRET, num_kv_splits=_s
                )
                try:
                    t = att.bench_loop(fn, *inputs, iters=2 if args.smoke else 20, reps=3)
                    row["us"][str(splits)] = t * 1e6
                except Exception as e:  # one bad config must not lose the run
                    row["us"][str(splits)] = f"{type(e).__name__}: {e}"[:200]
            best = min((v, k) for k, v in row["us"].items() if isinstance(v, float) and k != "None")
            row["best"] = {"splits": int(best[1]), "us": best[0], "GBps": nbytes / best[0] / 1e3}
            d = row["us"]["None"]
            row["default_GBps"] = nbytes / d / 1e3 if isinstance(d, float) else None
            print(row, flush=True)
            rows.append(row)
            del inputs
    result = {**run_metadata(), "rows": rows}
    save(args.out, result)
    print("| B | ctx | default us | " + " | ".join(f"splits={s}" for s in args.splits) + " |")
    for r in rows:
        cells = [r["us"][str(s)] for s in [None, *args.splits]]
        print(f"| {r['batch']} | {r['context']} | " + " | ".join(
            f"{v:.1f}" if isinstance(v, float) else "err" for v in cells) + " |")  # fmt: skip
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
