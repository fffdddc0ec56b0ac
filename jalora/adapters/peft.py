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
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from safetensors import safe_open

from jalora.config import is_int
from jalora.errors import AdapterPathError, InvalidRequestError, quoted
from jalora.model.config import ModelConfig

# group -> its member modules, in fused order
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}  # fmt: skip
MODULE_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}
# safetensors' names of the floating-point types a LoRA weight may have
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_CONFIG_BYTES = 1024 * 1024  # adapter_config.json is about 1 KB; a larger one is refused unparsed
# (PEFT's files name no adapter, `lora_A.weight`; a state dict saved as is names its default one,
# `lora_A.default.weight`, and PEFT loads both; it leaves another adapter's name unloaded)
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)
# PEFT LoraConfig's lora_alpha where adapter_config.json leaves it out
DEFAULT_LORA_ALPHA = 8
# init_lora_weights whose saved adapter is a difference to a base that PEFT changes at load (PiSSA, OLoRA, CorDA,
# LoftQ, ASTRA, LoRA-GA): served on the original base weights, such an adapter would compute something else
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "astra", "lora_ga")


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


def _reject_config(msg: str):
    _reject("adapter_config.json", msg)


def _reject_weights(msg: str):
    _reject("adapter_model.safetensors", msg)


def _adapter_file(directory: str, name: str, roots: Sequence[str] | None) -> str:
    """The real path of file `name` of an adapter directory; with `roots`, it must resolve inside one of
    them (links followed), checked before the file is opened or even looked at."""
    real = os.path.realpath(os.path.join(directory, name))
    if roots is not None and not any(os.path.commonpath([real, root]) == root for root in map(os.path.realpath, roots)):
        raise AdapterPathError(f"{name} of the adapter directory links outside the adapter roots")
    if not os.path.isfile(real):
        _reject("path", f"{name} does not exist in the adapter directory {quoted(directory)}")
    return real


def _read_config(path: str) -> tuple[dict, bytes]:
    """adapter_config.json as a dict and as canonical JSON (for the identity); whatever the file holds,
    a bad one is one InvalidRequestError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        _reject_config(f"cannot be read ({e.strerror})")
    if len(data) > MAX_CONFIG_BYTES:
        _reject_config(f"is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        acfg = json.loads(data.decode("utf-8"))
        canonical = json.dumps(acfg, sort_keys=True).encode()
    except UnicodeDecodeError:
        _reject_config("is not UTF-8 text")
    except RecursionError:
        _reject_config("nests too deeply to be an adapter config")
    except json.JSONDecodeError as e:  # its message says where, never what
        _reject_config(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not isinstance(acfg, dict):
        _reject_config("must hold a JSON object (PEFT's LoraConfig)")
    return acfg, canonical


def _is_finite_number(value) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _check_config(acfg: dict, max_rank: int) -> None:
    if acfg.get("peft_type", "LORA") != "LORA":
        _reject_config(f"peft_type {quoted(acfg.get('peft_type'))} is not supported (LORA only)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if acfg.get(key):
            _reject_config(f"{what} adapters are not supported")
    if acfg.get("bias", "none") != "none":
        _reject_config(f"bias={quoted(acfg['bias'])} is not supported (only 'none')")
    if acfg.get("modules_to_save"):
        _reject_config("modules_to_save is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if acfg.get(key):
            _reject_config(f"{key} is not supported")
    if acfg.get("fan_in_fan_out"):
        _reject_config("fan_in_fan_out is not supported")
    r = acfg.get("r")
    if not is_int(r) or not 1 <= r <= max_rank:
        _reject_config(f"r={quoted(r)} must be an integer in [1, max_lora_rank={max_rank}]")
    init = acfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        _reject_config(f"init_lora_weights={quoted(init)} is not supported: such an adapter needs the base weights "
                       "PEFT derives from it at load, not the model's own")  # fmt: skip
    alpha = acfg.get("lora_alpha", DEFAULT_LORA_ALPHA)
    if not _is_finite_number(alpha):
        _reject_config(f"lora_alpha={quoted(alpha)} must be a finite number")
    if not isinstance(acfg.get("use_rslora", False), bool | None):
        _reject_config(f"use_rslora={quoted(acfg['use_rslora'])} must be true or false")


def _check_weights_header(header: dict[str, tuple[str, tuple[int, ...]]], cfg: ModelConfig, r: int) -> None:
    """Names, dtypes and shapes of the tensors ({name: (safetensors dtype, shape)}), before any is read."""
    dims = module_dims(cfg)
    for name, (dtype, shape) in header.items():
        m = _KEY.match(name)
        if m is None or m.group(2) not in dims:
            _reject_weights(f"unsupported tensor {quoted(name)} (only LoRA A/B of q,k,v,o,gate,up,down)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            _reject_weights(f"{quoted(name)}: layer {layer} >= base model's {cfg.num_layers} layers")
        if dtype not in WEIGHT_DTYPES:
            _reject_weights(f"{quoted(name)} is {dtype}; LoRA weights are floating point {WEIGHT_DTYPES}")
        din, dout = dims[module]
        want = (r, din) if ab == "A" else (dout, r)
        if shape != want:
            _reject_weights(f"{quoted(name)} has shape {quoted(shape)}, the base model needs {want}")


def _check_layers(acfg: dict, header: dict, num_layers: int) -> None:
    """PEFT's `layers_to_transform` (one layer index or a list of them): the adapter adapts only those layers,
    so its file holds weights of no other (the other layers run the base weights, as their zero rows do)."""
    layers = acfg.get("layers_to_transform")
    if layers is None:
        return
    listed = [layers] if is_int(layers) else layers
    if not (isinstance(listed, list) and listed and all(is_int(i) and 0 <= i < num_layers for i in listed)):
        _reject_config(f"layers_to_transform={quoted(layers)} must be a layer index or a list of them, in "
                       f"[0, {num_layers})")  # fmt: skip
    pattern = acfg.get("layers_pattern")  # (PEFT tries each of a list; one must name the decoder's layers)
    patterns = [pattern] if isinstance(pattern, str) else pattern
    named = isinstance(patterns, list) and {"layers", "model.layers"} & set(map(str, patterns))
    if pattern is not None and not named:
        _reject_config(f"layers_pattern={quoted(pattern)} is not supported: the decoder's layers are "
                       "'model.layers'")  # fmt: skip
    for name in header:
        layer = int(_KEY.match(name).group(1))
        if layer not in listed:
            _reject_weights(f"{quoted(name)} adapts layer {layer}, which layers_to_transform={quoted(layers)} "
                            "leaves out")  # fmt: skip


def read_peft_adapter(
    path: str, cfg: ModelConfig, max_rank: int, roots: Sequence[str] | None = None
) -> tuple[dict, dict, bytes]:
    """Reads and validates a PEFT directory. Returns (config, {(layer, module): (A [r,in], B [out,r])}, identity).

    With `roots`, each file read must resolve inside one of those directories (links followed)."""
    cfg_path = _adapter_file(path, "adapter_config.json", roots)
    w_path = _adapter_file(path, "adapter_model.safetensors", roots)
    acfg, canonical = _read_config(cfg_path)
    _check_config(acfg, max_rank)
    r = acfg["r"]
    try:  # through JAX arrays: numpy alone cannot read bfloat16, a common PEFT dtype
        with safe_open(w_path, framework="flax") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            _check_weights_header(header, cfg, r)
            _check_layers(acfg, header, cfg.num_layers)
            with np.errstate(over="ignore"):  # F64 values beyond float32 turn infinite: refused below
                tensors = {k: np.asarray(f.get_tensor(k)) for k in header}
    except InvalidRequestError:
        raise
    except Exception as e:
        _reject_weights(f"cannot be read as safetensors ({quoted(str(e))})")
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        weights = t.astype(np.float32)
        if not np.isfinite(weights).all():
            _reject_weights(f"{quoted(name)} holds NaN or infinite values (in float32)")
        pair = pairs.setdefault((int(m.group(1)), m.group(2)), {})
        if m.group(3) in pair:  # the same weight with and without `.default`
            _reject_weights(f"{quoted(name)} repeats a weight the file already holds")
        pair[m.group(3)] = weights
    if not pairs:
        _reject_weights("holds no LoRA weights")
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            _reject_weights(f"layer {layer} {module} lacks lora_A or lora_B")
    h = hashlib.sha256(canonical)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return acfg, {k: (v["A"], v["B"]) for k, v in pairs.items()}, h.digest()


def invocation_of(acfg: dict, tokenize, vocab_size: int, max_model_len: int) -> tuple[list[int] | None, str | None]:
    """(invocation tokens, invocation string) of an adapter config; (None, None) for a plain LoRA.

    The tokens must be ids of the base vocabulary, and a prompt must be able to hold them (fewer than
    max_model_len). An empty or null `alora_invocation_tokens` falls back to `invocation_string`."""
    tokens = acfg.get("alora_invocation_tokens")
    string = acfg.get("invocation_string")
    if tokens is not None and not (isinstance(tokens, list) and all(is_int(t) for t in tokens)):
        _reject_config(f"alora_invocation_tokens={quoted(tokens)} must be a list of token ids")
    if string is not None and not isinstance(string, str):
        _reject_config(f"invocation_string={quoted(string)} must be a string")
    if tokens:
        what = "alora_invocation_tokens"
    elif string:  # legacy aLoRA configs carry the string only
        what = "invocation_string's tokens"
        try:
            tokens = tokenize(string, add_special_tokens=False)
        except InvalidRequestError as e:
            _reject_config(f"invocation_string needs the base model's tokenizer: {e}")
        if not tokens:
            _reject_config(f"invocation_string {quoted(string)} has no tokens")
    else:
        return None, None
    if not all(0 <= t < vocab_size for t in tokens):
        _reject_config(f"{what} must be token ids in [0, {vocab_size}) (the base vocabulary)")
    if len(tokens) >= max_model_len:
        _reject_config(f"{what} are {len(tokens)} tokens; a prompt holds fewer than max_model_len={max_model_len}")
    return list(tokens), string


def find_activation(ids: list[int], invocation: list[int]) -> int | None:
    """Start of the last occurrence of `invocation` in `ids`, or None."""
    n = len(invocation)
    for start in range(len(ids) - n, -1, -1):
        if ids[start : start + n] == invocation:
            return start
    return None
