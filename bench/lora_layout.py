"""Where the decode step's LoRA time goes: weight layouts for the fused q/k/v projection, 40 layers deep.

    python bench/lora_layout.py            # H200, Granite-3.2-8B q/k/v shapes
    python bench/lora_layout.py --smoke    # CPU, toy shapes

Each variant runs the q/k/v projection of every layer of a 40-layer model at a decode-sized step
(T rows, every row adapted, slots spread over n adapters of rank R on q, k and v): one jitted
function per variant, distinct weights per layer (so each layer's weights come from HBM, as in the
engine), timed over repetitions. The base-only projection is the reference the LoRA cost is a share of.

Variants:
  base            y = x @ W                                     (base-only step today)
  onehot_stacked  + shrink x @ A_flat[l], mask, expand @ B[l]   (today: adapter stacks [L, ...], static index)
  onehot_lists    the same with per-layer arrays                (is the stacked slice free?)
  fused           y_all = x @ [W | A_flat] once, mask the last n*R columns, expand
  base_prefix     base-only through the first N columns of [W | A_flat]  (what base steps pay if W is
                  stored only inside the concatenation)
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import run_metadata, save  # noqa: E402


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="lora_layout.json")
    args = ap.parse_args(argv)
    layers, din, widths = 40, 4096, (4096, 1024, 1024)
    if args.smoke:
        layers, din, widths, args.tokens, args.reps = 2, 64, (64, 16, 16), [16], 2
    n, r1 = args.adapters, args.rank
    r = r1 * len(widths)  # q, k and v each rank r1: block-diagonal B over the fused output
    dout = sum(widths)
    dt = jnp.bfloat16
    keys = iter(jax.random.split(jax.random.key(0), 8))
    w = jax.random.normal(next(keys), (layers, din, dout), dt) * 0.02
    a_flat = jax.random.normal(next(keys), (layers, din, n * r), dt) * 0.02
    b = jnp.zeros((layers, n, r, dout), dt)
    off = 0
    for j, wd in enumerate(widths):  # block-diagonal: slot rank block j feeds output columns of target j
        b = b.at[:, :, j * r1 : (j + 1) * r1, off : off + wd].set(
            jax.random.normal(jax.random.key(j), (layers, n, r1, wd), dt) * 0.02
        )
        off += wd
    w_cat = jnp.concatenate([w, a_flat], axis=2)
    w_list, a_list, b_list = ([s[i] for i in range(layers)] for s in (w, a_flat, b))
    col_slot = jnp.arange(n * r, dtype=jnp.int32) // r

    def chain(proj):
        def f(x, slots, *weights):
            acc = jnp.zeros((x.shape[0], dout), jnp.float32)
            for i in range(layers):
                y = proj(x, slots, i, *weights)
                acc = acc + y.astype(jnp.float32)
                x = x + y[:, :din] * jnp.asarray(1e-3, dt)  # the next layer depends on this one
            return acc

        return jax.jit(f)

    def mask(xa, slots):
        return jnp.where(slots[:, None] == col_slot[None, :], xa, 0.0).astype(dt)

    def expand(y_f32, xa, bi):
        return (y_f32 + jnp.dot(xa, bi.reshape(n * r, dout), preferred_element_type=jnp.float32)).astype(dt)

    def base(x, slots, i, w):
        return jnp.dot(x, w[i], preferred_element_type=jnp.float32).astype(dt)

    def onehot(x, slots, i, w, a, bb):
        y = jnp.dot(x, w[i], preferred_element_type=jnp.float32).astype(dt)
        xa = mask(jnp.dot(x, a[i], preferred_element_type=jnp.float32), slots)
        return expand(y.astype(jnp.float32), xa, bb[i])

    def fused(x, slots, i, wc, bb):
        y_all = jnp.dot(x, wc[i], preferred_element_type=jnp.float32)
        return expand(y_all[:, :dout], mask(y_all[:, dout:], slots), bb[i])

    def base_prefix(x, slots, i, wc):
        return jnp.dot(x, wc[i][:, :dout], preferred_element_type=jnp.float32).astype(dt)

    variants = {
        "base": (chain(base), (w,)),
        "onehot_stacked": (chain(onehot), (w, a_flat, b)),
        "onehot_lists": (chain(onehot), (w_list, a_list, b_list)),
        "fused": (chain(fused), (w_cat, b)),
        "base_prefix": (chain(base_prefix), (w_cat,)),
    }
    rows = []
    for t in args.tokens:
        x = jax.random.normal(jax.random.key(t), (t, din), dt)
        slots = jnp.arange(t, dtype=jnp.int32) % n
        row = {"tokens": t, "us_per_layer": {}}
        ref = None
        for name, (fn, weights) in variants.items():
            sec = timed(fn, x, slots, *weights, reps=args.reps)
            row["us_per_layer"][name] = sec / layers * 1e6
            out = fn(x, slots, *weights)
            if name.startswith(("onehot", "fused")):
                ref = out if ref is None else ref
                row.setdefault("max_abs_diff_vs_onehot_stacked", {})[name] = float(jnp.abs(out - ref).max())
        base_us = row["us_per_layer"]["base"]
        row["lora_overhead_us_per_layer"] = {k: v - base_us for k, v in row["us_per_layer"].items() if k != "base"}
        print(row, flush=True)
        rows.append(row)
    result = {**run_metadata(), "layers": layers, "din": din, "widths": widths, "adapters": n, "rank": r1,
              "rows": rows}  # fmt: skip
    if not args.smoke:
        save(args.out, result)
    return result


if __name__ == "__main__":
    main()
