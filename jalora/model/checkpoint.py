"""Model weights: HF safetensors (single file or sharded index) or deterministic dummy weights.

HF stores Linear weights as [out, in]; the decoder keeps [in, out] and fuses q/k/v and gate/up, so
loading is a small name map plus transposes and concatenations, done on the device.
"""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from jalora.errors import InvalidRequestError
from jalora.model.config import ModelConfig
from jalora.model.decoder import Decoder
from jalora.model.kernel_plan import KernelPlan
from jalora.model.orbax_checkpoint import is_orbax_dir, restore_params
from jalora.model.sharding import TensorParallel


def resolve_dtype(dtype):
    """The JAX dtype of an EngineConfig.dtype name (validated there) or of a dtype."""
    return jnp.dtype(dtype)


def param_name(path) -> str:
    """A decoder parameter's name ('layers.3.w_qkv') from its path in the module's state."""
    return jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")


def _safetensors_files(model_dir: str) -> dict[str, str]:
    """HF tensor name -> file that holds it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidRequestError("model.safetensors.index.json", f"malformed index: {e!r}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidRequestError("model.safetensors.index.json", "weight_map must map tensor names to file names")
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="flax") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InvalidRequestError("model.safetensors", f"cannot read it in {model_dir}: {e}") from e
    raise InvalidRequestError("model", f"no model.safetensors or model.safetensors.index.json in {model_dir}")


class _TensorReader:
    def __init__(self, model_dir: str, dtype):
        self.files = _safetensors_files(model_dir)
        self.dtype = dtype
        self._open = {}

    def get(self, name: str, shape: tuple[int, ...]):
        if name not in self.files:
            raise InvalidRequestError("model.safetensors", f"missing tensor {name}")
        path = self.files[name]
        try:
            if path not in self._open:
                self._open[path] = safe_open(path, framework="flax")
            t = self._open[path].get_tensor(name)
        except InvalidRequestError:
            raise
        except Exception as e:
            raise InvalidRequestError("model.safetensors", f"cannot read {name} from {path}: {e}") from e
        if tuple(t.shape) != tuple(shape):
            raise InvalidRequestError(
                "model.safetensors", f"{name} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}"
            )
        return t.astype(self.dtype)


def _hf_param(cfg: ModelConfig, name: str, reader: _TensorReader):
    """Builds our parameter `name` (e.g. 'layers.3.w_qkv') from HF tensors."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    if name == "embed":
        return reader.get("model.embed_tokens.weight", (cfg.vocab_size, d))
    if name == "norm":
        return reader.get("model.norm.weight", (d,))
    if name == "lm_head":
        return reader.get("lm_head.weight", (cfg.vocab_size, d)).T
    _, i, leaf = name.split(".")
    p = f"model.layers.{i}."
    qkv_shapes = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
    if leaf == "input_norm":
        return reader.get(p + "input_layernorm.weight", (d,))
    if leaf == "post_norm":
        return reader.get(p + "post_attention_layernorm.weight", (d,))
    if leaf == "w_qkv":
        parts = [reader.get(f"{p}self_attn.{n}_proj.weight", (o, d)).T for n, o in qkv_shapes.items()]
        return jnp.concatenate(parts, 1)
    if leaf == "b_qkv":
        return jnp.concatenate([reader.get(f"{p}self_attn.{n}_proj.bias", (o,)) for n, o in qkv_shapes.items()])
    if leaf == "w_o":
        return reader.get(p + "self_attn.o_proj.weight", (d, cfg.q_size)).T
    if leaf == "b_o":
        return reader.get(p + "self_attn.o_proj.bias", (d,))
    if leaf == "w_gate_up":
        return jnp.concatenate([reader.get(f"{p}mlp.{n}_proj.weight", (f, d)).T for n in ("gate", "up")], 1)
    if leaf == "b_gate_up":
        return jnp.concatenate([reader.get(f"{p}mlp.{n}_proj.bias", (f,)) for n in ("gate", "up")])
    if leaf == "w_down":
        return reader.get(p + "mlp.down_proj.weight", (d, f)).T
    if leaf == "b_down":
        return reader.get(p + "mlp.down_proj.bias", (d,))
    raise AssertionError(f"no HF mapping for {name}")


def _dummy_param(key_data, shape, dtype, is_norm: bool):
    if is_norm:
        return jnp.ones(shape, dtype)
    key = jax.random.fold_in(jax.random.key(0), key_data)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def load_model(
    model_dir: str, cfg: ModelConfig, plan: KernelPlan, dtype, load_format: str, tp: TensorParallel | None = None
) -> Decoder:
    """Decoder with weights from `model_dir` ("auto"/"safetensors") or deterministic random ("dummy").

    Tensor by tensor: each is read (or made) whole on one device, laid out for `tp` and put on the mesh,
    each device receiving its own shard, before the next is read; the module's shapes stay the logical
    ones (the step's per-device module is `TensorParallel.local_config`)."""
    tp = TensorParallel() if tp is None else tp
    dtype = resolve_dtype(dtype)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, plan, dtype))
    graphdef, abs_state = nnx.split(abstract)
    if load_format == "dummy":
        # Made on the device, one compilation per distinct shape; the name seeds each tensor.
        make = jax.jit(_dummy_param, static_argnums=(1, 2, 3))

        def dummy(path, x):
            name = param_name(path)
            value = make(np.uint32(zlib.crc32(name.encode())), tuple(x.shape), x.dtype, name.endswith("norm"))
            return tp.place_param(cfg, name, value)

        state = jax.tree_util.tree_map_with_path(dummy, abs_state)
    elif load_format == "orbax" or (load_format == "auto" and is_orbax_dir(model_dir)):
        state = restore_params(model_dir, cfg, abs_state, dtype, tp)  # straight onto the mesh
    else:  # "auto" / "safetensors" (EngineConfig validated the name)
        reader = _TensorReader(model_dir, dtype)
        state = jax.tree_util.tree_map_with_path(
            lambda p, x: tp.place_param(cfg, param_name(p), _hf_param(cfg, param_name(p), reader)), abs_state
        )
    return nnx.merge(graphdef, state)
