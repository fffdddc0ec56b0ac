"""Trained LoRA weights -> a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

The keys and shapes are PEFT's (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`,
A `[r, in]`, B `[out, r]`), the config PEFT's `LoraConfig` with `task_type` CAUSAL_LM and, for an aLoRA,
`alora_invocation_tokens`: PEFT, jalora and other PEFT-reading servers load the directory as it is.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jalora.adapters.peft import MODULE_GROUP
from jalora.train.config import TrainConfig

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_key(layer: int, module: str, ab: str) -> str:
    part = "self_attn" if module in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{ab}.weight"


def peft_tensors(lora: dict, save_dtype: str) -> dict[str, np.ndarray]:
    """{PEFT key: array} of stacked LoRA weights ({module: {"A": [L, r, in], "B": [L, out, r]}})."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if save_dtype == "bfloat16" else np.float32
    out = {}
    for module, ab in lora.items():
        for name in ("A", "B"):
            stacked = np.asarray(ab[name], np.float32)
            for layer in range(stacked.shape[0]):
                out[peft_key(layer, module, name)] = np.ascontiguousarray(stacked[layer]).astype(dtype)
    return out


def read_lora(path: str, cfg, r: int, targets) -> dict:
    """Stacked LoRA weights ({module: {"A": [L, r, in], "B": [L, out, r]}}, float32) of the PEFT adapter at
    `path`, read and validated as the engine reads adapters; it must have rank `r` and adapt `targets` in
    every layer."""
    from jalora.adapters.peft import module_dims, read_peft_adapter
    from jalora.api.limits import MAX_INT32
    from jalora.errors import InvalidRequestError

    try:
        acfg, pairs, _ = read_peft_adapter(path, cfg, max_rank=MAX_INT32)  # (its rank is checked below)
    except InvalidRequestError as e:  # (the engine's errors name its own fields: this run's is init_adapter)
        raise InvalidRequestError("init_adapter", f"{path}: {e.message}") from None
    if acfg["r"] != r:
        raise InvalidRequestError("init_adapter", f"{path} has r={acfg['r']}, the run trains r={r}")
    want = {(layer, m) for layer in range(cfg.num_layers) for m in targets}
    if set(pairs) != want:
        raise InvalidRequestError("init_adapter", f"{path} does not adapt exactly {sorted(targets)} in every layer")
    dims = module_dims(cfg)
    out = {}
    for m in sorted(targets, key=list(MODULE_GROUP).index):
        a = np.stack([pairs[(layer, m)][0] for layer in range(cfg.num_layers)])
        b = np.stack([pairs[(layer, m)][1] for layer in range(cfg.num_layers)])
        assert a.shape[1:] == (r, dims[m][0]) and b.shape[1:] == (dims[m][1], r)
        out[m] = {"A": np.asarray(a, np.float32), "B": np.asarray(b, np.float32)}
    return out


def adapter_config(config: TrainConfig, invocation: list[int] | None, base_model: str) -> dict:
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules, key=list(MODULE_GROUP).index),
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "alora_invocation_tokens": invocation,
    }
    if config.invocation:
        cfg["invocation_string"] = config.invocation
    return cfg


def write_peft_adapter(out_dir: str, lora: dict, config: TrainConfig, invocation: list[int] | None,
                       base_model: str) -> str:  # fmt: skip
    """Writes the adapter into `out_dir` (created if needed); returns it."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(peft_tensors(lora, config.save_dtype), os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(config, invocation, base_model), f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir
