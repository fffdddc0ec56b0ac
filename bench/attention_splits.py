"""Decode attention at the engine's step shapes, per kv-split count: picks the split heuristic with numbers.

    python -m bench.attention_splits                 # H200 -> bench/results/attention_splits.json
    python -m bench.attention_splits --grid          # H200 -> bench/results/attention_split_grid.json
    python -m bench.attention_splits --combine       # H200 -> bench/results/attention_combine.json
    python -m bench.attention_splits --tiles         # H200 -> bench/results/attention_tiles.json
    python -m bench.attention_splits --smoke [--grid | --combine | --tiles] [--out /tmp/x.json]   # CPU

The engine pads a step to a token bucket (T >= 16, a power of two) and the sequence axis to
max_num_seqs (64), so a batch-1 decode step launches the kernel over 16 query rows and 64 sequence
slots of which one is real. Per (batch B, context C) this times the kernel at those padded shapes
for num_kv_splits in {1, 2, 4, 8, 16} and for the kernel's default (None), bytes = K + V read.

--grid: should batch-1 long-context decode use a bigger kv-split grid? Per (batch, context) the
device's tuning (grid of 16 splits, split_rule on the device), static 32 and 64 splits, and a grid of
64 whose rule gives 64 splits to <= 16 programs (optionally with at least 4 or 8 kv tiles per
split), each a `GpuAttentionTuning` passed to the kernel and checked against the jnp reference.
H200 (bench/results/attention_split_grid.json): the 64 grid takes batch 1 at 64k from 164 to 100 us,
but its idle programs cost every other step of the same bucket (batch 1 at 1k 19 -> 28 us, batch 16
at 8k 162 -> 202 us), so the default stays.

--combine: the tiling of the split merge (`combine_splits`). Per (batch, context) at the engine's variant
(the long-context grid where `wants_long_grid` says so), the kernel pair with each combine tiling of
`COMBINE_VARIANTS` and with XLA's merge, each checked against the jnp reference. A program of the merge holds
one partial tile of `combine_block_rows` x `combine_block_cols` f32 per split in flight (the splits are
unrolled), so the 64-split grid's tiles are 4x the 16-split grid's, spread over as few programs.

--tiles: the same for the decode kernel's keys per tile, pipeline stages and warps (`TILE_VARIANTS`).

A --smoke run writes under /tmp unless --out is given (bench/results/ keeps device runs).
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import bench.attention as att
from bench.harness import result_path, run_metadata, save
from bench.report import attention_splits_stdout
from pallas_kernels.ragged_paged_attention import gpu_attention_tuning, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.gpu import decode_grid_splits, wants_long_grid

# --grid: a rule whose grid holds 64 splits, all of them working for <= 16 programs.
WIDE_RULE = (64, ((16, 48), (64, 12), (256, 2), (1024, 1)))
LONG128_RULE = (128, ((8, 64), (16, 48), (64, 12), (256, 2), (1024, 1)))
GRID_SHAPES = [(1, 1024), (1, 8192), (1, 65536), (2, 65536), (4, 65536), (4, 8192), (16, 8192)]


def grid_variants(base):
    """name -> (GpuAttentionTuning, per-call knobs) of the --grid comparison; `base` is the device's record."""
    wide = dataclasses.replace(base, split_rule=WIDE_RULE)
    return {
        "dyn_old": (base, {}),
        "static32": (base, {"num_kv_splits": 32}),
        "static64": (base, {"num_kv_splits": 64}),
        "dyn_new": (wide, {"max_kv_splits": 64}),
        "dyn_new_min4": (dataclasses.replace(wide, min_tiles_per_split=4), {"max_kv_splits": 64}),
        "dyn_new_min8": (dataclasses.replace(wide, min_tiles_per_split=8), {"max_kv_splits": 64}),
        # the engine's long-context decode (its grid and rule from the record), and one of 128 splits
        "long": (base, {"long_context": True}),
        "long128": (dataclasses.replace(base, long_split_rule=LONG128_RULE), {"long_context": True}),
    }


# name -> GpuAttentionTuning fields of the --combine comparison (r: rows, c: columns, w: warps of a program),
# each tiling taken at every shape (the record's small tiling off)
FORCED = {"combine_small_max_tokens": 0}
COMBINE_VARIANTS = {
    "xla": {"combine_kernel": False},
    "r16c64w4": {"combine_block_rows": 16, "combine_block_cols": 64, "combine_num_warps": 4, **FORCED},
    "r16c128w4": {"combine_block_rows": 16, "combine_block_cols": 128, "combine_num_warps": 4, **FORCED},
    "r16c32w4": {"combine_block_rows": 16, "combine_block_cols": 32, "combine_num_warps": 4, **FORCED},
    "r16c32w2": {"combine_block_rows": 16, "combine_block_cols": 32, "combine_num_warps": 2, **FORCED},
    "r16c16w2": {"combine_block_rows": 16, "combine_block_cols": 16, "combine_num_warps": 2, **FORCED},
    "r8c32w2": {"combine_block_rows": 8, "combine_block_cols": 32, "combine_num_warps": 2, **FORCED},
    "r8c16w1": {"combine_block_rows": 8, "combine_block_cols": 16, "combine_num_warps": 1, **FORCED},
    "r32c32w4": {"combine_block_rows": 32, "combine_block_cols": 32, "combine_num_warps": 4, **FORCED},
    "axis": {"combine_axis_min_splits": 1},  # the splits as a tensor axis (gpu.combine_tiling picks the tile)
}
# name -> fields of the --tiles comparison: the decode kernel's keys per tile (k), pipeline stages (s), warps (w)
TILE_VARIANTS = {
    "k64s2w4": {"decode_block_k": 64, "decode_num_stages": 2, "num_warps": 4},
    "k64s3w4": {"decode_block_k": 64, "decode_num_stages": 3, "num_warps": 4},
    "k64s4w4": {"decode_block_k": 64, "decode_num_stages": 4, "num_warps": 4},
    "k128s2w4": {"decode_block_k": 128, "decode_num_stages": 2, "num_warps": 4},
    "k128s3w4": {"decode_block_k": 128, "decode_num_stages": 3, "num_warps": 4},
    "k128s2w8": {"decode_block_k": 128, "decode_num_stages": 2, "num_warps": 8},
    "k32s3w4": {"decode_block_k": 32, "decode_num_stages": 3, "num_warps": 4},
    "k32s4w2": {"decode_block_k": 32, "decode_num_stages": 4, "num_warps": 2},
}
# (each variant compiles a loop of 40 calls: about 20 s on an H100, so a shape takes about 3 minutes)
COMBINE_SHAPES = [(1, 1024), (1, 65536), (16, 1024), (64, 1024)]


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


def run_splits(args, interpret: bool) -> list[dict]:
    rows = []
    for b in args.batches:
        for c in args.contexts:
            if b * c > args.max_tokens:
                continue
            inputs = engine_shaped(jax.random.key(b * 7 + c), b, c, 16, 64)
            nbytes = b * c * att.HKV * att.D * 2 * 2
            row = {"batch": b, "context": c, "us": {}}
            for splits in [None, *args.splits]:
                fn = att.kernel_fn(interpret, num_kv_splits=splits)
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
    return rows


def reference_of(inputs):
    """The jnp reference's output for `engine_shaped` inputs."""
    return jax.jit(lambda *a: ragged_paged_attention_reference(*a, sm_scale=att.SM_SCALE))(*inputs)


def time_against(fn, inputs, ref, batch: int, iters: int, reps: int) -> tuple[float, float]:
    """(largest error of fn's output against `ref` on the batch's rows, microseconds per call of fn)."""
    out = jax.jit(fn)(*inputs)
    err = float(jnp.abs(out[:batch].astype(jnp.float32) - ref[:batch].astype(jnp.float32)).max())
    return err, att.bench_loop(fn, *inputs, iters=iters, reps=reps) * 1e6


def run_grid(shapes, interpret: bool, smoke: bool) -> list[dict]:
    variants = grid_variants(gpu_attention_tuning())
    rows = []
    for b, c in shapes:
        inputs = engine_shaped(jax.random.key(b * 7 + c), b, c, 16, 64)
        ref = reference_of(inputs)
        row = {"batch": b, "context": c, "us": {}, "max_err": {}}
        for name, (tuning, knobs) in variants.items():
            fn = att.kernel_fn(interpret, tuning=tuning, **knobs)
            row["max_err"][name], row["us"][name] = time_against(fn, inputs, ref, b, iters=2 if smoke else 20,
                                                                 reps=1 if smoke else 3)  # fmt: skip
        print(row, flush=True)
        rows.append(row)
        del inputs
    return rows


def run_variants(shapes, variants: dict, interpret: bool, smoke: bool) -> list[dict]:
    """Per (batch, context): microseconds per call of the kernel (and its merge) with each of `variants` (name ->
    tuning fields replaced in the device's record), and each one's largest error against the jnp reference."""
    base = gpu_attention_tuning()
    rows = []
    for b, c in shapes:
        inputs = engine_shaped(jax.random.key(b * 7 + c), b, c, 16, 64)
        ref = reference_of(inputs)
        long = wants_long_grid(base, b, att.HKV, c)
        splits = decode_grid_splits(1 if long else inputs[0].shape[0], att.HKV, inputs[4].shape[1] * 16,
                                    base.decode_block_k,
                                    dataclasses.replace(base, split_rule=base.long_split_rule) if long else base)
        row = {"batch": b, "context": c, "long_grid": long, "grid_splits": splits, "us": {}, "max_err": {}}
        for name, fields in variants.items():
            fn = att.kernel_fn(interpret, tuning=dataclasses.replace(base, **fields), long_context=long)
            try:  # (a variant that fails to compile is recorded and the next one runs)
                row["max_err"][name], row["us"][name] = time_against(fn, inputs, ref, b, iters=2 if smoke else 40,
                                                                     reps=1 if smoke else 5)  # fmt: skip
            except Exception as e:
                row["us"][name] = f"{type(e).__name__}: {e}"[:300]
        timed = {k: v for k, v in row["us"].items() if isinstance(v, float)}
        row["best"] = min(timed, key=timed.get) if timed else None
        print(row, flush=True)
        rows.append(row)
        del inputs
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--grid", action="store_true", help="larger split grids against the default (see above)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 65536])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--combine", action="store_true", help="tilings of the split merge (see above)")
    ap.add_argument("--tiles", action="store_true", help="the decode kernel's tile, stages and warps, as --combine")
    ap.add_argument("--grid-shapes", nargs="*", default=None, metavar="B:C",
                    help="--grid, --combine, --tiles: (batch, context) pairs to time instead of the default set")
    ap.add_argument("--max-tokens", type=int, default=2 << 20, help="skip B * C above this (memory)")
    ap.add_argument("--out", default=None, help="result file name in bench/results/ (or a path); default "
                    "attention_splits.json, with --grid attention_split_grid.json (--smoke: under /tmp)")  # fmt: skip
    args = ap.parse_args(argv)
    interpret = args.smoke
    meta = run_metadata(__spec__.name, argv)
    if args.smoke:
        args.batches, args.contexts, args.splits = [1, 4], [64], [1, 2]
    modes = [m for m in ("grid", "combine", "tiles") if getattr(args, m)]
    if len(modes) > 1:
        ap.error("--grid, --combine and --tiles are separate runs")
    default = {"grid": "attention_split_grid.json", "combine": "attention_combine.json",
               "tiles": "attention_tiles.json"}
    path = result_path(args.out, default[modes[0]] if modes else "attention_splits.json", args.smoke)
    pairs = [tuple(int(x) for x in bc.split(":")) for bc in args.grid_shapes] if args.grid_shapes else None
    if args.combine or args.tiles:
        rows = run_variants([(2, 96)] if args.smoke else pairs or COMBINE_SHAPES,
                            COMBINE_VARIANTS if args.combine else TILE_VARIANTS, interpret, args.smoke)
    elif args.grid:
        rows = run_grid([(1, 64)] if args.smoke else pairs or GRID_SHAPES, interpret, args.smoke)
    else:
        rows = run_splits(args, interpret)
    result = {**meta, "rows": rows}
    save(path, result)
    if not modes:
        print("\n".join(attention_splits_stdout(result, args.splits)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
