"""Loaded adapters: in host memory, and up to `max_loras` of them in device slots, the stacks the step reads.

Each adapted projection group of the fused decoder (qkv, o, gate_up, down) has one `LoraStack`:
`A [L, max_loras, Din, R_group]` and `B [L, max_loras, R_group, Dout]`, with the PEFT scaling folded
into B and ranks zero-padded to `max_lora_rank`. Fused groups concatenate their members' A matrices
along the rank axis and place their B matrices block-diagonally, so one shrink and one expand serve
q, k and v (or gate and up) at once. Where the one-hot LoRA path can run, a stack also keeps A as
`[L, Din, max_loras * R]` (slot s owns columns s*R..(s+1)*R), the layout that path multiplies by.

The manager owns these stacks (`AdapterManager.stacks`, a pytree) and the engine passes them into
every adapted step explicitly.

Loading is two steps: `prepare` (any thread) reads and validates the PEFT files and lays the weights
out as one slot of each stack, in host memory (numpy, the engine's dtype); `install` (the engine's
thread) keeps that host copy under the adapter's name and writes it into a free device slot if there is
one. A server reads a large or bogus adapter file beside the engine thread, never on it.

Up to `max_cpu_loras` adapters may be loaded, more than `max_loras` slots: an adapter without a slot gets
one when the scheduler admits a request for it (`claim`): a free slot, else the least recently used slot
that no running request uses, whose adapter goes back to being a host copy only. Its weights are written
into the slot from the host copy (`place`), so a swapped-in adapter is exactly the adapter it was;
requests and cache blocks know an adapter by its content identity, never by its slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jalora.adapters.peft import (
    BASE,
    DEFAULT_LORA_ALPHA,
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
    # group -> (A [L, Din, R_group], B [L, R_group, Dout]) of one slot in host memory, in the engine's
    # dtype, scaling folded into B; only the groups the adapter targets (placing it zeroes its slot in
    # the others)
    slots: dict[str, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _Loaded:
    """A loaded adapter: its host copy, and its device slot while it has one."""

    info: AdapterInfo
    identity: bytes
    host: dict[str, tuple[np.ndarray, np.ndarray]]
    slot: int | None  # None: in host memory only
    last_used: int = 0  # when a request last claimed it (the LRU order of slots)


@dataclasses.dataclass
class SwapCounters:
    """Adapters written into a slot on demand (not at load), and the host seconds that took (the host to
    device copies are enqueued, not waited for)."""

    swaps: int = 0
    seconds: float = 0.0


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
        max_cpu_loras: int | None = None,
    ):
        self.cfg = cfg
        # Under tensor parallelism each stack is split as its projection is (jalora/model/sharding.py).
        self.tp = TensorParallel() if tp is None else tp
        self.max_loras = max_loras
        self.max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras  # adapters loaded at once
        self.max_rank = max_rank
        self.max_model_len = max_model_len  # an invocation must fit in a prompt
        self.dtype = dtype
        self.tokenize = tokenize  # the base tokenizer (legacy invocation strings)
        self.keep_flat_a = keep_flat_a
        self.stacks: AdapterStacks = {}
        self._by_name: dict[str, _Loaded] = {}
        self._slots: list[str | None] = [None] * max_loras  # each slot's adapter
        self._clock = 0  # counts claims: each resident adapter's last_used orders the slots
        self.swaps = SwapCounters()
        # Called with (name, slot) before a swap writes a slot (a multi-host leader sends it to followers).
        self.on_place = None
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
        self._infos = tuple(a.info for a in self._by_name.values())

    @property
    def num_loaded(self) -> int:
        return len(self._by_name)

    @property
    def num_resident(self) -> int:
        return sum(name is not None for name in self._slots)

    def slot_of(self, name: str) -> int | None:
        """The device slot of a loaded adapter, None while it is in host memory only."""
        return self._by_name[name].slot

    def _check_capacity(self) -> None:
        if len(self._by_name) < self.max_cpu_loras:
            return
        if self.max_cpu_loras == self.max_loras:
            raise CapacityError(
                f"all {self.max_loras} adapter slots are in use (max_loras); unload one first, or set "
                "max_cpu_loras above max_loras to keep more adapters in host memory"
            )
        raise CapacityError(f"{self.max_cpu_loras} adapters are loaded (max_cpu_loras); unload one first")

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
        resolve inside one of them) and lays out its slot of each stack it targets in host memory.
        Raises InvalidRequestError; changes nothing."""
        acfg, pairs, identity = read_peft_adapter(path, self.cfg, self.max_rank, roots)
        invocation, inv_string = invocation_of(acfg, self.tokenize, self.cfg.vocab_size, self.max_model_len)
        r, alpha = acfg["r"], float(acfg.get("lora_alpha", DEFAULT_LORA_ALPHA))
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
            slots[group] = (a.astype(self.dtype), b.astype(self.dtype))
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
        a, b = np.asarray(a, self.dtype), np.asarray(b, self.dtype)
        return tp.put(a, _slot_spec(spec_a)), tp.put(b, _slot_spec(spec_b))

    def load(
        self, name: str, adapter: str | os.PathLike | PreparedAdapter, roots: Sequence[str] | None = None
    ) -> AdapterInfo:
        """Installs an adapter directory (read here, confined to `roots` if given) or a prepared one under
        `name`. Raises InvalidRequestError (or CapacityError) and changes nothing."""
        return self.load_prepared(name, adapter, roots)[0]

    def load_prepared(
        self, name: str, adapter: str | os.PathLike | PreparedAdapter, roots: Sequence[str] | None = None
    ) -> tuple[AdapterInfo, PreparedAdapter]:
        """`load`, which also returns what it installed (a multi-host leader sends it to its followers)."""
        self._check_name(name)
        if not isinstance(adapter, str | os.PathLike | PreparedAdapter):
            raise InvalidRequestError("path", f"must be an adapter directory, got {adapter!r:.60}")
        self._check_capacity()  # before the files are read
        prepared = adapter if isinstance(adapter, PreparedAdapter) else self.prepare(adapter, roots)
        return self.install(name, prepared), prepared

    def _check_name(self, name: str) -> None:
        if not is_adapter_name(name):
            raise AdapterNameError(name)
        if name in self._by_name:
            raise InvalidRequestError("name", f"adapter {name!r} is already loaded; unload it first")

    def install(self, name: str, prepared: PreparedAdapter, slot: int | None | str = "free") -> AdapterInfo:
        """Keeps a prepared adapter under `name` and writes it into a free device slot if there is one
        (`slot`: that slot, or None for host memory only, as a multi-host leader decided). Raises
        CapacityError (max_cpu_loras adapters are loaded) and changes nothing."""
        self._check_name(name)
        self._check_capacity()
        if slot == "free":
            slot = next((s for s, occupant in enumerate(self._slots) if occupant is None), None)
        # Every group a loaded adapter targets has its stack from the start, so swapping one in later
        # changes values only, never the compiled step.
        for group in prepared.slots:
            self._ensure_group(group)
        info = dataclasses.replace(prepared.info, name=name)
        self._by_name[name] = _Loaded(info, prepared.identity, prepared.slots, None)
        if slot is not None:
            self._write(name, slot)
        self._publish()
        return info

    def _write(self, name: str, slot: int) -> None:
        """Writes `name`'s host copy into `slot` of every stack (zeroes in the groups it does not target:
        they clear what the slot's last tenant left); the slot's previous adapter keeps its host copy."""
        loaded = self._by_name[name]
        for group, stack in list(self.stacks.items()):
            if group in loaded.host:
                a, b = self._place_slot(group, *loaded.host[group])
            else:
                spec_a, spec_b = (_slot_spec(x) for x in self.tp.stack_specs(group, False)[:2])
                a = self.tp.zeros((stack.a.shape[0], *stack.a.shape[2:]), stack.a.dtype, spec_a)
                b = self.tp.zeros((stack.b.shape[0], *stack.b.shape[2:]), stack.b.dtype, spec_b)
            self.stacks[group] = LoraStack(
                self._set_slot(stack.a, slot, a),
                self._set_slot(stack.b, slot, b),
                None if stack.a_flat is None else self._set_cols(stack.a_flat, slot, a),
            )
        previous = self._slots[slot]
        if previous is not None:
            self._by_name[previous].slot = None
        self._slots[slot] = name
        loaded.slot = slot

    def place(self, name: str, slot: int) -> None:
        """Swaps `name` into `slot` (the slot's adapter, if any, stays loaded in host memory). The caller
        makes sure no running request uses the slot: a step already enqueued still reads the old weights
        (the stacks are replaced, not overwritten under it)."""
        start = time.perf_counter()
        # (a multi-host leader's followers write the same slot: `on_place` holds the write in lockstep with them)
        with self.on_place(name, slot) if self.on_place is not None else contextlib.nullcontext():
            self._write(name, slot)
        self.swaps.swaps += 1
        self.swaps.seconds += time.perf_counter() - start

    def claim(self, name: str, busy: set[int]) -> int | None:
        """The slot of `name` for a request being admitted: its own, or one swapped in: a free slot, else
        the least recently claimed slot not in `busy` (the slots of running requests). None if every slot
        is busy (the request waits)."""
        loaded = self._by_name[name]
        self._clock += 1
        if loaded.slot is None:
            free = [s for s, occupant in enumerate(self._slots) if occupant is None]
            if free:
                slot = free[0]
            else:
                idle = [s for s in range(self.max_loras) if s not in busy]
                if not idle:
                    return None
                slot = min(idle, key=lambda s: self._by_name[self._slots[s]].last_used)
            self.place(name, slot)
        loaded.last_used = self._clock
        return loaded.slot

    def least_recent(self) -> str | None:
        """The resident adapter claimed least recently: a waiting request takes its slot once it is idle
        (None if no slot holds an adapter)."""
        slots = [s for s, occupant in enumerate(self._slots) if occupant is not None]
        if not slots:
            return None
        return self._slots[min(slots, key=lambda s: self._by_name[self._slots[s]].last_used)]

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
        slot = self._by_name.pop(name).slot
        if slot is not None:
            self._slots[slot] = None
        self._publish()

    def resolve(self, name: str | None, ids: list[int]) -> ResolvedAdapter:
        """The slot, identity and activation index of a request; raises if the adapter cannot serve it.
        The slot is the adapter's now (-1 if it has none): the scheduler claims it again at admission."""
        if name is None:
            return BASE
        if name not in self._by_name:
            raise AdapterNotFoundError(name)
        loaded = self._by_name[name]
        info, identity = loaded.info, loaded.identity
        slot = -1 if loaded.slot is None else loaded.slot
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
