"""Adapters resident in device slots, and the stacks the step reads them from.

Each adapted projection group of the fused decoder (qkv, o, gate_up, down) has one `LoraStack`:
`A [L, max_loras, Din, R_group]` and `B [L, max_loras, R_group, Dout]`, with the PEFT scaling folded
into B and ranks zero-padded to `max_lora_rank`. Fused groups concatenate their members' A matrices
along the rank axis and place their B matrices block-diagonally, so one shrink and one expand serve
q, k and v (or gate and up) at once. Where the one-hot LoRA path can run, a stack also keeps A as
`[L, Din, max_loras * R]` (slot s owns columns s*R..(s+1)*R), the layout that path multiplies by.

The manager owns these stacks (`AdapterManager.stacks`, a pytree) and the engine passes them into
every adapted step explicitly.

Loading is two steps: `prepare` (any thread) reads and validates the PEFT files and lays the weights
out as one slot of each stack, on the device; `install` (the engine's thread) picks the slot and writes
them in. A server reads a large or bogus adapter file beside the engine thread, never on it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jalora.adapters.peft import (
    BASE,
    GROUPS,
    MODULE_GROUP,
    AdapterInfo,
    ResolvedAdapter,
    find_activation,
    invocation_of,
    module_dims,
    read_peft_adapter,
)
from jalora.api.limits import is_adapter_name
from jalora.errors import (
    AdapterInUseError,
    AdapterNameError,
    AdapterNotFoundError,
    CapacityError,
    InvalidRequestError,
    InvocationNotFoundError,
)
from jalora.model.config import ModelConfig
from jalora.model.sharding import TensorParallel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    """Every slot's adapter of one projection group, for every layer."""

    a: jax.Array  # [L, max_loras, Din, R]
    b: jax.Array  # [L, max_loras, R, Dout] scaling folded in
    a_flat: jax.Array | None  # [L, Din, max_loras * R] for the one-hot path; None where it never runs


# group name -> its stack; only groups some loaded adapter targets are present.
AdapterStacks = dict[str, LoraStack]


@dataclasses.dataclass(frozen=True)
class PreparedAdapter:
    """An adapter read, validated and laid out by `AdapterManager.prepare`, ready for `install`."""

    info: AdapterInfo  # its name is filled in by install
    identity: bytes
    # group -> (A [L, Din, R_group], B [L, R_group, Dout]) of one slot, scaling folded into B; only the
    # groups the adapter targets (install zeroes its slot in the others)
    slots: dict[str, tuple[jax.Array, jax.Array]]


class AdapterManager:
    def __init__(
        self,
        cfg: ModelConfig,
        max_loras: int,
        max_rank: int,
        max_model_len: int,
        dtype,
        tokenize,
        keep_flat_a: bool,
        tp: TensorParallel | None = None,
    ):
        self.cfg = cfg
        # Under tensor parallelism each stack is split as its projection is (jalora/model/sharding.py).
        self.tp = TensorParallel() if tp is None else tp
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_model_len = max_model_len  # an invocation must fit in a prompt
        self.dtype = dtype
        self.tokenize = tokenize  # the base tokenizer (legacy invocation strings)
        self.keep_flat_a = keep_flat_a
        self.stacks: AdapterStacks = {}
        self._by_name: dict[str, tuple[int, AdapterInfo, bytes]] = {}
        # What infos() reads: a copy replaced whole on every change, so any thread may read it.
        self._infos: tuple[AdapterInfo, ...] = ()
        self._in_flight: dict[str, int] = {}
        self._set_slot = jax.jit(lambda stack, slot, value: stack.at[:, slot].set(value), donate_argnums=(0,))
        self._set_cols = jax.jit(
            lambda stack, slot, value: jax.lax.dynamic_update_slice(stack, value, (0, 0, slot * value.shape[2])),
            donate_argnums=(0,),
        )

    def infos(self) -> list[AdapterInfo]:
        """Thread-safe: the loaded adapters as of the last load or unload."""
        return list(self._infos)

    def _publish(self) -> None:
        self._infos = tuple(info for _, info, _ in self._by_name.values())

    def _free_slot(self) -> int:
        used = {slot for slot, _, _ in self._by_name.values()}
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        raise CapacityError(f"all {self.max_loras} adapter slots are in use (max_loras); unload one first")

    def _ensure_group(self, group: str) -> None:
        if group in self.stacks:
            return
        dims = module_dims(self.cfg)
        members = GROUPS[group]
        din = dims[members[0]][0]
        columns = self.tp.columns(self.cfg, group)
        dout = sum(dims[m][1] for m in members) if columns is None else len(columns)
        r = self.max_rank * len(members)
        layers = self.cfg.num_layers
        spec_a, spec_b, spec_flat = self.tp.stack_specs(group, self.keep_flat_a)
        zeros = self.tp.zeros
        self.stacks[group] = LoraStack(
            zeros((layers, self.max_loras, din, r), self.dtype, spec_a),
            zeros((layers, self.max_loras, r, dout), self.dtype, spec_b),
            zeros((layers, din, self.max_loras * r), self.dtype, spec_flat) if self.keep_flat_a else None,
        )

    def prepare(self, path: str, roots: Sequence[str] | None = None) -> PreparedAdapter:
        """Thread-safe: reads and validates a PEFT directory (with `roots`, every file it reads must
        resolve inside one of them) and builds its slot of each stack it targets on the device. Raises
        InvalidRequestError; changes nothing."""
        acfg, pairs, identity = read_peft_adapter(path, self.cfg, self.max_rank, roots)
        invocation, inv_string = invocation_of(acfg, self.tokenize, self.cfg.vocab_size, self.max_model_len)
        r, alpha = acfg["r"], float(acfg.get("lora_alpha", acfg["r"]))
        scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        pairs = self._scaled(pairs, scaling)
        targets = sorted({m for _, m in pairs}, key=list(MODULE_GROUP).index)
        dims = module_dims(self.cfg)
        slots = {}
        for group in {MODULE_GROUP[m] for m in targets}:
            members = GROUPS[group]
            width = self.max_rank * len(members)
            a = np.zeros((self.cfg.num_layers, dims[members[0]][0], width), np.float32)
            b = np.zeros((self.cfg.num_layers, width, sum(dims[m][1] for m in members)), np.float32)
            out = 0
            for k, module in enumerate(members):
                width = dims[module][1]
                for layer in range(self.cfg.num_layers):
                    if (layer, module) in pairs:
                        la, lb = pairs[(layer, module)]
                        a[layer, :, k * self.max_rank : k * self.max_rank + r] = la.T
                        b[layer, k * self.max_rank : k * self.max_rank + r, out : out + width] = lb.T
                out += width
            slots[group] = self._place_slot(group, a, b)
        info = AdapterInfo(
            name="",
            kind="alora" if invocation else "lora",
            invocation_tokens=invocation,
            invocation_string=inv_string,
            rank=r,
            alpha=alpha,
            targets=targets,
            identity=identity.hex(),
            path=os.path.abspath(path),
        )
        return PreparedAdapter(info, identity, slots)

    def _place_slot(self, group: str, a: np.ndarray, b: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """One slot of a group's stacks ([L, Din, R] and [L, R, Dout]) on the device(s), laid out as the
        stack it goes into."""
        tp = self.tp
        if not tp.sharded:
            return jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype)
        columns = tp.columns(self.cfg, group)
        if columns is not None:
            b = b[..., columns]
        spec_a, spec_b, _ = tp.stack_specs(group, False)
        return tp.put(a.astype(self.dtype), _slot_spec(spec_a)), tp.put(b.astype(self.dtype), _slot_spec(spec_b))

    def load(
        self, name: str, adapter: str | os.PathLike | PreparedAdapter, roots: Sequence[str] | None = None
    ) -> AdapterInfo:
        """Installs an adapter directory (read here, confined to `roots` if given) or a prepared one under
        `name`. Raises InvalidRequestError (or CapacityError) and changes nothing."""
        self._check_name(name)
        prepared = adapter if isinstance(adapter, PreparedAdapter) else self.prepare(adapter, roots)
        return self.install(name, prepared)

    def _check_name(self, name: str) -> None:
        if not is_adapter_name(name):
            raise AdapterNameError(name)
        if name in self._by_name:
            raise InvalidRequestError("name", f"adapter {name!r} is already loaded; unload it first")

    def install(self, name: str, prepared: PreparedAdapter) -> AdapterInfo:
        """Writes a prepared adapter into a free slot of every stack (zeroes in the groups it does not
        target: they clear what the slot's last tenant left) under `name`."""
        self._check_name(name)
        slot = self._free_slot()
        for group in prepared.slots:
            self._ensure_group(group)
        for group, stack in list(self.stacks.items()):
            if group in prepared.slots:
                a, b = prepared.slots[group]
            else:
                spec_a, spec_b = (_slot_spec(x) for x in self.tp.stack_specs(group, False)[:2])
                a = self.tp.zeros((stack.a.shape[0], *stack.a.shape[2:]), stack.a.dtype, spec_a)
                b = self.tp.zeros((stack.b.shape[0], *stack.b.shape[2:]), stack.b.dtype, spec_b)
            self.stacks[group] = LoraStack(
                self._set_slot(stack.a, slot, a),
                self._set_slot(stack.b, slot, b),
                None if stack.a_flat is None else self._set_cols(stack.a_flat, slot, a),
            )
        info = dataclasses.replace(prepared.info, name=name)
        self._by_name[name] = (slot, info, prepared.identity)
        self._publish()
        return info

    def _scaled(self, pairs: dict, scaling: float) -> dict:
        """{(layer, module): (A, B * scaling)}; raises if a value overflows the engine's dtype (the
        weights are finite in float32, but B * scaling may not be, and bfloat16 or float16 may not hold it)."""
        out = {}
        with np.errstate(over="ignore", invalid="ignore"):  # overflows are what this looks for
            for (layer, module), (la, lb) in sorted(pairs.items()):
                lb = lb * scaling
                for which, m in (("lora_A", la), ("lora_B", lb)):
                    if not np.isfinite(m.astype(self.dtype)).all():
                        raise InvalidRequestError(
                            "adapter_model.safetensors",
                            f"layer {layer} {module}.{which} times the scaling {scaling:g} overflows "
                            f"{np.dtype(self.dtype).name}",
                        )
                out[(layer, module)] = (la, lb)
        return out

    def unload(self, name: str) -> None:
        if name not in self._by_name:
            raise AdapterNotFoundError(name)
        if self._in_flight.get(name):
            raise AdapterInUseError(name, self._in_flight[name])
        del self._by_name[name]
        self._publish()

    def resolve(self, name: str | None, ids: list[int]) -> ResolvedAdapter:
        """The slot, identity and activation index of a request; raises if the adapter cannot serve it."""
        if name is None:
            return BASE
        if name not in self._by_name:
            raise AdapterNotFoundError(name)
        slot, info, identity = self._by_name[name]
        if info.kind == "lora":
            return ResolvedAdapter(slot, identity, 0)
        start = find_activation(ids, info.invocation_tokens)
        if start is None:
            raise InvocationNotFoundError(name, info.invocation_tokens)
        return ResolvedAdapter(slot, identity, start)

    def acquire(self, name: str | None) -> None:
        if name is not None:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1

    def release(self, name: str | None) -> None:
        if name is not None:
            self._in_flight[name] -= 1


def _slot_spec(stack_spec: P) -> P:
    """The PartitionSpec of one slot of a stack ([L, S, ...] without the slot axis S)."""
    return P(*(stack_spec[:1] + stack_spec[2:]))
