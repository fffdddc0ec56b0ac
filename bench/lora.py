"""Masked multi-LoRA on the GPU at Granite-3.2-8B shapes (issue 5).

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

    python bench/lora.py [--check] [--out bench/results/lora.json] [--rounds 7] [--smoke]
"""

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.masked_lora import (  # noqa: E402
    build_lora_segments,
    masked_lora,
    masked_lora_add,
    masked_lora_reference,
    packed_to_block_diagonal,
)
from pallas_kernels.masked_lora.gpu import masked_lora_gpu  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 4096, 32, 8, 128, 12800, 40
DQ, DKV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
QKV = DQ + 2 * DKV
NUM_ADAPTERS, RANK = 8, 32
DECODE_SEQS, PREFILL_T, PREFILL_ACTIVE, DENSE_T = 64, 8192, 16, 2048
BF16 = jnp.bfloat16
ERRORS = {}  # variant -> error, recorded in the JSON


def _shrink_for_smoke():
    """--smoke: tiny shapes so the script's plumbing runs on a CPU in seconds (numbers meaningless)."""
    global HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, DQ, DKV, QKV, PREFILL_T, DENSE_T
    HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 128, 4, 2, 32, 256, 2
    DQ, DKV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    QKV = DQ + 2 * DKV
    PREFILL_T, DENSE_T = 256, 128


# ----------------------------------------------------------------------------- weights


def _normal(key, shape, fan_in):
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(BF16)


def make_base(key, layers):
    out = []
    for i in range(layers):
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        out.append(
            dict(
                qkv=_normal(k[0], (HIDDEN, QKV), HIDDEN),
                o=_normal(k[1], (DQ, HIDDEN), DQ),
                gate_up=_normal(k[2], (HIDDEN, 2 * INTER), HIDDEN),
                down=_normal(k[3], (INTER, HIDDEN), INTER),
            )
        )
    return out


def make_qkv_lora(key, layers, num_adapters=NUM_ADAPTERS, rank=RANK):
    """(A [n, 4096, 3r] with q|k|v ranks concatenated, B [n, 3r, 6144] block-diagonal, B packed
    [n, r, 6144] with the three B side by side), scaling folded."""
    out = []
    for i in range(layers):
        k = jax.random.split(jax.random.fold_in(key, 1000 + i), 2)
        a = _normal(k[0], (num_adapters, HIDDEN, 3 * rank), HIDDEN)
        b_full = _normal(k[1], (num_adapters, 3 * rank, QKV), rank)
        row = jnp.arange(3 * rank)[:, None] // rank
        col = jnp.arange(QKV)[None, :]
        col_proj = (col >= DQ).astype(jnp.int32) + (col >= DQ + DKV).astype(jnp.int32)
        widths = (DQ, DKV, DKV)
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


def qkv_with_lora(mode, x, w, lora, slots, segs):
    base = x @ w
    if mode == "base":
        return base
    a, b, packed = lora
    if mode == "kernel_add_packed":
        return masked_lora_add(base, x, a, packed, segs, out_widths=(DQ, DKV, DKV))
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


def projection_stack(mode, x, base, loras, slots, segs):
    """40 layers of fused qkv / o / gate_up / down projections; attention is stood in by the q slice."""
    for w, lora in zip(base, loras):
        qkv = qkv_with_lora(mode, x, w["qkv"], lora, slots, segs)
        o = qkv[:, :DQ] @ w["o"]
        gu = o @ w["gate_up"]
        act = (jax.nn.silu(gu[:, :INTER].astype(jnp.float32)) * gu[:, INTER:].astype(jnp.float32)).astype(BF16)
        x = x + act @ w["down"]
    return x


# ----------------------------------------------------------------------------- timing


def bench_interleaved(fns, args_by_name, rounds, calls):
    """{name: median ms per call}: each round runs every fn `calls` times back to back, then syncs."""
    fns = dict(fns)
    for name, fn in list(fns.items()):  # compile + warm up; a variant that fails is reported, not fatal
        try:
            jax.block_until_ready(fn(*args_by_name[name]))
            jax.block_until_ready(fn(*args_by_name[name]))
        except Exception as e:  # noqa: BLE001
            print(f"{name} FAILED: {e!r}"[:2000], flush=True)
            ERRORS[name] = repr(e)[:2000]
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


def decode_slots(num_seqs=None):
    num_seqs = num_seqs or DECODE_SEQS
    return np.repeat(np.arange(NUM_ADAPTERS, dtype=np.int32), num_seqs // NUM_ADAPTERS)


def prefill_slots(t=None):
    s = np.full(t or PREFILL_T, -1, np.int32)
    s[-PREFILL_ACTIVE:] = 0
    return s


# ----------------------------------------------------------------------------- parts


def run_check(small_only=False):
    """GPU kernel vs the f32 reference on device: production and odd shapes, delta and in-place add."""
    rng = np.random.default_rng(0)
    kw = dict(impl="gpu", interpret=jax.default_backend() != "gpu")
    rows = []
    cases = [  # T, Din, R, Dout, slots kind
        (64, 4096, 96, QKV, "decode"),
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
            widths = (DQ, DKV, DKV)
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


def run_stack(t, slots, max_segments, modes, layers, rounds, calls, base, loras):
    x = jax.random.normal(jax.random.key(7), (t, HIDDEN), jnp.float32).astype(BF16)
    segs = jax.tree.map(jnp.asarray, build_lora_segments(slots, max_segments))
    slots_j = jnp.asarray(slots)
    fns = {m: jax.jit(functools.partial(projection_stack, m)) for m in modes}
    args = {m: (x, base[:layers], loras[:layers], slots_j, segs) for m in modes}
    med, samples = bench_interleaved(fns, args, rounds, calls)
    return med, samples


def _kernel_cfg(bn, kc, x, a, b, p, s, g):
    zeros = jnp.zeros((x.shape[0], b.shape[2]), x.dtype)
    return masked_lora_gpu(x, a, b, g, zeros, accumulate=False, block_n=bn, k_chunk=kc)


def run_kernel_compare(cases, loras, rounds, calls):
    """Delta of one fused-qkv LoRA, 40 layers' adapter weights (one call each) in one jit."""
    results = []
    for name, t, slots in cases:
        x = jax.random.normal(jax.random.key(3), (t, HIDDEN), jnp.float32).astype(BF16)
        segs = jax.tree.map(jnp.asarray, build_lora_segments(slots, 64))
        slots_j = jnp.asarray(slots)
        impls = {
            "kernel": lambda x, a, b, p, s, g: masked_lora(x, a, b, g),
            "kernel_packed": lambda x, a, b, p, s, g: masked_lora(x, a, p, g, out_widths=(DQ, DKV, DKV)),
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
        med, _ = bench_interleaved(fns, args, rounds, calls)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/lora.json")
    p.add_argument("--check", action="store_true", help="compare the GPU kernel with the reference first")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: plumbing test on a CPU")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--parts", default="a,b,c", help="which of a (decode), b (prefill), c (kernel vs) to run")
    p.add_argument("--compare-layers", type=int, default=8, help="adapter weight sets timed in (c)")
    args = p.parse_args()
    if args.smoke:
        _shrink_for_smoke()
    layers = LAYERS
    rounds = 2 if args.smoke else args.rounds
    dev = jax.devices()[0]
    commit = os.environ.get("JALORA_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        except Exception:
            commit = "unknown"
    result = dict(
        what="projection stack (40 layers' fused qkv/o/gate_up/down matmuls + LoRA), NOT the full "
        "engine step: attention, norms, embedding and sampling excluded",
        device=getattr(dev, "device_kind", str(dev)),
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        python=platform.python_version(),
        git_commit=commit,
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        shapes=dict(
            hidden=HIDDEN,
            q_heads=HEADS,
            kv_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            intermediate=INTER,
            layers=layers,
            dtype="bfloat16",
            adapters=NUM_ADAPTERS,
            rank=RANK,
            adapted="q,k,v (fused)",
        ),
    )
    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every part, so a run cut short still leaves its numbers
        result["bench_seconds"] = time.perf_counter() - t_start
        result["errors"] = ERRORS
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.check:
        try:
            result["check"] = run_check(small_only=args.smoke)
        except Exception as e:  # noqa: BLE001
            result["check"] = [dict(ok=False, rel_err=float("nan"), error=repr(e)[:2000])]
        print("check:", json.dumps(result["check"]), flush=True)
        save()

    base = make_base(jax.random.key(0), layers)
    loras = make_qkv_lora(jax.random.key(1), layers)
    jax.block_until_ready((base, loras))

    parts = set(args.parts.split(","))
    modes_a = ["base", "kernel_add", "kernel_add_packed", "kernel_delta", "one_hot", "ragged_dot"]
    if jax.default_backend() == "gpu":
        modes_a += ["kernel_add_cfg64_256"]
    if "a" in parts:
        med_a, samp_a = run_stack(DECODE_SEQS, decode_slots(), 64, modes_a, layers, rounds, 10, base, loras)
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
        save()

    if "b" in parts:
        modes_b = ["base", "kernel_add", "kernel_add_packed", "kernel_delta"]
        med_b, samp_b = run_stack(PREFILL_T, prefill_slots(), 64, modes_b, layers, max(3, rounds - 2), 2, base, loras)
        result["prefill"] = dict(
            tokens=PREFILL_T,
            adapted_tokens=PREFILL_ACTIVE,
            max_segments=64,
            ms=med_b,
            overhead_vs_base={m: med_b[m] / med_b["base"] - 1 for m in modes_b[1:] if m in med_b},
            samples_ms=samp_b,
            goal_overhead=0.02,
        )
        print("prefill:", json.dumps(result["prefill"]["ms"]), flush=True)
        save()
    del base

    dense = np.repeat(np.arange(NUM_ADAPTERS, dtype=np.int32), DENSE_T // NUM_ADAPTERS)
    cases = [
        (f"decode_{DECODE_SEQS}", DECODE_SEQS, decode_slots()),
        (f"prefill_{PREFILL_T}_tail{PREFILL_ACTIVE}", PREFILL_T, prefill_slots()),
        (f"prefill_{DENSE_T}_all_adapted", DENSE_T, dense),
    ]
    if "c" in parts:
        result["kernel_vs"] = run_kernel_compare(cases, loras[: args.compare_layers], rounds, 3)
        save()
    print_table(result)


def print_table(r):
    d, p = r.get("decode"), r.get("prefill")
    print(f"\n{r['device']}, jax {r['jax_version']}, commit {r['git_commit'][:10]}; {r['what']}\n")
    print("| workload (projection stack) | base ms | + LoRA ms: kernel add | packed add | delta | goal |")
    print("|---|---|---|---|---|---|")
    rows = []
    if d:
        rows.append((f"(a) decode {d['tokens']} seqs, 8 aLoRA r=32 q/k/v", d))
    if p:
        rows.append((f"(b) prefill {p['tokens']}, last {p['adapted_tokens']} adapted", p))
    for name, x in rows:
        ms, o = x["ms"], x["overhead_vs_base"]
        cells = [
            f"{ms[m]:.3f} ({o[m]:+.1%})" if m in o else "failed"
            for m in ("kernel_add", "kernel_add_packed", "kernel_delta")
        ]
        print(f"| {name} | {ms['base']:.3f} | " + " | ".join(cells) + f" | <= {x['goal_overhead']:.0%} |")
    o = d["overhead_vs_base"] if d else {}
    print(
        f"\n(a) with the one-hot einsum: {o.get('one_hot', float('nan')):+.1%}; "
        f"with ragged_dot: {o.get('ragged_dot', float('nan')):+.1%}\n"
    )
    if "kernel_vs" not in r:
        return
    keys = sorted({k[: -len("_us_per_call")] for c in r["kernel_vs"] for k in c if k.endswith("_us_per_call")})
    print("| (c) fused-qkv delta, us per call | " + " | ".join(keys) + " | kernel weight GB/s |")
    print("|---" * (len(keys) + 2) + "|")
    for c in r["kernel_vs"]:
        cells = " | ".join(f"{c.get(k + '_us_per_call', float('nan')):.1f}" for k in keys)
        print(f"| {c['case']} | {cells} | {c.get('kernel_weight_GBps', float('nan')):.0f} |")
    if "check" in r:
        ok = all(c["ok"] for c in r["check"])
        print("\ncheck:", "all ok" if ok else "FAILED", [round(c["rel_err"], 5) for c in r["check"]])


if __name__ == "__main__":
    main()
