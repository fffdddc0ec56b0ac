"""Training throughput of `jalora.train`: Granite-3.2-8B shapes, dummy bf16 weights, an aLoRA of rank 32
on q/k/v, 4096-token sequences; tokens/s and model FLOPs utilisation (MFU).

    python -m bench.train_throughput                      # on the GPU: bench/results/train_throughput.json
    python -m bench.train_throughput --smoke              # tiny shapes on a CPU (result under /tmp)

Each step is one optimizer step (`grad_accum` micro-batches of `batch` sequences) through the same
jitted functions `train_adapter` runs (`_grad_step`, `_apply_fn`), timed after a warm-up step.

MFU counts the FLOPs a LoRA step needs against the bf16 matmul rate measured in the same run (and
against the H200's 790 TFLOP/s reference): the forward (2 x frozen weights x tokens), the backward
through the activations only (2 x, no weight gradients for frozen weights), causal attention
(forward 2 x 2 x T^2/2 x layers x heads x head_dim, backward twice that), and the LoRA matmuls (6 x
LoRA weights x adapted tokens). The common 6 x parameters x tokens convention (full fine-tuning) is
given beside it; it overstates a LoRA step's work by counting weight gradients it does not compute.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.harness import GRANITE_8B, TINY, measure_ceilings, result_path, run_metadata, save, write_model_dir

REF_MATMUL_TFLOPS = 790.0  # H200 bf16 matmul reference (bench/report.py)


def lora_step_flops(cfg, tokens_per_seq: int, seqs: int, adapted_per_seq: int, r: int, targets) -> dict:
    """FLOPs of one optimizer step over `seqs` sequences (see the module docstring)."""
    from jalora.adapters.peft import module_dims

    d, layers = cfg.hidden_size, cfg.num_layers
    dense = cfg.num_params() - cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)  # no embedding lookup
    tokens = tokens_per_seq * seqs
    attention_fwd = 2 * 2 * (tokens_per_seq**2 / 2) * layers * cfg.num_heads * cfg.head_dim * seqs
    dims = module_dims(cfg)
    lora_weights = layers * sum(r * (dims[m][0] + dims[m][1]) for m in targets)
    forward = 2 * dense * tokens + attention_fwd
    backward = 2 * dense * tokens + 2 * attention_fwd
    lora = 6 * lora_weights * adapted_per_seq * seqs
    return {"lora_step": forward + backward + lora, "six_n": 6 * cfg.num_params() * tokens + 3 * attention_fwd}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU): checks the script, measures nothing")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 4096; smoke: 64)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (q, k, v)")
    p.add_argument("--response", type=int, default=None, help="adapted tokens at the end of each sequence, "
                   "all in the loss (default: half the sequence)")  # fmt: skip
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True, help="recompute each layer")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--out", default=None, help="result file (default: bench/results/train_throughput.json)")
    args = p.parse_args(argv)

    from flax import nnx

    from jalora.config import EngineConfig
    from jalora.model.checkpoint import load_model
    from jalora.model.config import ModelConfig
    from jalora.model.kernel_plan import KernelPlan
    from jalora.train.batches import make_batch
    from jalora.train.config import TrainConfig
    from jalora.train.data import Example
    from jalora.train.forward import init_lora
    from jalora.train.trainer import _apply_fn, _attention_impl, _grad_step, make_optimizer

    shapes = TINY if args.smoke else GRANITE_8B
    t = args.seq_len or (64 if args.smoke else 4096)
    resp = args.response or t // 2
    targets = ("q_proj", "k_proj", "v_proj")
    model_dir = write_model_dir(os.path.join(tempfile.mkdtemp(), "model"), shapes)
    cfg = ModelConfig.from_dir(model_dir)
    config = TrainConfig(model=model_dir, data="-", output_dir="-", r=args.rank, lora_alpha=2 * args.rank,
                         target_modules=targets, dtype="bfloat16", remat=args.remat, attention=args.attention,
                         batch_size=args.batch, grad_accum=args.grad_accum, invocation_tokens=(1,))  # fmt: skip
    model = load_model(model_dir, cfg, KernelPlan.from_config(EngineConfig(model=model_dir)), jnp.bfloat16, "dummy")
    graphdef, state = nnx.split(model)
    lora = init_lora(cfg, targets, args.rank, jax.random.key(0))
    apply = _apply_fn(config, args.steps + 1)
    opt_state = make_optimizer(config, args.steps + 1)[0].init(lora)
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(2, cfg.vocab_size, size=t).tolist(), t - resp, t - resp, t, 0)
                for _ in range(args.batch)]  # fmt: skip
    batch = jax.device_put(make_batch(examples, list(range(args.batch)), t, args.batch, resp))
    static = dict(graphdef=graphdef, scaling=config.scaling, attention=_attention_impl(config), remat=args.remat)
    step = functools.partial(_grad_step, dropout=0.0, **static)

    def one_step(lora, opt_state):
        grads, count = None, 0.0
        for j in range(args.grad_accum):
            (_, (c, _, _)), g = step(lora, state, batch, jax.random.key(j))
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
            count = count + c
        lora, opt_state, _ = apply(lora, opt_state, grads, count)
        return lora, opt_state

    t0 = time.perf_counter()
    lora, opt_state = jax.block_until_ready(one_step(lora, opt_state))  # compiles
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        lora, opt_state = jax.block_until_ready(one_step(lora, opt_state))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    seqs = args.batch * args.grad_accum
    tokens = t * seqs
    flops = lora_step_flops(cfg, t, seqs, resp, args.rank, targets)
    ceilings = None if args.smoke else measure_ceilings()
    peak = ceilings["bf16_matmul_TFLOPs"] if ceilings else None
    tflops = flops["lora_step"] / step_s / 1e12
    result = {
        **run_metadata(__spec__.name, argv),
        "shapes": "tiny (smoke)" if args.smoke else "Granite-3.2-8B",
        "dtype": "bfloat16", "seq_len": t, "batch": args.batch, "grad_accum": args.grad_accum,
        "adapted_tokens_per_seq": resp, "lora_rank": args.rank, "targets": list(targets), "remat": args.remat,
        "attention": static["attention"], "compile_seconds": compile_s, "step_seconds": step_s,
        "tokens_per_s": tokens / step_s, "step_flops": flops["lora_step"], "TFLOPs": tflops,
        "mfu_vs_measured_matmul": tflops / peak if peak else None, "mfu_vs_790": tflops / REF_MATMUL_TFLOPS,
        "six_n_TFLOPs": flops["six_n"] / step_s / 1e12, "ceilings": ceilings,
        "goal": ">= 40% MFU on the H200",
    }  # fmt: skip
    path = save(result_path(args.out, "train_throughput.json", args.smoke), result)
    mfu = "-" if peak is None else f"{tflops / peak:.0%}"
    print(f"{result['shapes']}: {tokens / step_s:.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {mfu} (vs measured matmul), "
          f"{tflops / REF_MATMUL_TFLOPS:.1%} of 790 TFLOP/s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
