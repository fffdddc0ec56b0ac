"""Adapters resident in device slots, and the stacks the step reads them from.

Each adapted projection group of the fused decoder (qkv, o, gate_up, down) has one `LoraStack`:
`A [L, max_loras, Din, R_group]` and `B [L, max_loras, R_group, Dout]`, with the PEFT scaling folded
into B and ranks zero-padded to `max_lora_rank`. Fused groups concatenate their members' A matrices
along the rank axis and place their B matrices block-diagonally, so one shrink and one expand serve
q, k and v (or gate and up) at once. Where the one-hot LoRA path can run, a stack also keeps A as
`[L, Din, max_loras * R]` (slot s owns columns s*R..(s+1)*R), the layout that path multiplies by.

The manager owns these stacks (`AdapterManager.stacks`, a pytree) and the engine passes them into
every adapted step explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    """Every slot's adapter of one projection group, for every layer."""

    a: jax.Array  # [L, max_loras, Din, R]
    b: jax.Array  # [L, max_loras, R, Dout] scaling folded in
    a_flat: jax.Array | None  # [L, Din, max_loras * R] for the one-hot path; None where it never runs


# group name -> its stack; only groups some loaded adapter targets are present.
AdapterStacks = dict[str, LoraStack]


class AdapterManager:
    def __init__(
        self, cfg: ModelConfig, max_loras: int, max_rank: int, max_model_len: int, dtype, tokenize, keep_flat_a: bool
    ):
        self.cfg = cfg
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_model_len = max_model_len  # an invocation must fit in a prompt
        self.dtype = dtype
        self.tokenize = tokenize  # the base tokenizer (legacy invocation strings)
        self.keep_flat_a = keep_flat_a
        self.stacks: AdapterStacks = {}
        self._by_name: dict[str, tuple[int, AdapterInfo, bytes]] = {}
        self._in_flight: dict[str, int] = {}
        self._set_slot = jax.jit(lambda stack, slot, value: stack.at[:, slot].set(value), donate_argnums=(0,))
        self._set_cols = jax.jit(
            lambda stack, slot, value: jax.lax.dynamic_update_slice(stack, value, (0, 0, slot * value.shape[2])),
            donate_argnums=(0,),
        )

    def infos(self) -> list[AdapterInfo]:
        return [info for _, info, _ in self._by_name.values()]

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
        dout = sum(dims[m][1] for m in members)
        r = self.max_rank * len(members)
        layers = self.cfg.num_layers
        self.stacks[group] = LoraStack(
            jnp.zeros((layers, self.max_loras, din, r), self.dtype),
            jnp.zeros((layers, self.max_loras, r, dout), self.dtype),
            jnp.zeros((layers, din, self.max_loras * r), self.dtype) if self.keep_flat_a else None,
        )

    def load(self, name: str, path: str, roots: Sequence[str] | None = None) -> AdapterInfo:
        """Reads, validates and places an adapter in a free slot; with `roots`, every file it reads must
        resolve inside one of them. Raises InvalidRequestError (or CapacityError) and changes nothing."""
        if not is_adapter_name(name):
            raise AdapterNameError(name)
        if name in self._by_name:
            raise InvalidRequestError("name", f"adapter {name!r} is already loaded; unload it first")
        acfg, pairs, identity = read_peft_adapter(path, self.cfg, self.max_rank, roots)
        invocation, inv_string = invocation_of(acfg, self.tokenize, self.cfg.vocab_size, self.max_model_len)
        slot = self._free_slot()
        r, alpha = acfg["r"], float(acfg.get("lora_alpha", acfg["r"]))
        scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        pairs = self._scaled(pairs, scaling)
        targets = sorted({m for _, m in pairs}, key=list(MODULE_GROUP).index)
        for group in {MODULE_GROUP[m] for m in targets}:
            self._ensure_group(group)
        dims = module_dims(self.cfg)
        for group, stack in list(self.stacks.items()):  # every group: clears what a slot's last tenant left
            a = np.zeros((self.cfg.num_layers, *stack.a.shape[2:]), np.float32)
            b = np.zeros((self.cfg.num_layers, *stack.b.shape[2:]), np.float32)
            out = 0
            for k, module in enumerate(GROUPS[group]):
                width = dims[module][1]
                for layer in range(self.cfg.num_layers):
                    if (layer, module) in pairs:
                        la, lb = pairs[(layer, module)]
                        a[layer, :, k * self.max_rank : k * self.max_rank + r] = la.T
                        b[layer, k * self.max_rank : k * self.max_rank + r, out : out + width] = lb.T
                out += width
            a = jnp.asarray(a, self.dtype)
            self.stacks[group] = LoraStack(
                self._set_slot(stack.a, slot, a),
                self._set_slot(stack.b, slot, jnp.asarray(b, self.dtype)),
                None if stack.a_flat is None else self._set_cols(stack.a_flat, slot, a),
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
        self._by_name[name] = (slot, info, identity)
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
