"""Random aLoRA adapters in PEFT's format, written with numpy and safetensors (no torch, no peft).

Tests and benchmarks need aLoRA adapters for whatever base model they run: random adapters from a
fixed seed run every aLoRA path for real (invocation, activation, prefix reuse) but judge nothing (the
default model's real judges are trained: train_judges.py). Files follow PEFT's layout exactly (a test
loads them with PEFT and compares outputs), so any PEFT tooling reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable Linear of an HF Llama-family config."""
    d, f = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    return {
        "q_proj": (d, heads * head_dim), "k_proj": (d, kv * head_dim), "v_proj": (d, kv * head_dim),
        "o_proj": (heads * head_dim, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }  # fmt: skip


def write_random_alora(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    invocation_tokens: list[int],
    invocation_string: str | None,
    targets: list[str],
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    weight_std: float = 0.02,
) -> Path:
    """A random PEFT aLoRA adapter of the model in `model_dir` (its config.json) at `out_dir`."""
    from safetensors.numpy import save_file

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    shapes = module_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in sorted(targets):
            din, dout = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module in _ATTN else 'mlp'}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, din)) * weight_std).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((dout, rank)) * weight_std).astype(np.float32)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.basename(os.path.normpath(model_dir)),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": False,
        "alora_invocation_tokens": list(invocation_tokens),
    }
    if invocation_string is not None:
        adapter_config["invocation_string"] = invocation_string
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return out
