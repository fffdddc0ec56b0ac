"""Tensor parallelism: the model spread over `tp` devices along one mesh axis, Megatron-style.

Every device holds a slice of each projection and runs the same step on it; two all-reduces per layer
(after the attention output and the MLP down projection) and one all-gather of the logits are all the
communication a step needs:

- q/k/v and gate/up are column-parallel: device i computes its heads (its query heads and the KV heads
  they read) and its slice of the MLP's intermediate features. The decoder fuses q/k/v (and gate/up)
  into one matmul, so the fused weight's columns are reordered to put each device's q, k and v columns
  (gate and up columns) next to each other: sharding the reordered matrix by columns hands each device
  exactly its own. Where tp exceeds the KV heads (GQA), each KV head is copied to the tp / Hkv devices
  whose query heads read it, as vLLM does; those columns appear once per device in the reordered matrix.
- o and down are row-parallel: device i multiplies its heads' (features') rows, and the partial sums
  are all-reduced; biases are added once, after the reduction.
- The embedding and the output projection are vocabulary-parallel (rows padded with zeros to a
  multiple of tp): a token's embedding comes from the device that holds its row (all-reduced), and the
  logits are gathered whole, so sampling sees the full vocabulary.
- The KV cache is sharded over KV heads (each device stores the heads it computes).
- LoRA stacks follow their projection: for a column-parallel group A (the shrink, [Din, R]) is
  replicated, which costs each device Din x R multiply-adds per token instead of a gather of the rank-R
  product, and B's columns take the base weight's order and sharding; for a row-parallel group A is
  sharded by rows with the input and B replicated, so each device adds its partial delta before the
  all-reduce the base projection needs anyway ((sum_i x_i A_i) B = sum_i x_i A_i B): no extra
  communication.

`TensorParallel(1)` changes nothing: no mesh, no reordering, the single-device step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jalora.config import is_int
from jalora.errors import InvalidRequestError
from jalora.model.config import ModelConfig

AXIS = "tp"
FIELD = "tensor_parallel_size"

# How each decoder parameter is split (by its leaf name); norms and the row-parallel biases replicate.
_PARAM_SPECS = {
    "embed": P(AXIS, None),
    "lm_head": P(None, AXIS),
    "w_qkv": P(None, AXIS),
    "b_qkv": P(AXIS),
    "w_o": P(AXIS, None),
    "w_gate_up": P(None, AXIS),
    "b_gate_up": P(AXIS),
    "w_down": P(AXIS, None),
}
COLUMN_GROUPS = ("qkv", "gate_up")  # LoRA groups of column-parallel projections; "o" and "down" are rows
KV_SPEC = P(None, None, AXIS, None)  # [num_blocks, block_size, kv heads, head_dim]


def check_tensor_parallel_size(tp: int) -> None:
    """Raises InvalidRequestError naming tensor_parallel_size unless `tp` is a size at all (what needs no model)."""
    if not (is_int(tp) and tp >= 1):
        raise InvalidRequestError(FIELD, f"must be an integer >= 1, got {tp!r}")


def check_tensor_parallel(cfg: ModelConfig, tp: int, num_devices: int) -> None:
    """Raises InvalidRequestError naming tensor_parallel_size unless the model splits over `tp` devices."""
    check_tensor_parallel_size(tp)
    if tp > num_devices:
        raise InvalidRequestError(FIELD, f"is {tp} but this process sees {num_devices} device(s)")
    h, hkv, f = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    if h % tp:
        raise InvalidRequestError(FIELD, f"{tp} does not divide the model's {h} attention heads")
    if hkv % tp and tp % hkv:
        raise InvalidRequestError(
            FIELD, f"{tp} must divide the model's {hkv} KV heads or be a multiple of them (GQA replicates them)"
        )
    if f % tp:
        raise InvalidRequestError(FIELD, f"{tp} does not divide the model's intermediate size {f}")


@dataclasses.dataclass(frozen=True, eq=False)
class TensorParallel:
    """The devices one engine runs on and how the model is laid out over them."""

    size: int = 1
    mesh: Mesh | None = None  # None for size 1

    @classmethod
    def create(cls, cfg: ModelConfig, size: int, devices=None) -> TensorParallel:
        """Checks `size` against the model and the devices (jax.devices() by default); size 1 needs none."""
        devices = jax.devices() if devices is None else list(devices)
        check_tensor_parallel(cfg, size, len(devices))
        if size == 1:
            return cls()
        return cls(size, Mesh(np.array(devices[:size]), (AXIS,)))

    @property
    def sharded(self) -> bool:
        return self.size > 1

    # -- shapes per device -------------------------------------------------------------------------

    def kv_heads(self, cfg: ModelConfig) -> int:
        """KV heads each device stores and computes."""
        return max(cfg.num_kv_heads // self.size, 1)

    def padded_vocab(self, cfg: ModelConfig) -> int:
        return -(-cfg.vocab_size // self.size) * self.size

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model as one device sees it inside the sharded step."""
        if not self.sharded:
            return cfg
        return dataclasses.replace(
            cfg,
            num_heads=cfg.num_heads // self.size,
            num_kv_heads=self.kv_heads(cfg),
            intermediate_size=cfg.intermediate_size // self.size,
            vocab_size=self.padded_vocab(cfg) // self.size,
        )

    # -- layouts -----------------------------------------------------------------------------------

    def qkv_columns(self, cfg: ModelConfig) -> np.ndarray:
        """Indices into the fused [q | k | v] columns, in device order (KV heads repeated where shared)."""
        d, qs, kvs = cfg.head_dim, cfg.q_size // self.size, cfg.kv_size
        kv_heads, share = self.kv_heads(cfg), max(self.size // cfg.num_kv_heads, 1)
        cols = []
        for i in range(self.size):
            first_kv = (i // share) * kv_heads  # share > 1: tp / Hkv devices read the same head
            kv = np.arange(first_kv * d, (first_kv + kv_heads) * d)
            cols += [np.arange(i * qs, (i + 1) * qs), cfg.q_size + kv, cfg.q_size + kvs + kv]
        return np.concatenate(cols)

    def gate_up_columns(self, cfg: ModelConfig) -> np.ndarray:
        """Indices into the fused [gate | up] columns, in device order."""
        f, fl = cfg.intermediate_size, cfg.intermediate_size // self.size
        own = [np.arange(i * fl, (i + 1) * fl) for i in range(self.size)]
        return np.concatenate([c for cols in own for c in (cols, f + cols)])

    def columns(self, cfg: ModelConfig, group: str) -> np.ndarray | None:
        """The column order of a fused column-parallel group ("qkv", "gate_up"); None otherwise or unsharded."""
        if not self.sharded or group not in COLUMN_GROUPS:
            return None
        return self.qkv_columns(cfg) if group == "qkv" else self.gate_up_columns(cfg)

    def layout_param(self, cfg: ModelConfig, name: str, x):
        """A parameter in the decoder's logical layout -> the layout its shards are cut from."""
        if not self.sharded:
            return x
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("w_qkv", "b_qkv", "w_gate_up", "b_gate_up"):
            return jnp.take(x, self.columns(cfg, "qkv" if "qkv" in leaf else "gate_up"), axis=-1)
        pad = self.padded_vocab(cfg) - cfg.vocab_size
        if leaf == "embed" and pad:
            return jnp.pad(x, ((0, pad), (0, 0)))
        if leaf == "lm_head" and pad:
            return jnp.pad(x, ((0, 0), (0, pad)))
        return x

    # -- placement ---------------------------------------------------------------------------------

    def sharding(self, spec: P) -> NamedSharding | None:
        return None if not self.sharded else NamedSharding(self.mesh, spec)

    def param_spec(self, name: str) -> P:
        return _PARAM_SPECS.get(name.rsplit(".", 1)[-1], P())

    def place_param(self, cfg: ModelConfig, name: str, x):
        """One parameter laid out and put on the mesh (each device receives its shard only)."""
        if not self.sharded:
            return x
        return self.put(self.layout_param(cfg, name, x), self.param_spec(name))

    def put(self, x, spec: P) -> jax.Array:
        """`x` (the whole array, the same in every process) sharded by `spec` over the mesh. Over several
        processes each one cuts its own devices' shards from its copy: no collective (device_put would
        compare the copies with one), so a process may do it on any thread, at any time."""
        sharding = self.sharding(spec)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def stack_specs(self, group: str, has_flat: bool):
        """PartitionSpecs of a LoraStack's (a, b, a_flat) for projection group `group`."""
        if group in COLUMN_GROUPS:
            return P(), P(None, None, None, AXIS), (P() if has_flat else None)
        return P(None, None, AXIS, None), P(), (P(None, AXIS, None) if has_flat else None)

    def zeros(self, shape, dtype, spec: P):
        """A zero array, sharded by `spec` (made on the devices, never whole on one)."""
        return jnp.zeros(shape, dtype, device=self.sharding(spec))

    def kv_shape(self, cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        """The whole cache of one layer's K (or V): each device's KV heads side by side."""
        return (num_blocks, block_size, self.kv_heads(cfg) * self.size, cfg.head_dim)

    def kv_block_bytes(self, cfg: ModelConfig, block_size: int, kv_dtype) -> int:
        """Bytes one KV block takes on each device (all layers, K and V)."""
        return 2 * cfg.num_layers * block_size * self.kv_heads(cfg) * cfg.head_dim * np.dtype(kv_dtype).itemsize
