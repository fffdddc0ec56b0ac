"""PEFT LoRA / aLoRA adapters resident in device slots.

Each adapted projection group of the fused decoder (qkv, o, gate_up, down) has one stack per layer,
`A [L, max_loras, Din, R_group]` and `B [L, max_loras, R_group, Dout]`, with the PEFT scaling folded
into B and ranks zero-padded to `max_lora_rank`. Fused groups concatenate their members' A matrices
along the rank axis and place their B matrices block-diagonally, so one shrink and one expand serve
q, k and v (or gate and up) at once.

An adapter's identity is a digest of its config and weights: reloading other weights under the same
name gives another identity, so the prefix cache can never serve blocks computed with old weights.
"""

import dataclasses
import hashlib
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jalora.errors import (
    AdapterInUseError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
    InvocationNotFoundError,
)
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


def _module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (d, cfg.q_size), "k_proj": (d, cfg.kv_size), "v_proj": (d, cfg.kv_size),
        "o_proj": (cfg.q_size, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }  # fmt: skip


def _reject(field: str, msg: str):
    raise InvalidRequestError(field, msg)


def read_peft_adapter(path: str, cfg: ModelConfig, max_rank: int, encode) -> tuple[dict, dict, bytes]:
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
    try:  # through JAX arrays: numpy alone cannot read bfloat16, a common PEFT dtype
        with safe_open(w_path, framework="flax") as f:
            tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:
        _reject("adapter_model.safetensors", f"cannot read {w_path}: {e}")
    dims = _module_dims(cfg)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        if m is None or m.group(2) not in dims:
            _reject("adapter_model.safetensors", f"unsupported tensor {name} (only LoRA A/B of q,k,v,o,gate,up,down)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            _reject("adapter_model.safetensors", f"{name}: layer {layer} >= base model's {cfg.num_layers} layers")
        din, dout = dims[module]
        want = (r, din) if ab == "A" else (dout, r)
        if tuple(t.shape) != want:
            _reject("adapter_model.safetensors", f"{name} has shape {tuple(t.shape)}, the base model needs {want}")
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


def invocation_of(acfg: dict, encode) -> tuple[list[int] | None, str | None]:
    tokens = acfg.get("alora_invocation_tokens")
    string = acfg.get("invocation_string")
    if tokens:
        if not all(isinstance(t, int) for t in tokens):
            _reject("adapter_config.json", "alora_invocation_tokens must be a list of token ids")
        return list(tokens), string
    if string:  # legacy aLoRA configs carry the string only
        try:
            return encode(string, add_special_tokens=False), string
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


class AdapterManager:
    def __init__(self, cfg: ModelConfig, runner, max_loras: int, max_rank: int, dtype, encode):
        self.cfg = cfg
        self.runner = runner
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.encode = encode
        self.by_name: dict[str, tuple[int, AdapterInfo, bytes]] = {}
        self.in_flight: dict[str, int] = {}
        self._set_slot = jax.jit(lambda stack, slot, value: stack.at[:, slot].set(value), donate_argnums=(0,))
        # A_flat [L, Din, n*R]: slot s owns columns s*R..(s+1)*R (the one-hot path's layout).
        self._set_cols = jax.jit(
            lambda stack, slot, value: jax.lax.dynamic_update_slice(stack, value, (0, 0, slot * value.shape[2])),
            donate_argnums=(0,),
        )

    def infos(self) -> list[AdapterInfo]:
        return [info for _, info, _ in self.by_name.values()]

    def _free_slot(self) -> int:
        used = {slot for slot, _, _ in self.by_name.values()}
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        raise CapacityError(f"all {self.max_loras} adapter slots are in use (max_loras); unload one first")

    def _ensure_group(self, group: str) -> None:
        if group in self.runner.lora_weights:
            return
        dims = _module_dims(self.cfg)
        members = GROUPS[group]
        din = dims[members[0]][0]
        dout = sum(dims[m][1] for m in members)
        r = self.max_rank * len(members)
        shape = (self.cfg.num_layers, self.max_loras)
        # The flat copy of A serves only the one-hot path; where every step takes the kernels (TPU:
        # segments_above == 0) it would be dead weight, one more A stack of HBM.
        above = self.runner.segments_above
        onehot = above is None or above >= self.runner.buckets[0]
        self.runner.lora_weights[group] = (
            jnp.zeros((*shape, din, r), self.dtype),
            jnp.zeros((*shape, r, dout), self.dtype),
            jnp.zeros((self.cfg.num_layers, din, self.max_loras * r), self.dtype) if onehot else None,
        )

    def load(self, name: str, path: str) -> AdapterInfo:
        if not isinstance(name, str) or not name:
            _reject("name", "must be a non-empty string")
        if name in self.by_name:
            _reject("name", f"adapter {name!r} is already loaded; unload it first")
        acfg, pairs, identity = read_peft_adapter(path, self.cfg, self.max_rank, self.encode)
        invocation, inv_string = invocation_of(acfg, self.encode)
        slot = self._free_slot()
        r, alpha = acfg["r"], float(acfg.get("lora_alpha", acfg["r"]))
        scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        targets = sorted({m for _, m in pairs}, key=list(MODULE_GROUP).index)
        for group in {MODULE_GROUP[m] for m in targets}:
            self._ensure_group(group)
        dims = _module_dims(self.cfg)
        for group, (a_stack, b_stack, a_flat) in list(self.runner.lora_weights.items()):
            a = np.zeros((self.cfg.num_layers, *a_stack.shape[2:]), np.float32)
            b = np.zeros((self.cfg.num_layers, *b_stack.shape[2:]), np.float32)
            out = 0
            for k, module in enumerate(GROUPS[group]):
                width = dims[module][1]
                for layer in range(self.cfg.num_layers):
                    if (layer, module) in pairs:
                        la, lb = pairs[(layer, module)]
                        a[layer, :, k * self.max_rank : k * self.max_rank + r] = la.T
                        b[layer, k * self.max_rank : k * self.max_rank + r, out : out + width] = lb.T * scaling
                out += width
            a = jnp.asarray(a, self.dtype)
            self.runner.lora_weights[group] = (
                self._set_slot(a_stack, slot, a),
                self._set_slot(b_stack, slot, jnp.asarray(b, self.dtype)),
                None if a_flat is None else self._set_cols(a_flat, slot, a),
            )
        info = AdapterInfo(
            name=name,
            kind="alora" if invocation else "lora",
            invocation_tokens=invocation,
            invocation_string=inv_string,
            rank=r,
            alpha=alpha,
            targets=targets,
            identity=identity.hex(),
            path=os.path.abspath(path),
        )
        self.by_name[name] = (slot, info, identity)
        return info

    def unload(self, name: str) -> None:
        if name not in self.by_name:
            raise AdapterNotFoundError(name)
        if self.in_flight.get(name):
            raise AdapterInUseError(name, self.in_flight[name])
        del self.by_name[name]

    def resolve(self, name: str | None, ids: list[int]) -> tuple[int, bytes | None, int | None]:
        """(slot, identity, activation index) of a request; raises if the adapter cannot serve it."""
        if name is None:
            return -1, None, None
        if name not in self.by_name:
            raise AdapterNotFoundError(name)
        slot, info, identity = self.by_name[name]
        if info.kind == "lora":
            return slot, identity, 0
        start = find_activation(ids, info.invocation_tokens)
        if start is None:
            raise InvocationNotFoundError(name, info.invocation_tokens)
        return slot, identity, start

    def acquire(self, name: str | None) -> None:
        if name is not None:
            self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def release(self, name: str | None) -> None:
        if name is not None:
            self.in_flight[name] -= 1
