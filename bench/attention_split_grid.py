"""Should batch-1 long-context decode use a bigger kv-split grid? Larger grids against the default, measured.

    python bench/attention_split_grid.py            # H200
    python bench/attention_split_grid.py --smoke    # CPU, interpret mode

At the engine's padded decode shapes (T = 16-row bucket, 64 sequence slots), per (batch, context):
the default (grid of 16 splits, split_rule on the device), static 32 and 64 splits, and a grid of 64
whose rule gives 64 splits to <= 16 programs (optionally with at least 4 or 8 kv tiles per split),
each checked against the jnp reference. H200 (bench/results/attention_split_grid.json): the 64 grid
takes batch 1 at 64k from 164 to 100 us, but its idle programs cost every other step of the same
bucket (batch 1 at 1k 19 -> 28 us, batch 16 at 8k 162 -> 202 us), so the default stays.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench.attention as att  # noqa: E402
import pallas_kernels.ragged_paged_attention.gpu as g  # noqa: E402
from bench.attention_splits import engine_shaped  # noqa: E402
from bench.common import run_metadata, save  # noqa: E402
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference  # noqa: E402

smoke = "--smoke" in sys.argv
att.INTERPRET = smoke
OLD = g.SPLIT_RULE
NEW = (64, ((16, 48), (64, 12), (256, 2), (1024, 1)))
VARIANTS = {"dyn_old": (OLD, None, 1, None), "static32": (OLD, None, 1, 32), "static64": (OLD, None, 1, 64),
            "dyn_new": (NEW, 64, 1, None), "dyn_new_min4": (NEW, 64, 4, None), "dyn_new_min8": (NEW, 64, 8, None)}


def variant(name):
    rule, grid, mt, static = VARIANTS[name]
    g.SPLIT_RULE, g.MIN_TILES_PER_SPLIT = rule, mt
    kw = {"num_kv_splits": static} if static else ({"max_kv_splits": grid} if grid else {})
    return lambda q, *rest: ragged_paged_attention(q, *rest, sm_scale=att.SM_SCALE, impl="gpu",
                                                   interpret=att.INTERPRET, **kw)


rows = []
shapes = [(1, 64)] if smoke else [(1, 1024), (1, 8192), (1, 65536), (2, 65536), (4, 65536), (4, 8192), (16, 8192)]
for b, c in shapes:
    inputs = engine_shaped(jax.random.key(b * 7 + c), b, c, 16, 64)
    ref = jax.jit(lambda *a: ragged_paged_attention_reference(*a, sm_scale=att.SM_SCALE))(*inputs)
    row = {"batch": b, "context": c, "us": {}, "max_err": {}}
    for name in VARIANTS:
        out = jax.jit(variant(name))(*inputs)
        row["max_err"][name] = float(jnp.abs(out[:b].astype(jnp.float32) - ref[:b].astype(jnp.float32)).max())
        row["us"][name] = att.bench_loop(variant(name), *inputs, iters=2 if smoke else 20, reps=1 if smoke else 3) * 1e6
    g.SPLIT_RULE, g.MIN_TILES_PER_SPLIT = OLD, 1
    print(row, flush=True)
    rows.append(row)
if not smoke:
    save("attention_split_grid.json", {**run_metadata(), "rows": rows})
