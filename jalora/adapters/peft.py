"""Reading PEFT LoRA / aLoRA adapter directories, and the aLoRA activation rule.

An adapter is `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout. `read_peft_adapter`
validates both against the base model (anything jalora does not implement is rejected with an error
naming the file) and computes the adapter's identity: a digest of its config and weights, so that
reloading other weights under the same name gives another identity and the prefix cache can never
serve blocks computed with the old ones.

The activation index of an aLoRA request is the first position of the *last* occurrence of the
adapter's invocation tokens in the prompt (`find_activation`); tokens from there on are adapted.
"""

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
from safetensors import safe_open

from jalora.errors import InvalidRequestError
from jalora.model.config import ModelConfig

# group -> its member modules, in fused order
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # fmt: skip
MODULE_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "lora" | "alora"
    invocation_tokens: list[int] | None
    invocation_string: str | None
    rank: int
    alpha: float
    targets: list[str]
    identity: str  # hex digest of config + weights
    path: str


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    """What a request needs to know of its adapter."""

    slot: int  # device slot, -1 for the base model
    identity: bytes | None  # content digest (keys the request's adapted cache blocks)
    activation_start: int | None  # None: base model; 0: plain LoRA; else the aLoRA activation index


BASE = ResolvedAdapter(-1, None, None)


def module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (d, cfg.q_size), "k_proj": (d, cfg.kv_size), "v_proj": (d, cfg.kv_size),
        "o_proj": (cfg.q_size, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }  # fmt: skip


def _reject(field: str, msg: str):
    raise InvalidRequestError(field, msg)


def read_peft_adapter(path: str, cfg: ModelConfig, max_rank: int) -> tuple[dict, dict, bytes]:
    """Reads and validates a PEFT directory. Returns (config, {(layer, module): (A [r,in], B [out,r])}, identity)."""
    cfg_path = os.path.join(path, "adapter_config.json")
    w_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path):
        _reject("path", f"{cfg_path} does not exist")
    if not os.path.isfile(w_path):
        _reject("path", f"{w_path} does not exist")
    try:
        with open(cfg_path) as f:
            acfg = json.load(f)
    except json.JSONDecodeError as e:
        _reject("adapter_config.json", f"not valid JSON: {e}")
    if acfg.get("peft_type", "LORA") != "LORA":
        _reject("adapter_config.json", f"peft_type {acfg.get('peft_type')!r} is not supported (LORA only)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if acfg.get(key):
            _reject("adapter_config.json", f"{what} adapters are not supported")
    if acfg.get("bias", "none") != "none":
        _reject("adapter_config.json", f"bias={acfg['bias']!r} is not supported (only 'none')")
    if acfg.get("modules_to_save"):
        _reject("adapter_config.json", "modules_to_save is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if acfg.get(key):
            _reject("adapter_config.json", f"{key} is not supported")
    if acfg.get("layers_to_transform") is not None:
        _reject("adapter_config.json", "layers_to_transform is not supported")
    if acfg.get("fan_in_fan_out"):
        _reject("adapter_config.json", "fan_in_fan_out is not supported")
    r = acfg.get("r")
    if not isinstance(r, int) or not 1 <= r <= max_rank:
        _reject("adapter_config.json", f"r={r!r} must be an integer in [1, max_lora_rank={max_rank}]")
    # Names and shapes are checked from the header before any tensor is read, so a file of the wrong
    # tensors is refused without reading its data (and what is read is bounded by the model's shapes).
    try:
        with safe_open(w_path, framework="flax") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        _reject("adapter_model.safetensors", f"cannot be read in {path}: {e}")
    dims = module_dims(cfg)
    for name, shape in shapes.items():
        m = _KEY.match(name)
        if m is None or m.group(2) not in dims:
            _reject("adapter_model.safetensors", f"unsupported tensor {name} (only LoRA A/B of q,k,v,o,gate,up,down)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            _reject("adapter_model.safetensors", f"{name}: layer {layer} >= base model's {cfg.num_layers} layers")
        din, dout = dims[module]
        want = (r, din) if ab == "A" else (dout, r)
        if shape != want:
            _reject("adapter_model.safetensors", f"{name} has shape {shape}, the base model needs {want}")
    try:  # through JAX arrays: numpy alone cannot read bfloat16, a common PEFT dtype
        with safe_open(w_path, framework="flax") as f:
            tensors = {k: np.asarray(f.get_tensor(k)) for k in shapes}
    except Exception as e:
        _reject("adapter_model.safetensors", f"cannot be read in {path}: {e}")
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        pairs.setdefault((layer, module), {})[ab] = t.astype(np.float32)
    if not pairs:
        _reject("adapter_model.safetensors", "holds no LoRA weights")
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            _reject("adapter_model.safetensors", f"layer {layer} {module} lacks lora_A or lora_B")
    h = hashlib.sha256(json.dumps(acfg, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return acfg, {k: (v["A"], v["B"]) for k, v in pairs.items()}, h.digest()


def invocation_of(acfg: dict, tokenize) -> tuple[list[int] | None, str | None]:
    tokens = acfg.get("alora_invocation_tokens")
    string = acfg.get("invocation_string")
    if tokens:
        if not all(isinstance(t, int) for t in tokens):
            _reject("adapter_config.json", "alora_invocation_tokens must be a list of token ids")
        return list(tokens), string
    if string:  # legacy aLoRA configs carry the string only
        try:
            return tokenize(string, add_special_tokens=False), string
        except InvalidRequestError as e:
            _reject("adapter_config.json", f"invocation_string needs the base model's tokenizer: {e}")
    return None, None


def find_activation(ids: list[int], invocation: list[int]) -> int | None:
    """Start of the last occurrence of `invocation` in `ids`, or None."""
    n = len(invocation)
    for start in range(len(ids) - n, -1, -1):
        if ids[start : start + n] == invocation:
            return start
    return None


