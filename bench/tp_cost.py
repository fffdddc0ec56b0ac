"""Tensor parallelism on paper: what jalora's sharded step moves between devices, and the step time that
leaves, for the deployments the engine is built for.

    python -m bench.tp_cost                 # writes bench/results/tp_cost.json (no device needed)

The sharded step (jalora/model/sharding.py) communicates three times per token row: the embedding
(an all-reduce of D values), and per layer the attention output and the MLP down projection (two
all-reduces of D values each, in the model's dtype), then one all-gather of the logits (V float32
values). A ring all-reduce of S bytes over n devices sends 2 (n-1)/n S bytes out of each device, an
all-gather (n-1)/n S. Each collective also costs a fixed latency, which at batch 1 (D values of a few
kilobytes) is most of its time.

A step's roofline is then: the bytes each device reads from its memory (its shard of the weights and of
the KV cache) over its memory bandwidth, or for a prefill chunk its FLOPs over its matrix rate,
whichever is longer, plus the communication (a batch-1 decode step or one sequence's prefill chunk:
one row of logits either way). The hardware figures below are the parameters of this
table, not measurements: the H200's memory bandwidth is the one measured on the one-GPU machine
(bench/results/*), its NVLink, TPU v5e's memory and interconnect are the vendors' nominal figures, and
the per-collective latency is an assumption for small messages. Change them with the flags.
"""

from __future__ import annotations

import argparse
import dataclasses

from bench.harness import MODELS, result_path, run_metadata, save
from jalora.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gb: float  # memory per chip
    hbm_tb_s: float  # memory bandwidth, TB/s
    link_gb_s: float  # bandwidth one device sends at in a ring collective, GB/s (each direction)
    latency_us: float  # fixed cost of one small collective
    bf16_tflops: float  # dense matrix rate


H200 = Chip("H200 (NVLink)", 141, 4.3, 450, 8.0, 800)
V5E = Chip("TPU v5e (ICI)", 16, 0.819, 100, 5.0, 197)

# (model, chip, devices): the deployments the sharding issue names.
DEPLOYMENTS = [
    ("granite-8b", V5E, 4),
    ("granite-8b", V5E, 8),
    ("llama-70b", H200, 4),
    ("llama-70b", V5E, 16),
    ("mistral-large", H200, 8),
]


def step_cost(cfg: ModelConfig, chip: Chip, n: int, tokens: int, context: int, act_bytes: int = 2) -> dict:
    """Per-device bytes and times of one step of `tokens` rows at `context` tokens of KV (bf16 weights)."""
    weights = cfg.num_params() * 2 / n
    kv_heads = max(cfg.num_kv_heads // n, 1)  # per device; GQA heads are copied where n > Hkv
    kv_bytes = 2 * cfg.num_layers * kv_heads * cfg.head_dim * 2 * context
    row = cfg.hidden_size * act_bytes  # one token's activation row
    all_reduce = 2 * (n - 1) / n * row * tokens  # bytes each device sends per all-reduce
    per_layer = 2 * all_reduce
    logits = (n - 1) / n * cfg.vocab_size * 4  # one sequence: only its last row's logits
    sent = cfg.num_layers * per_layer + all_reduce + logits
    collectives = 2 * cfg.num_layers + 2
    comm_s = sent / (chip.link_gb_s * 1e9) + collectives * chip.latency_us * 1e-6
    memory_s = (weights + kv_bytes) / (chip.hbm_tb_s * 1e12)
    compute_s = 2 * cfg.num_params() * tokens / n / (chip.bf16_tflops * 1e12)
    step_s = max(memory_s, compute_s) + comm_s
    return {
        "weights_gb_per_device": weights / 1e9,
        "kv_gb_per_device": kv_bytes / 1e9,
        "all_reduce_bytes_per_layer": 2 * row * tokens,  # the two all-reduces' payload
        "sent_mb_per_step": sent / 1e6,
        "collectives_per_step": collectives,
        "comm_ms": comm_s * 1e3,
        "memory_ms": memory_s * 1e3,
        "compute_ms": compute_s * 1e3,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024, help="KV tokens each decode step reads")
    ap.add_argument("--prefill", type=int, default=2048, help="tokens of a prefill chunk")
    ap.add_argument("--h200-latency-us", type=float, default=H200.latency_us)
    ap.add_argument("--v5e-latency-us", type=float, default=V5E.latency_us)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    chips = {
        H200.name: dataclasses.replace(H200, latency_us=args.h200_latency_us),
        V5E.name: dataclasses.replace(V5E, latency_us=args.v5e_latency_us),
    }
    rows = []
    for model, chip, n in DEPLOYMENTS:
        chip = chips[chip.name]
        cfg = ModelConfig.from_dict(MODELS[model])
        fits = cfg.num_params() * 2 / n < chip.hbm_gb * 1e9
        rows.append({
            "model": model, "chip": chip.name, "devices": n, "fits": fits,
            "chip_params": dataclasses.asdict(chip),
            "decode": step_cost(cfg, chip, n, 1, args.context),
            "prefill": step_cost(cfg, chip, n, args.prefill, args.prefill),
        })  # fmt: skip
    result = {**run_metadata("bench.tp_cost", argv), "context": args.context, "prefill_tokens": args.prefill,
              "rows": rows}  # fmt: skip
    path = save(result_path(args.out, "tp_cost.json"), result)
    for r in rows:
        d, p = r["decode"], r["prefill"]
        print(f"{r['model']:>13} on {r['devices']:>2} x {r['chip']:<14} decode {d['step_ms']:6.2f} ms "
              f"(comm {d['comm_ms']:.2f}) {d['tokens_per_s']:6.1f} tok/s; prefill {args.prefill}: "
              f"{p['step_ms']:7.1f} ms (comm {p['comm_ms']:.1f})")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
