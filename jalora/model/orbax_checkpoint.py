"""Orbax checkpoints of the decoder, laid out for one tensor-parallel size, restored straight onto the mesh.

`export_orbax(model_dir, out_dir, tensor_parallel_size=N)` reads an HF (or GGUF-converted) model once,
lays every parameter out as the sharded step cuts it for N devices (jalora/model/sharding.py: fused
q/k/v and gate/up columns in device order, the vocabulary padded to a multiple of N) and saves the
parameters with orbax-checkpoint beside the model's config and tokenizer files. Loading such a
directory (`load_format="auto"` finds `jalora_orbax.json`, or `"orbax"`) restores each parameter with
its target sharding: every process reads only its own devices' slices from storage, and no parameter is
ever whole on one device or in one host's memory. The layout depends on N, so a checkpoint serves the
tensor-parallel size it was exported for; another size is refused with the size it needs.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from jalora.errors import InvalidRequestError
from jalora.model.config import ModelConfig
from jalora.model.sharding import TensorParallel

MARKER = "jalora_orbax.json"
PARAMS = "params"
FORMAT = 1
# Everything but the weights that a model directory brings (config, tokenizer, chat template).
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.json", "chat_template.jinja")  # fmt: skip


def is_orbax_dir(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER))


def read_marker(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(MARKER, f"cannot read it in {model_dir}: {e}") from e
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise InvalidRequestError(MARKER, f"is not a jalora Orbax checkpoint of format {FORMAT} ({model_dir})")
    return marker


def export_orbax(model_dir: str, out_dir: str, tensor_parallel_size: int = 1, dtype: str = "bfloat16") -> str:
    """Writes `model_dir`'s weights as an Orbax checkpoint laid out for `tensor_parallel_size` devices
    (read and laid out one tensor at a time on this host), with its config and tokenizer files."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from jalora.model.checkpoint import _hf_param, _TensorReader, param_name, resolve_dtype
    from jalora.model.decoder import Decoder
    from jalora.model.gguf import resolve_model_dir
    from jalora.model.kernel_plan import KernelPlan
    from jalora.model.sharding import check_tensor_parallel, check_tensor_parallel_size

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):  # (before the model is read)
        raise InvalidRequestError("output_dir", f"{out_dir} exists; choose a new directory")
    check_tensor_parallel_size(tensor_parallel_size)  # (before a GGUF is converted)
    model_dir = resolve_model_dir(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    check_tensor_parallel(cfg, tensor_parallel_size, tensor_parallel_size)
    layout = TensorParallel(tensor_parallel_size)  # its layouts need no devices
    jdtype = resolve_dtype(dtype)
    plan = KernelPlan("reference", "reference", None, False, None)  # never run: only the module's names
    _, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, plan, jdtype)))
    reader = _TensorReader(model_dir, jdtype)
    params = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = param_name(path)
        params[name] = np.asarray(layout.layout_param(cfg, name, _hf_param(cfg, name, reader)))
    os.makedirs(out_dir)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, PARAMS), params)
    for name in _COPIED:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy2(os.path.join(model_dir, name), out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": FORMAT, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype}, f)
    return out_dir


def restore_params(model_dir: str, cfg: ModelConfig, abstract_state, dtype, tp: TensorParallel):
    """The decoder's state restored from an Orbax checkpoint onto `tp`'s mesh (each parameter read with
    its target sharding). Raises InvalidRequestError naming tensor_parallel_size (or dtype) if the
    checkpoint was laid out for another tensor-parallel size (or saved in another dtype)."""
    import orbax.checkpoint as ocp

    from jalora.model.checkpoint import param_name

    marker = read_marker(model_dir)
    if marker.get("tensor_parallel_size") != tp.size:
        raise InvalidRequestError(
            "tensor_parallel_size", f"the Orbax checkpoint in {model_dir} is laid out for "
            f"{marker.get('tensor_parallel_size')} devices, got {tp.size}",
        )  # fmt: skip
    if np.dtype(marker.get("dtype")) != np.dtype(dtype):
        raise InvalidRequestError("dtype", f"the Orbax checkpoint in {model_dir} holds {marker.get('dtype')}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target, names = {}, []
    for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        name = param_name(path)
        shape = jax.eval_shape(lambda v, n=name: tp.layout_param(cfg, n, v), x).shape
        sharding = tp.sharding(tp.param_spec(name)) if tp.sharded else device
        target[name] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
        names.append(name)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            restored = ckpt.restore(os.path.join(model_dir, PARAMS), target)
        except Exception as e:  # a missing or truncated array: orbax's own error types
            raise InvalidRequestError(PARAMS, f"cannot restore {model_dir}: {e}") from e
    leaves = [restored[n] for n in names]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_state), leaves)
