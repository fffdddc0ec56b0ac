"""Masked multi-LoRA on the GPU at Granite-3.2-8B shapes: the projection stack, the kernel against its
alternatives, and (--layout) the weight layouts of the one-hot path.

What is timed is the **projection stack**, not the full engine step: the 40 layers' fused qkv, o,
gate_up and down base matmuls (+ SiLU-mul and residual) jitted as one function in bf16, with and
without the LoRA deltas. Attention, norms, embedding and sampling are excluded, so the overheads
below are relative to a smaller denominator than a full step's (they overstate the step overhead).

  (a) decode: 64 sequences, one token each, over 8 aLoRA adapters (r=32 on q/k/v, fused: A
      concatenated along R = 96, B block-diagonal), vs base only. Goal <= 10%.
  (b) prefill: 8192 tokens, adapter active only on the last 16, vs base only. Goal <= 2%.
  (c) one fused-qkv LoRA delta (Din 4096, R 96, Dout 6144, 8 adapters): the Pallas kernel vs
      `jax.lax.ragged_dot` (rows sorted by slot, gathered and scattered back) vs the one-hot
      einsum of JAX TPU engines, on the same inputs, timed over 8 layers' adapter weights in one jit
      (126 MB, twice the L2), one call per layer.

Each variant's time is the median over rounds of back-to-back calls; base and LoRA variants are
interleaved round by round, so one run gives each ratio. `--check` first compares the GPU kernel
with the reference on the device. Writes JSON (default bench/results/lora.json), prints a table.

--layout: where the decode step's LoRA time goes, by weight layout for the fused q/k/v projection,
40 layers deep. Each variant runs the q/k/v projection of every layer at a decode-sized step (T rows,
every row adapted, slots spread over 8 adapters of rank 32 on q, k and v): one jitted function per
variant, distinct weights per layer (so each layer's weights come from HBM, as in the engine), timed
over repetitions. The base-only projection is the reference the LoRA cost is a share of. Writes
bench/results/lora_layout.json. Variants:
  base            y = x @ W                                     (a base-only step)
  onehot_stacked  + shrink x @ A_flat[l], mask, expand @ B[l]   (the engine's adapter stacks [L, ...],
                                                                 static index)
  onehot_lists    the same with per-layer arrays                (is the stacked slice free?)
  fused           y_all = x @ [W | A_flat] once, mask the last n*R columns, expand
  base_prefix     base-only through the first N columns of [W | A_flat]  (what base steps pay if W is
                  stored only inside the concatenation)

    python -m bench.lora [--check] [--out lora.json] [--rounds 7]
    python -m bench.lora --layout                 # -> bench/results/lora_layout.json
    python -m bench.lora --smoke [--layout]       # CPU, toy shapes (written under /tmp unless --out)
"""

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import result_path, run_metadata, save, timeit
from bench.report import lora_stdout
from pallas_kernels.masked_lora import (
    build_lora_segments,
    masked_lora,
    masked_lora_add,
    masked_lora_reference,
    packed_to_block_diagonal,
)
from pallas_kernels.masked_lora.gpu import masked_lora_gpu

NUM_ADAPTERS, RANK = 8, 32
DECODE_SEQS, PREFILL_ACTIVE = 64, 16
BF16 = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The model's projection shapes and the step sizes timed."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    layers: int
    prefill_t: int  # tokens of the prefill step (b)
    dense_t: int  # tokens of the all-adapted step of (c)

    @property
    def dq(self) -> int:
        return self.heads * self.head_dim

    @property
    def dkv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def qkv(self) -> int:
        return self.dq + 2 * self.dkv


GRANITE_8B = Shapes(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=12800, layers=40, prefill_t=8192,
                    dense_t=2048)  # fmt: skip
# --smoke: tiny shapes so the script's plumbing runs on a CPU in seconds (numbers meaningless).
SMOKE = Shapes(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, layers=2, prefill_t=256, dense_t=128)


# ----------------------------------------------------------------------------- weights


def _normal(key, shape, fan_in):
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(BF16)


def make_base(key, sh: Shapes):
    out = []
    for i in range(sh.layers):
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        out.append(
            dict(
                qkv=_normal(k[0], (sh.hidden, sh.qkv), sh.hidden),
                o=_normal(k[1], (sh.dq, sh.hidden), sh.dq),
                gate_up=_normal(k[2], (sh.hidden, 2 * sh.inter), sh.hidden),
                down=_normal(k[3], (sh.inter, sh.hidden), sh.inter),
            )
        )
    return out


def make_qkv_lora(key, sh: Shapes, num_adapters=NUM_ADAPTERS, rank=RANK):
    """(A [n, 4096, 3r] with q|k|v ranks concatenated, B [n, 3r, 6144] block-diagonal, B packed
    [n, r, 6144] with the three B side by side), scaling folded."""
    out = []
    for i in range(sh.layers):
        k = jax.random.split(jax.random.fold_in(key, 1000 + i), 2)
        a = _normal(k[0], (num_adapters, sh.hidden, 3 * rank), sh.hidden)
        b_full = _normal(k[1], (num_adapters, 3 * rank, sh.qkv), rank)
        row = jnp.arange(3 * rank)[:, None] // rank
        col = jnp.arange(sh.qkv)[None, :]
        col_proj = (col >= sh.dq).astype(jnp.int32) + (col >= sh.dq + sh.dkv).astype(jnp.int32)
        widths = (sh.dq, sh.dkv, sh.dkv)
        packed = jnp.concatenate(
            [b_full[:, i * rank : (i + 1) * rank, sum(widths[:i]) : sum(widths[: i + 1])] for i in range(3)],
            axis=2,
        )
        out.append((a, jnp.where(row == col_proj, b_full, 0).astype(BF16), packed))
    return out


# ----------------------------------------------------------------------------- LoRA variants


def lora_one_hot(x, a, b, slots):
    """One-hot einsum (tpu-inference style): every token through every adapter, then masked."""
    onehot = (slots[:, None] == jnp.arange(a.shape[0])[None, :]).astype(x.dtype)  # [T, n]
    h = jnp.einsum("td,ndr->tnr", x, a, preferred_element_type=jnp.float32)
    h = (h * onehot[:, :, None]).astype(x.dtype)
    return jnp.einsum("tnr,nro->to", h, b, preferred_element_type=jnp.float32).astype(x.dtype)


def lora_ragged_dot(x, a, b, slots):
    """ragged_dot over rows sorted by slot; -1 rows go last, past every group, and come out zero."""
    n = a.shape[0]
    key = jnp.where(slots < 0, n, slots)
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=n + 1)[:n].astype(jnp.int32)
    xs = x[order]
    h = jax.lax.ragged_dot(xs, a, sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    d = jax.lax.ragged_dot(h, b, sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.zeros_like(d).at[order].set(d)


def qkv_with_lora(sh: Shapes, mode, x, w, lora, slots, segs):
    base = x @ w
    if mode == "base":
        return base
    a, b, packed = lora
    if mode == "kernel_add_packed":
        return masked_lora_add(base, x, a, packed, segs, out_widths=(sh.dq, sh.dkv, sh.dkv))
    if mode.startswith("kernel_add_cfg"):  # kernel_add_cfg<block_n>_<k_chunk>: tuning variants
        bn, kc = (int(v) for v in mode[len("kernel_add_cfg") :].split("_"))
        return masked_lora_gpu(x, a, b, segs, base, accumulate=True, block_n=bn, k_chunk=kc)
    if mode == "kernel_add":
        return masked_lora_add(base, x, a, b, segs)
    if mode == "kernel_delta":
        return base + masked_lora(x, a, b, segs)
    if mode == "one_hot":
        return base + lora_one_hot(x, a, b, slots)
    if mode == "ragged_dot":
        return base + lora_ragged_dot(x, a, b, slots)
    raise ValueError(mode)


def projection_stack(sh: Shapes, mode, x, base, loras, slots, segs):
    """40 layers of fused qkv / o / gate_up / down projections; attention is stood in by the q slice."""
    for w, lora in zip(base, loras):
        qkv = qkv_with_lora(sh, mode, x, w["qkv"], lora, slots, segs)
        o = qkv[:, : sh.dq] @ w["o"]
        gu = o @ w["gate_up"]
        act = (jax.nn.silu(gu[:, : sh.inter].astype(jnp.float32)) * gu[:, sh.inter :].astype(jnp.float32)).astype(
            BF16
        )
        x = x + act @ w["down"]
    return x


# ----------------------------------------------------------------------------- timing


def bench_interleaved(fns, args_by_name, rounds, calls, errors: dict):
    """{name: median ms per call}: each round runs every fn `calls` times back to back, then syncs. A
    variant that fails to compile or run is left out and its error recorded in `errors`."""
    fns = dict(fns)
    for name, fn in list(fns.items()):  # compile + warm up; a variant that fails is reported, not fatal
        try:
            jax.block_until_ready(fn(*args_by_name[name]))
            jax.block_until_ready(fn(*args_by_name[name]))
        except Exception as e:  # noqa: BLE001
            print(f"{name} FAILED: {e!r}"[:2000], flush=True)
            errors[name] = repr(e)[:2000]
            del fns[name]
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            args = args_by_name[name]
            t0 = time.perf_counter()
            out = None
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) * 1e3 / calls)
    return {name: statistics.median(s) for name, s in samples.items()}, samples


def decode_slots(num_seqs=DECODE_SEQS):
    return np.repeat(np.arange(NUM_ADAPTERS, dtype=np.int32), num_seqs // NUM_ADAPTERS)


def prefill_slots(t: int):
    s = np.full(t, -1, np.int32)
    s[-PREFILL_ACTIVE:] = 0
    return s


# ----------------------------------------------------------------------------- parts


def run_check(sh: Shapes, small_only=False):
    """GPU kernel vs the f32 reference on device: production and odd shapes, delta and in-place add."""
    rng = np.random.default_rng(0)
    kw = dict(impl="gpu", interpret=jax.default_backend() != "gpu")
    rows = []
    cases = [  # T, Din, R, Dout, slots kind
        (64, 4096, 96, sh.qkv, "decode"),
        (37, 200, 24, 130, "runs"),
        (100, 512, 8, 1000, "runs"),
        (48, 256, 16, 77, "each"),
        (300, 12800, 64, 4096, "runs"),
        (8192, 4096, 32, 1024, "tail"),
    ]
    for t, din, r, dout, kind in cases:
        if small_only and t * din * dout > 5e7:
            continue
        n = 8
        if kind == "decode":
            slots = decode_slots(t)
        elif kind == "tail":
            slots = prefill_slots(t)
        elif kind == "each":
            slots = (np.arange(t) % n).astype(np.int32)
        else:
            slots, i = [], 0
            while len(slots) < t:
                slots += [int(rng.integers(-1, n))] * int(rng.integers(1, 40))
                i += 1
            slots = np.asarray(slots[:t], np.int32)
        x = jnp.asarray(rng.standard_normal((t, din)), BF16)
        a = jnp.asarray(rng.standard_normal((n, din, r)) / np.sqrt(din), BF16)
        b = jnp.asarray(rng.standard_normal((n, r, dout)) / np.sqrt(r), BF16)
        y = jnp.asarray(rng.standard_normal((t, dout)), BF16)
        segs = jax.tree.map(jnp.asarray, build_lora_segments(slots, max(t, 1)))
        ref = np.asarray(masked_lora_reference(x, a, b, slots).astype(jnp.float32), np.float64)
        ref_hi = np.asarray(jnp.asarray(masked_lora_reference(x.astype(jnp.float32), a, b, slots)), np.float64)
        out = np.asarray(masked_lora(x, a, b, segs, **kw).astype(jnp.float32), np.float64)
        added = np.asarray(masked_lora_add(y, x, a, b, segs, **kw).astype(jnp.float32), np.float64)
        if kind == "decode":  # also the packed q/k/v layout on the production shape
            widths = (sh.dq, sh.dkv, sh.dkv)
            packed = jnp.asarray(rng.standard_normal((n, r // 3, dout)) / np.sqrt(r), BF16)
            out_p = masked_lora(x, a, packed, segs, out_widths=widths, **kw).astype(jnp.float32)
            ref_p = masked_lora_reference(x.astype(jnp.float32), a, packed_to_block_diagonal(packed, widths), slots)
            rel_p = float(jnp.linalg.norm(out_p - ref_p) / jnp.linalg.norm(ref_p))
            rows.append(dict(T=t, Din=din, R=r, Dout=dout, slots="decode_packed", rel_err=rel_p, ok=rel_p < 1e-2))
        base_rows = slots < 0
        rel = float(np.linalg.norm(out - ref_hi) / max(np.linalg.norm(ref_hi), 1e-30))
        ok = (
            np.isfinite(out).all()
            and (out[base_rows] == 0).all()
            and (added[base_rows] == np.asarray(y.astype(jnp.float32))[base_rows]).all()
            and rel < 1e-2
        )
        rows.append(dict(T=t, Din=din, R=r, Dout=dout, slots=kind, rel_err=rel, ok=bool(ok)))
        del ref
    return rows


def run_stack(sh: Shapes, t, slots, max_segments, modes, rounds, calls, base, loras, errors):
    x = jax.random.normal(jax.random.key(7), (t, sh.hidden), jnp.float32).astype(BF16)
    segs = jax.tree.map(jnp.asarray, build_lora_segments(slots, max_segments))
    slots_j = jnp.asarray(slots)
    fns = {m: jax.jit(functools.partial(projection_stack, sh, m)) for m in modes}
    args = {m: (x, base, loras, slots_j, segs) for m in modes}
    med, samples = bench_interleaved(fns, args, rounds, calls, errors)
    return med, samples


def _kernel_cfg(bn, kc, x, a, b, p, s, g):
    zeros = jnp.zeros((x.shape[0], b.shape[2]), x.dtype)
    return masked_lora_gpu(x, a, b, g, zeros, accumulate=False, block_n=bn, k_chunk=kc)


def run_kernel_compare(sh: Shapes, cases, loras, rounds, calls, errors):
    """Delta of one fused-qkv LoRA, the given layers' adapter weights (one call each) in one jit."""
    widths = (sh.dq, sh.dkv, sh.dkv)
    results = []
    for name, t, slots in cases:
        x = jax.random.normal(jax.random.key(3), (t, sh.hidden), jnp.float32).astype(BF16)
        segs = jax.tree.map(jnp.asarray, build_lora_segments(slots, 64))
        slots_j = jnp.asarray(slots)
        impls = {
            "kernel": lambda x, a, b, p, s, g: masked_lora(x, a, b, g),
            "kernel_packed": lambda x, a, b, p, s, g: masked_lora(x, a, p, g, out_widths=widths),
            **{
                f"kernel_cfg{bn}_{kc}": functools.partial(_kernel_cfg, bn, kc)
                for bn, kc in ((256, 1024), (64, 256), (128, 256), (64, 512))
            },
            "ragged_dot": lambda x, a, b, p, s, g: lora_ragged_dot(x, a, b, s),
            "one_hot": lambda x, a, b, p, s, g: lora_one_hot(x, a, b, s),
        }

        def over_layers(impl, x, loras, s, g):
            return [impl(x, a, b, p, s, g) for a, b, p in loras]

        if jax.default_backend() != "gpu":
            impls = {k: v for k, v in impls.items() if not k.startswith("kernel_cfg")}
        fns = {k: jax.jit(functools.partial(over_layers, f)) for k, f in impls.items()}
        args = {k: (x, loras, slots_j, segs) for k in impls}
        med, _ = bench_interleaved(fns, args, rounds, calls, errors)
        n_layers = len(loras)
        touched = len(set(slots[slots >= 0].tolist()))
        a0, b0, _ = loras[0]
        lora_bytes = (a0.nbytes + b0.nbytes) // NUM_ADAPTERS * touched  # each touched adapter read once
        row = dict(case=name, T=t, adapted_tokens=int((slots >= 0).sum()), adapters_touched=touched)
        for k, ms in med.items():
            row[f"{k}_us_per_call"] = ms * 1e3 / n_layers
        row["adapter_weight_bytes_per_call"] = int(lora_bytes)
        if "kernel_us_per_call" in row:
            row["kernel_weight_GBps"] = lora_bytes / (row["kernel_us_per_call"] * 1e-6) / 1e9
        results.append(row)
    return results


def run_layout(sh: Shapes, tokens: list[int], reps: int) -> dict:
    """--layout: the fused q/k/v projection of every layer, base-only and with the one-hot LoRA in each
    weight layout (see the module docstring); microseconds per layer."""
    layers, din, widths = sh.layers, sh.hidden, (sh.dq, sh.dkv, sh.dkv)
    n, r1 = NUM_ADAPTERS, RANK
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
    for t in tokens:
        x = jax.random.normal(jax.random.key(t), (t, din), dt)
        slots = jnp.arange(t, dtype=jnp.int32) % n
        row = {"tokens": t, "us_per_layer": {}}
        ref = None
        for name, (fn, weights) in variants.items():
            run = functools.partial(fn, x, slots, *weights)
            sec = timeit(lambda run=run: jax.block_until_ready(run()), warmup=1, iters=reps)
            row["us_per_layer"][name] = sec / layers * 1e6
            out = fn(x, slots, *weights)
            if name.startswith(("onehot", "fused")):
                ref = out if ref is None else ref
                row.setdefault("max_abs_diff_vs_onehot_stacked", {})[name] = float(jnp.abs(out - ref).max())
        base_us = row["us_per_layer"]["base"]
        row["lora_overhead_us_per_layer"] = {k: v - base_us for k, v in row["us_per_layer"].items() if k != "base"}
        print(row, flush=True)
        rows.append(row)
    return {"layers": layers, "din": din, "widths": widths, "adapters": n, "rank": r1, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="result file name in bench/results/ (or a path); default "
                   "lora.json, with --layout lora_layout.json (--smoke: under /tmp)")  # fmt: skip
    p.add_argument("--check", action="store_true", help="compare the GPU kernel with the reference first")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: plumbing test on a CPU")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--parts", default="a,b,c", help="which of a (decode), b (prefill), c (kernel vs) to run")
    p.add_argument("--compare-layers", type=int, default=8, help="adapter weight sets timed in (c)")
    p.add_argument("--layout", action="store_true", help="the one-hot path's weight layouts instead (see above)")
    p.add_argument("--layout-tokens", type=int, nargs="*", default=[16, 64], help="--layout: step sizes (rows)")
    p.add_argument("--layout-reps", type=int, default=30, help="--layout: timed repetitions per variant")
    args = p.parse_args(argv)
    sh = SMOKE if args.smoke else GRANITE_8B
    meta = run_metadata(__spec__.name, argv)
    if args.layout:
        tokens, reps = ([16], 2) if args.smoke else (args.layout_tokens, args.layout_reps)
        result = {**meta, **run_layout(sh, tokens, reps)}
        path = save(result_path(args.out, "lora_layout.json", smoke=args.smoke), result)
        print("wrote", path)
        return result
    path = result_path(args.out, "lora.json", smoke=args.smoke)
    rounds = 2 if args.smoke else args.rounds
    errors = {}  # variant -> error, recorded in the JSON
    result = dict(
        **meta,
        what="projection stack (40 layers' fused qkv/o/gate_up/down matmuls + LoRA), NOT the full "
        "engine step: attention, norms, embedding and sampling excluded",
        python=platform.python_version(),
        shapes=dict(
            hidden=sh.hidden,
            q_heads=sh.heads,
            kv_heads=sh.kv_heads,
            head_dim=sh.head_dim,
            intermediate=sh.inter,
            layers=sh.layers,
            dtype="bfloat16",
            adapters=NUM_ADAPTERS,
            rank=RANK,
            adapted="q,k,v (fused)",
        ),
    )
    t_start = time.perf_counter()

    def checkpoint():  # after every part, so a run cut short still leaves its numbers
        result["bench_seconds"] = time.perf_counter() - t_start
        result["errors"] = errors
        save(path, result)

    if args.check:
        try:
            result["check"] = run_check(sh, small_only=args.smoke)
        except Exception as e:  # noqa: BLE001
            result["check"] = [dict(ok=False, rel_err=float("nan"), error=repr(e)[:2000])]
        print("check:", json.dumps(result["check"]), flush=True)
        checkpoint()

    base = make_base(jax.random.key(0), sh)
    loras = make_qkv_lora(jax.random.key(1), sh)
    jax.block_until_ready((base, loras))

    parts = set(args.parts.split(","))
    modes_a = ["base", "kernel_add", "kernel_add_packed", "kernel_delta", "one_hot", "ragged_dot"]
    if jax.default_backend() == "gpu":
        modes_a += ["kernel_add_cfg64_256"]
    if "a" in parts:
        med_a, samp_a = run_stack(sh, DECODE_SEQS, decode_slots(), 64, modes_a, rounds, 10, base, loras, errors)
        result["decode"] = dict(
            tokens=DECODE_SEQS,
            sequences=DECODE_SEQS,
            adapters=NUM_ADAPTERS,
            max_segments=64,
            ms=med_a,
            overhead_vs_base={m: med_a[m] / med_a["base"] - 1 for m in modes_a[1:] if m in med_a},
            samples_ms=samp_a,
            goal_overhead=0.10,
        )
        print("decode:", json.dumps(result["decode"]["ms"]), flush=True)
        checkpoint()

    if "b" in parts:
        modes_b = ["base", "kernel_add", "kernel_add_packed", "kernel_delta"]
        med_b, samp_b = run_stack(sh, sh.prefill_t, prefill_slots(sh.prefill_t), 64, modes_b, max(3, rounds - 2), 2,
                                  base, loras, errors)  # fmt: skip
        result["prefill"] = dict(
            tokens=sh.prefill_t,
            adapted_tokens=PREFILL_ACTIVE,
            max_segments=64,
            ms=med_b,
            overhead_vs_base={m: med_b[m] / med_b["base"] - 1 for m in modes_b[1:] if m in med_b},
            samples_ms=samp_b,
            goal_overhead=0.02,
        )
        print("prefill:", json.dumps(result["prefill"]["ms"]), flush=True)
        checkpoint()
    del base

    dense = np.repeat(np.arange(NUM_ADAPTERS, dtype=np.int32), sh.dense_t // NUM_ADAPTERS)
    cases = [
        (f"decode_{DECODE_SEQS}", DECODE_SEQS, decode_slots()),
        (f"prefill_{sh.prefill_t}_tail{PREFILL_ACTIVE}", sh.prefill_t, prefill_slots(sh.prefill_t)),
        (f"prefill_{sh.dense_t}_all_adapted", sh.dense_t, dense),
    ]
    if "c" in parts:
        result["kernel_vs"] = run_kernel_compare(sh, cases, loras[: args.compare_layers], rounds, 3, errors)
    checkpoint()
    print("\n".join(lora_stdout(result)))
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
