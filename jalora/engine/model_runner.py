"""Turns a scheduled batch into padded arrays and runs the one jitted step on the device.

Shapes are bucketed: the flattened token count T is padded to a power of two (>= 16) and the
sequence axis to `max_num_seqs`, so the number of compilations stays small and fixed. What a request
asks for picks no compiled variant of the step: the step argmaxes, and the optional work is done by
small jitted functions of its own over the step's device outputs, enqueued right behind it only for
steps that need them: the sampled draw (`_draw`, per row: temperature 0 keeps the argmax), the top-n
logprobs (`_top`) and the prompt logprobs (`_prompt_lp`, every row's logits). A conditional inside the
step could skip that work instead, but XLA:GPU copies a conditional's predicate to the host and waits
for it (a stall of async scheduling every step), and on a CPU two conditionals cost ~40 us a step (12%
of the tiny model's batch-1 decode). So each bucket has one step (two once an adapter is loaded:
base-only and adapted; the smallest bucket one more of each where a long-context decode can happen,
each large bucket one more of each where one sequence's prefill chunk runs split, and each small bucket
one more of each where a short chunk can follow a long context (see `prepare`)
plus the small functions, and the warm-up compiles all of them: no request
compiles on the engine thread while other streams wait. The KV cache
is donated into the step and comes back updated in place; the adapter stacks come in as an argument
(owned by the AdapterManager), so loading an adapter changes values, not the compiled step (unless it
is the first to target a projection group, which adds that group's stack).
"""

import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jalora.adapters.manager import AdapterStacks, LoraStack
from jalora.engine.executables import Executables, fingerprint, get_all
from jalora.engine.host_tier import MAX_MOVE_BLOCKS
from jalora.engine.multihost import Recent
from jalora.engine.penalties import PenaltySlots, RowWrite
from jalora.engine.scheduler import ScheduledBatch
from jalora.model.checkpoint import param_name
from jalora.model.decoder import (
    AttentionMetadata,
    Decoder,
    LoraBatch,
    decoder_layer,
    embed_tokens,
    layer_stacks,
    logits_of,
    rms_norm,
)
from jalora.model.sampler import apply_penalties, sample
from jalora.model.sharding import AXIS, KV_SPEC, TensorParallel
from jalora.sampling_params import MAX_DRAW_BIASES, MAX_LOGPROBS
from pallas_kernels.masked_lora import LoraSegments, build_lora_segments

logger = logging.getLogger(__name__)

MIN_BUCKET = 16


@dataclasses.dataclass
class CompileCounters:
    """First uses of step variants: the call that traces and compiles one (or loads it from JAX's
    persistent cache) blocks for that long, so each counts with its duration, in the warm-up or not."""

    warmup: int = 0
    warmup_seconds: float = 0.0
    serving: int = 0  # each held up the requests of its step
    serving_seconds: float = 0.0


class StepInputs(NamedTuple):
    token_ids: jax.Array  # i32[T]
    token_src: jax.Array  # i32[T] row of the previous step's sampled tokens to feed instead, -1 = token_ids
    positions: jax.Array  # i32[T]
    lora_slots: jax.Array | None  # i32[T] adapter slot per token (-1 = none); None: no token is adapted
    lora_segments: LoraSegments | None  # adapted-token runs for the kernels; None: one-hot path or no LoRA
    prompt_targets: jax.Array  # i32[T] next prompt token (for prompt logprobs), -1 = none
    attn: AttentionMetadata
    logits_indices: jax.Array  # i32[S] row of each sequence's last token
    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S]
    top_p: jax.Array  # f32[S]
    seeds: jax.Array  # u32[S]
    counters: jax.Array  # i32[S]
    min_p: jax.Array  # f32[S]


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    """A step's host inputs and what its requests want done after the step (each flag enqueues one of
    the small functions behind it; none picks a compiled variant of the step)."""

    inputs: StepInputs
    do_sample: bool  # some request samples or biases logits (else the step's argmax is every token)
    want_logprobs: bool  # some request wants top-n logprobs
    want_prompt_lp: bool  # some row has a next prompt token whose logprob a request wants
    # (i32[R, MAX_DRAW_BIASES] token ids, f32[R, MAX_DRAW_BIASES] biases) where some request has a logit_bias or
    # bans its stop ids (min_tokens): the draw's own inputs, outside the step's (whose layout would otherwise pick
    # another compiled step)
    draw_biases: tuple[np.ndarray, np.ndarray] | None = None
    # Where some request has a penalty: each row's (penalty slot, slot that counts its drawn token, presence,
    # frequency, repetition), and the slots' rows to write before the draw (jalora/engine/penalties.py)
    penalties: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    row_writes: tuple[RowWrite, ...] = ()


class SamplingInputs(NamedTuple):
    """The draw's per-row parameters (R = min(T, S) rows), sent only for steps that sample."""

    temperature: np.ndarray  # f32[R]
    top_k: np.ndarray  # i32[R]
    top_p: np.ndarray  # f32[R]
    seeds: np.ndarray  # u32[R]
    counters: np.ndarray  # i32[R]
    min_p: np.ndarray  # f32[R]
    bias_ids: np.ndarray | None = None  # i32[R, MAX_DRAW_BIASES] (rows without a bias: token 0, bias 0)
    bias_values: np.ndarray | None = None  # f32[R, MAX_DRAW_BIASES]
    # The draw that adjusts logits has the biases and these together (rows without a penalty: slot -1, 0, 0, 1)
    penalty_slot: np.ndarray | None = None  # i32[R] row of the counts table the row's penalties read
    count_slot: np.ndarray | None = None  # i32[R] row that counts the row's drawn token (-1: none)
    presence: np.ndarray | None = None  # f32[R]
    frequency: np.ndarray | None = None  # f32[R]
    repetition: np.ndarray | None = None  # f32[R]


class StepOutputs(NamedTuple):
    """A dispatched step's device outputs (not waited for); None where no request of the step wants it."""

    tokens: jax.Array  # i32[S] sampled token of each sequence
    token_logprobs: jax.Array  # f32[S]
    top_ids: jax.Array | None  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array | None  # f32[S, MAX_LOGPROBS]
    prompt_logprobs: jax.Array | None  # f32[T]
    token_ranks: jax.Array | None = None  # i32[S] each sampled token's rank in its row's vocabulary (1: most likely)


class StepResult(NamedTuple):
    tokens: np.ndarray  # i32[S]
    token_logprobs: np.ndarray  # f32[S]
    top_ids: np.ndarray | None  # i32[S, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None  # f32[S, MAX_LOGPROBS]
    prompt_logprobs: np.ndarray | None  # f32[T]
    token_ranks: np.ndarray | None = None  # i32[S]


def _no_biases(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The draw's biases of `rows` rows that bias nothing (token 0, bias 0), to be filled per request."""
    return np.zeros((rows, MAX_DRAW_BIASES), np.int32), np.zeros((rows, MAX_DRAW_BIASES), np.float32)


def _no_penalties(rows: int) -> tuple[np.ndarray, ...]:
    """PreparedStep.penalties of `rows` rows without a row of token counts (slot -1, counted nowhere) or a
    penalty (presence 0, frequency 0, repetition 1), to be filled per request."""
    return (np.full(rows, -1, np.int32), np.full(rows, -1, np.int32), np.zeros(rows, np.float32),
            np.zeros(rows, np.float32), np.ones(rows, np.float32))  # fmt: skip


def pack_inputs(inp: StepInputs) -> tuple[np.ndarray, tuple]:
    """One int32 buffer holding every host array of a step, and its (static) layout.

    A step's inputs then cross to the device in one transfer instead of one per array (about 15 small
    copies, each with its own host-side cost). Every field is a 4-byte type (int32, uint32, float32)
    and travels bit-for-bit; `unpack_inputs` slices and bitcasts it back inside the jitted step.
    """
    leaves, treedef = jax.tree.flatten(inp)
    parts, shapes = [], []
    for x in leaves:
        x = np.asarray(x)
        if x.dtype.itemsize != 4:
            raise TypeError(f"step inputs must be 4-byte types, got {x.dtype}")
        parts.append(x.reshape(-1).view(np.int32))
        shapes.append((x.shape, x.dtype.str))
    return np.concatenate(parts), (treedef, tuple(shapes))


def unpack_inputs(packed, layout: tuple) -> StepInputs:
    treedef, shapes = layout
    leaves, off = [], 0
    for shape, dtype in shapes:
        n = math.prod(shape)
        x = packed[off : off + n]
        off += n
        if np.dtype(dtype) != np.int32:
            x = jax.lax.bitcast_convert_type(x, np.dtype(dtype))
        leaves.append(x.reshape(shape))
    return jax.tree.unflatten(treedef, leaves)


def token_buckets(max_num_batched_tokens: int, single_token_step: bool = False) -> list[int]:
    """Step sizes (token rows) the step compiles for: powers of two from MIN_BUCKET (the Pallas kernels'
    row tile) up to max_num_batched_tokens, and with `single_token_step` a 1-row step below them.

    The 1-row step pays where cost is linear in rows, as on the pure-jnp path (a CPU): batch-1 decode
    is the commonest small step (a lone request, a judge), and 16 padded rows cost it several times
    one row's work (bench/results/cpu_decode.json). Sizes between 1 and 16 would add compilations for
    rarer steps."""
    top = max(MIN_BUCKET, 1 << math.ceil(math.log2(max_num_batched_tokens)))
    powers = [1 << i for i in range(int(math.log2(MIN_BUCKET)), int(math.log2(top)) + 1)]
    return [1, *powers] if single_token_step else powers


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        kv_dtype,
        tp: TensorParallel | None = None,
        kv_moves: bool = False,
        executable_dir: Path | None = None,
        layers_per_launch: int = 0,
        compiler_options: dict | None = None,
    ):
        """`executable_dir`: where compiled variants of the step and the functions behind it are saved and
        loaded from (jalora/engine/executables.py); None keeps them in memory only. `layers_per_launch` > 0:
        run a step as a compiled group of that many layers launched once per group between the embedding's
        and the head's launches, instead of one compiled step of every layer (unsharded models only; see
        `_launch_layers`). `compiler_options`: XLA options of every compilation (the autotuning level)."""
        cfg = model.cfg
        self.tp = tp = TensorParallel() if tp is None else tp
        self.cfg = cfg
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_model_len // block_size)
        self.buckets = token_buckets(max_num_batched_tokens, model.plan.single_token_step)
        self.plan = model.plan
        # Decode steps of the smallest bucket with a long context may run the attention kernel's
        # long-context grid (KernelPlan.long_decode): one more variant of that bucket, if it can happen.
        self._kv_heads = tp.kv_heads(cfg)
        self._window_keys = cfg.sliding_window or max_model_len  # (the most keys a query reads)
        self.long_decode = self.buckets[0] <= max_num_seqs and model.plan.long_decode(
            1, self._kv_heads, min(max_model_len, self._window_keys)
        )
        # A large bucket whose last sequence is a prefill chunk may run it through split_prefill_attention
        # (KernelPlan.split_prefill): one more variant of each such bucket.
        self.split_prefill_buckets = [b for b in self.buckets if model.plan.split_prefill(b, b, cfg.sliding_window)]
        # A small decode-shaped bucket in which a sequence brings several rows after a long context (an adapter's
        # invocation, a new chat turn) may run the kernel's long-chunk variant (KernelPlan.long_chunk): one more
        # variant of each such bucket.
        longest = min(max_model_len, self._window_keys)
        self._group = max(cfg.num_heads // tp.size // self._kv_heads, 1)  # (query heads per kv head, per device)
        self.long_chunk_buckets = [b for b in self.buckets
                                   if b <= max_num_seqs and model.plan.long_chunk(b, longest, b, self._group)]
        self.graphdef, state = nnx.split(model)
        # The parameters cross into the step as a flat list: flattening the nnx.State pytree on every
        # call cost ~0.6 ms of host time per step for 40 layers (bench/profile_step.py).
        self.params, self.params_def = jax.tree.flatten(state)
        self._hidden_dtype = model.embed[...].dtype  # (the final hidden states', as every activation's)
        shape = tp.kv_shape(cfg, num_blocks, block_size)
        self.kv_caches = [
            (tp.zeros(shape, kv_dtype, KV_SPEC), tp.zeros(shape, kv_dtype, KV_SPEC)) for _ in range(cfg.num_layers)
        ]
        graphdef, params_def = self.graphdef, self.params_def
        if tp.sharded:  # the step runs one device's part of the model (its heads, features, vocabulary rows)
            local = Decoder(tp.local_config(cfg), model.plan, tp_axis=AXIS, vocab_size=cfg.vocab_size)
            graphdef = nnx.split(nnx.eval_shape(lambda: local))[0]
            param_specs = [tp.param_spec(param_name(p)) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
            kv_specs = [(KV_SPEC, KV_SPEC)] * cfg.num_layers

        def forward(params, kv_caches, stacks, token_ids, positions, attn, token_slots, segments, logits_indices):
            """(final hidden states [T, D], logits [R, V] of the rows in logits_indices, new caches)."""
            model = nnx.merge(graphdef, jax.tree.unflatten(params_def, params))
            lora = None if token_slots is None else LoraBatch(stacks, token_slots, segments)
            hidden, kv_caches = model(token_ids, positions, kv_caches, attn, lora)
            return hidden, model.logits(hidden[logits_indices]), kv_caches

        def logits_of(params, hidden):
            return nnx.merge(graphdef, jax.tree.unflatten(params_def, params)).logits(hidden)

        if tp.sharded:
            # Every device runs the same step on its shards; what is not a parameter, a cache or an
            # adapter stack (tokens, positions, metadata) is replicated, and so are the outputs.
            sharded_forward = forward

            def forward(params, kv_caches, stacks, *rest):
                stack_specs = {g: LoraStack(*tp.stack_specs(g, st.a_flat is not None)) for g, st in stacks.items()}
                return jax.shard_map(
                    sharded_forward, mesh=tp.mesh, check_vma=False,
                    in_specs=(param_specs, kv_specs, stack_specs, *[P()] * len(rest)),
                    out_specs=(P(), P(), kv_specs),
                )(params, kv_caches, stacks, *rest)  # fmt: skip

            logits_of = jax.shard_map(
                logits_of, mesh=tp.mesh, check_vma=False, in_specs=(param_specs, P()), out_specs=P()
            )

        def pad_rows(tokens):  # the next step reads tokens by row (async scheduling): one shape always
            return jnp.pad(tokens, (0, max_num_seqs - tokens.shape[0]))

        def step_fn(params, kv_caches, adapters, packed, prev_tokens, layout):
            inp: StepInputs = unpack_inputs(packed, layout)
            # Async scheduling: tokens sampled by the previous step are fed from its device output.
            token_ids = jnp.where(inp.token_src >= 0, prev_tokens[jnp.maximum(inp.token_src, 0)], inp.token_ids)
            hidden, logits, kv_caches = forward(
                params, kv_caches, adapters, token_ids, inp.positions, inp.attn, inp.lora_slots, inp.lora_segments,
                inp.logits_indices,
            )  # fmt: skip
            tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            token_lp = _logprob_of(logits, tokens)
            # Left on the device for the functions behind the step (each output costs host time per
            # step, so only these two): logits f32[R, V] of each sequence's last token, R = min(T, S)
            # (the draw and the top-n compile per row count, not per bucket), and every row's final
            # hidden state [T, D] in the model's dtype (prompt logprobs).
            return kv_caches, StepOutputs(pad_rows(tokens), token_lp, None, None, None), logits, hidden

        def draw_fn(logits, packed, counts, layout):
            """The step's tokens drawn per row (greedy rows keep the argmax) and their logprobs; with the
            penalties' counts table (`counts`, donated), the logits adjusted first (biases, then penalties, in
            vLLM's order) and the table with each drawn token counted."""
            sp: SamplingInputs = unpack_inputs(packed, layout)
            x = logits  # (the logprobs stay the model's own, as vLLM's)
            if counts is not None:
                x = x.at[jnp.arange(x.shape[0])[:, None], sp.bias_ids].add(sp.bias_values)
                # (a row without a slot reads zeros: another request's row would carry its disallowed tokens)
                seen = jnp.where(sp.penalty_slot[:, None] >= 0, counts[jnp.maximum(sp.penalty_slot, 0)], 0)
                x = apply_penalties(x, seen, sp.presence, sp.frequency, sp.repetition)
            tokens = sample(x, sp.temperature, sp.top_k, sp.top_p, sp.seeds, sp.counters, sp.min_p)
            if counts is None:
                return pad_rows(tokens), _logprob_of(logits, tokens)
            target = jnp.where(sp.count_slot >= 0, sp.count_slot, counts.shape[0])  # (out of range: dropped)
            counts = counts.at[target, tokens].add(1, mode="drop")
            return pad_rows(tokens), _logprob_of(logits, tokens), counts

        def write_row_fn(counts, slot, row, prev_tokens, pending_row):
            """The counts table with `row` in `slot`, plus one for prev_tokens[pending_row] unless it is -1."""
            row = row.at[prev_tokens[jnp.maximum(pending_row, 0)]].add((pending_row >= 0).astype(row.dtype))
            return counts.at[slot].set(row)

        def top_fn(logits, tokens):
            """(f32[R, MAX_LOGPROBS], i32[R, MAX_LOGPROBS], i32[R]): each row's most likely tokens' logprobs
            and ids, and the rank of the row's sampled token (i32[S] `tokens`): how many of the row's tokens
            are at least as likely as it, itself included (vLLM's rank)."""
            all_lp = jax.nn.log_softmax(logits, axis=-1)
            top_lp, top_ids = jax.lax.top_k(all_lp, MAX_LOGPROBS)
            chosen = jnp.take_along_axis(all_lp, tokens[: logits.shape[0], None], axis=-1)
            return top_lp, top_ids, jnp.sum(all_lp >= chosen, axis=-1, dtype=jnp.int32)

        def prompt_lp_fn(params, hidden, targets):
            """f32[T]: log p(targets[t] | tokens <= t) from each row's final hidden state (i32[T] targets,
            -1 where a row has none: its value is meaningless). Every row's logits cost a [T, V] matmul,
            which is why only steps whose requests ask for prompt logprobs run this."""
            all_lp = jax.nn.log_softmax(logits_of(params, hidden), axis=-1)
            return jnp.take_along_axis(all_lp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]

        def gather_fn(kv_caches, blocks):  # i32[n] -> [n, layers, 2 (K, V), block_size, kv heads, head_dim]
            return jnp.stack([jnp.stack([k[blocks], v[blocks]], axis=1) for k, v in kv_caches], axis=1)

        def scatter_fn(kv_caches, blocks, data):  # i32[n], [n, layers, 2, block_size, kv heads, head_dim]
            return [(k.at[blocks].set(data[:, i, 0]), v.at[blocks].set(data[:, i, 1])) for i, (k, v) in
                    enumerate(kv_caches)]  # fmt: skip

        # The host tier's copies (jalora/engine/host_tier.py): whole blocks out of and into the cache, in
        # its sharding (under tensor parallelism each device gathers and writes its own KV heads).
        kv_shardings = [(tp.sharding(KV_SPEC),) * 2] * cfg.num_layers if tp.sharded else None
        self.kv_moves = kv_moves
        self._pinned_host = kv_moves and all(  # where the gathers' results go (gather_kv_blocks)
            "pinned_host" in {m.kind for m in d.addressable_memories()} for d in self.kv_caches[0][0].devices()
        )
        self._gather = jax.jit(gather_fn)
        self._scatter = jax.jit(scatter_fn, donate_argnums=(0,), out_shardings=kv_shardings)
        # The step and the functions behind it, each variant compiled once and kept in executable_dir:
        # what decides a compiled module besides its arguments (their shapes, dtypes, shardings) is here.
        fp = fingerprint(type(model).__name__, cfg, model.plan, block_size, max_num_seqs, self.max_pages,
                         str(jnp.dtype(kv_dtype)),
                         (repr(tp.mesh), tp.mesh.device_ids.tolist()) if tp.sharded else None,
                         sorted((compiler_options or {}).items()))  # fmt: skip
        # (every compiled function of the runner: its variants kept in executable_dir, compiled with these options)
        self._executables_of = functools.partial(Executables, directory=executable_dir, fingerprint=fp,
                                                 compiler_options=compiler_options)  # fmt: skip
        self._step = self._executables_of(step_fn, "step", static_argnames=("layout",),
                                          donate_argnums=(1,), variant_key=_step_variant,
                                          describe=lambda args, static: _describe_step("step", static["layout"],
                                                                                       args[2]))  # fmt: skip
        self._draw = self._executables_of(draw_fn, "draw", static_argnames=("layout",), donate_argnums=(2,),
                                          describe=lambda args, _: f"draw R={args[0].shape[0]}")
        self._write_row = self._executables_of(write_row_fn, "write_row", donate_argnums=(0,))
        # The penalties' token counts: a row per slot, each penalized request in one (jalora/engine/penalties.py)
        self.penalty_counts = tp.zeros((max_num_seqs, cfg.vocab_size), jnp.int32, P())
        self.penalty_slots = PenaltySlots(max_num_seqs, cfg.vocab_size)
        self._top = self._executables_of(top_fn, "top", describe=lambda args, _: f"top R={args[0].shape[0]}")
        self._prompt_lp = self._executables_of(prompt_lp_fn, "prompt_lp",
                                               variant_key=lambda args, _: (args[1].shape, args[1].dtype),
                                               describe=lambda args, _: f"prompt_lp T={args[1].shape[0]}")  # fmt: skip
        # prev_tokens when nothing is pending (on every device of the mesh, as the step's own outputs)
        self._no_prev_tokens = tp.zeros((max_num_seqs,), jnp.int32, P())
        self.layers_per_launch = layers_per_launch
        self.layer_launches = layers_per_launch > 0
        if self.layer_launches:
            if tp.sharded:
                raise ValueError("layer launches run an unsharded model only")
            self._init_layer_launches(model, pad_rows, layers_per_launch)
        # Several hosts (jalora/engine/multihost.py): process 0's runner sends each launch to the others
        # (`leader`); every runner numbers its launches and keeps the last few sampled-token arrays.
        self.leader = None
        self.recent = Recent()
        self._launches = 0
        # What picks a compiled variant of the step: the static arguments and the adapter groups (the
        # stacks' tree; every other argument has one shape per engine).
        self.compiles = CompileCounters()
        self._warming_up = False
        self.warmup_phases: list[dict] = []  # per warm-up call: where its seconds went

    def bucket(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.buckets[-1]}")

    @property
    def smallest_step(self) -> int:
        return self.buckets[0]

    def prepare(self, batch: ScheduledBatch, prev_step: int | None = None) -> PreparedStep:
        """Host side: numpy arrays for one step, built with a few vectorised numpy ops per step (a Python
        loop with per-request numpy calls cost 1.3 ms at 64 decoding sequences).

        A request's pending token (sampled by step `prev_step`, still on the device) is fed from that
        step's output: its row goes into `token_src`."""
        t = self.bucket(batch.total_tokens)
        s = self.max_num_seqs
        bs = self.block_size
        reqs = batch.requests
        k = len(reqs)
        ns = np.asarray(batch.num_tokens, np.int32)
        total = int(ns.sum())
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int32, count=k)
        cu = np.zeros(s + 1, np.int32)
        np.cumsum(ns, out=cu[1 : k + 1])
        cu[k + 1 :] = total
        seq_of_tok = np.repeat(np.arange(k, dtype=np.int32), ns)
        pos = np.arange(total, dtype=np.int32) - cu[seq_of_tok] + starts[seq_of_tok]

        token_ids = np.zeros(t, np.int32)
        token_src = np.full(t, -1, np.int32)
        known = []
        for i, (r, st, n) in enumerate(zip(reqs, starts.tolist(), ns.tolist())):
            ids = r.all_token_ids[st : st + n]
            if len(ids) < n:  # its last scheduled tokens are pending: fed from the previous step
                for j, (step, row) in enumerate(r.pending[: n - len(ids)]):
                    if step != prev_step:
                        raise RuntimeError(f"request {r.request_id} waits on step {step}, not {prev_step}")
                    token_src[cu[i] + len(ids) + j] = row
                ids = ids + [0] * (n - len(ids))
            known += ids
        token_ids[:total] = known
        positions = np.zeros(t, np.int32)
        positions[:total] = pos

        tables = [r.block_ids.as_array() for r in reqs]
        num_blocks = np.fromiter((a.shape[0] for a in tables), np.int32, count=k)
        page_indices = np.zeros((s, self.max_pages), np.int32)
        flat_blocks = np.concatenate(tables) if tables else np.zeros(0, np.int32)
        block_row = np.repeat(np.arange(k, dtype=np.int32), num_blocks)
        block_col = np.arange(flat_blocks.shape[0], dtype=np.int32) - np.repeat(
            np.cumsum(num_blocks) - num_blocks, num_blocks
        )
        page_indices[block_row, block_col] = flat_blocks
        page = pos // bs
        if total and not (page < num_blocks[seq_of_tok]).all():  # the scheduler allocates first
            raise RuntimeError("a scheduled token has no cache block (block table shorter than its position)")
        slot_mapping = np.full(t, -1, np.int32)
        slot_mapping[:total] = page_indices[seq_of_tok, page] * bs + pos % bs

        adapter_slot = np.fromiter((r.adapter_slot for r in reqs), np.int32, count=k)
        token_slots = np.full(t, -1, np.int32)
        if (adapter_slot >= 0).any():
            act = np.fromiter((r.activation_start or 0 for r in reqs), np.int32, count=k)
            token_slots[:total] = np.where(pos >= act[seq_of_tok], adapter_slot[seq_of_tok], -1)

        params = [r.params for r in reqs]
        prompt_targets = np.full(t, -1, np.int32)
        want_prompt_lp = False  # some row has a next prompt token to score (a decode step has none)
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs and starts[i] + 1 < len(r.prompt_token_ids):
                nxt = pos[cu[i] : cu[i + 1]] + 1
                ok = nxt < len(r.prompt_token_ids)
                prompt_targets[cu[i] : cu[i + 1]][ok] = np.asarray(r.prompt_token_ids)[nxt[ok]]
                want_prompt_lp = True

        def per_seq(values, dtype, fill, n=s):
            out = np.full(n, fill, dtype)
            out[:k] = values
            return out

        kv_lens = per_seq(starts + ns, np.int32, 0)
        # A step of t tokens has at most t sequences: the logits and sampling take min(t, s) rows (at
        # batch-1 decode of SmolLM2 on a CPU, 64 rows of logits over its 49k vocabulary took ~18 ms of a
        # 115 ms step).
        rows = min(t, s)
        logits_indices = per_seq(cu[1 : k + 1] - 1, np.int32, 0, rows)
        temperature = per_seq([p.temperature for p in params], np.float32, 0.0, rows)
        top_k = per_seq([p.top_k for p in params], np.int32, 0, rows)
        top_p = per_seq([p.top_p for p in params], np.float32, 1.0, rows)
        seeds = per_seq([r.seed for r in reqs], np.uint32, 0, rows)
        counters = per_seq([r.num_output_tokens_with_pending for r in reqs], np.int32, 0, rows)
        min_p = per_seq([p.min_p for p in params], np.float32, 0.0, rows)
        # Long-context decode: one token per sequence in the smallest bucket, with a context long enough
        # (what the kernel reads of it: a sliding window bounds that) that the kernel's long-context grid
        # pays (KernelPlan.long_decode); prefill chunks keep the bucket's grid.
        long = self.long_decode and t == self.buckets[0] and total == k
        long = long and self.plan.long_decode(k, self._kv_heads, min(int(kv_lens.max()), self._window_keys))
        # The last sequence's prefill chunk in a large bucket: prefix and self attention apart (KernelPlan.
        # split_prefill).
        split = not long and k > 0 and self.plan.split_prefill(t, int(ns[k - 1]), self.cfg.sliding_window)
        # A small step in which a sequence brings several rows after a long context: the kernel's long-chunk
        # variant (KernelPlan.long_chunk; each query block of the chunk would read the whole context again).
        chunk = not long and not split and total > k and t in self.long_chunk_buckets
        if chunk:  # (the reductions only for the steps that can take it: prepare runs every step)
            chunk = self.plan.long_chunk(t, min(int(kv_lens.max()), self._window_keys), int(ns.max()), self._group)
        flag = np.ones(1, np.int32)
        attn = AttentionMetadata(slot_mapping, kv_lens, page_indices, cu, np.array([k], np.int32),
                                 flag if long else None, flag if split else None, flag if chunk else None)  # fmt: skip
        lora_slots, segments = None, None
        if (token_slots >= 0).any():  # base-only steps skip the LoRA path entirely (another compilation)
            lora_slots, segments = token_slots, self._lora_segments(token_slots)
        inp = StepInputs(
            token_ids, token_src, positions, lora_slots, segments, prompt_targets, attn, logits_indices,
            temperature, top_k, top_p, seeds, counters, min_p,
        )  # fmt: skip
        # The draw's biases: each request's logit_bias, and within its first min_tokens tokens its stop ids banned
        # (built only for a step that has some: prepare runs every step)
        def banning(r) -> bool:  # (its stop ids are banned this step)
            return r.num_output_tokens_with_pending < r.params.min_tokens

        bias = None
        if any(r.params.logit_bias or banning(r) for r in reqs):
            bias = _no_biases(rows)
            for i, r in enumerate(reqs):
                entries = list((r.params.logit_bias or {}).items())
                if banning(r):
                    entries += [(t, -np.inf) for t in r.early_bans]
                bias[0][i, : len(entries)] = [t for t, _ in entries]
                bias[1][i, : len(entries)] = [b for _, b in entries]
        penalties, writes = None, []
        if any(p.needs_token_row for p in params):
            penalties = _no_penalties(rows)
            in_step = {id(r) for r in reqs}
            for i, r in enumerate(reqs):
                p = r.params
                if not p.needs_token_row:
                    continue
                slot = self.penalty_slots.slot(r, in_step, writes)
                penalties[0][i], penalties[2][i], penalties[3][i], penalties[4][i] = (
                    slot, p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
                if starts[i] + ns[i] >= r.num_tokens_with_pending:  # (its drawn token is kept: it is not a chunk)
                    penalties[1][i] = slot
                    self.penalty_slots.counted(slot)
        return PreparedStep(
            inp,
            do_sample=bias is not None or penalties is not None or any(not p.greedy for p in params),
            want_logprobs=any(p.logprobs is not None for p in params),
            want_prompt_lp=want_prompt_lp,
            draw_biases=bias,
            penalties=penalties,
            row_writes=tuple(writes),
        )

    def _lora_segments(self, token_slots: np.ndarray) -> LoraSegments | None:
        """The segment kernel's runs for this step, or None where the plan takes the one-hot form."""
        if not self.plan.lora_takes_segments(token_slots.shape[0]):
            return None
        return build_lora_segments(
            token_slots, max_segments=self.max_num_seqs, block_tokens=self.plan.lora_tuning.block_tokens
        )

    def launch(
        self,
        step: PreparedStep,
        adapters: AdapterStacks,
        prev_tokens: jax.Array | None = None,
        seq: int | None = None,
    ) -> StepOutputs:
        """Enqueues a prepared step, and the functions behind it that its requests need, on the device
        (the KV cache donated into the step) without waiting. `seq` numbers it (a follower process
        takes process 0's number)."""
        seq = self._launches if seq is None else seq
        self._launches = seq + 1
        if self.leader is None:
            return self._launch(seq, step, adapters, prev_tokens)
        # Process 0: the followers launch it too; a failure here leaves them a collective ahead (lost group).
        with self.leader.lockstep("launch", seq, step, self.recent.seq_of(prev_tokens)):
            return self._launch(seq, step, adapters, prev_tokens)

    def _launch(
        self, seq: int, step: PreparedStep, adapters: AdapterStacks, prev_tokens: jax.Array | None
    ) -> StepOutputs:
        compiled, start = self.num_compiled(), time.perf_counter()
        try:
            out, logits, hidden = self._launch_step(step, adapters, prev_tokens)
        except BaseException:
            if step.row_writes:  # (none written: the book, which counts them, cannot be trusted)
                self.penalty_slots.forget()
            raise
        if step.do_sample:
            tokens, token_lp = self._run_draw(step, logits, prev_tokens)
            out = out._replace(tokens=tokens, token_logprobs=token_lp)
        if step.want_logprobs:
            top_lp, top_ids, ranks = self._top(logits, out.tokens)
            out = out._replace(top_ids=top_ids, top_logprobs=top_lp, token_ranks=ranks)
        if step.want_prompt_lp:
            out = out._replace(prompt_logprobs=self._prompt_lp(self.params, hidden, step.inputs.prompt_targets))
        if self.num_compiled() > compiled:  # a first call returns once it is compiled (it runs async)
            groups = tuple(sorted(adapters)) if step.inputs.lora_slots is not None else ()
            self._record_compile(1, groups, time.perf_counter() - start, step.inputs.token_ids.shape[0])
        self.recent.add(seq, out.tokens)
        return out

    def _run_draw(self, step: PreparedStep, logits: jax.Array, prev_tokens: jax.Array | None):
        """The draw of a step's tokens (and logprobs): first the step's writes into the penalties' counts
        table, then the draw, which adjusts the logits (biases, penalties) and counts its tokens where the
        step has any adjustment."""
        packed, layout = self._sampling_inputs(step)
        if step.draw_biases is None and step.penalties is None:
            return self._draw(logits, packed, None, layout=layout)
        try:
            prev = self._no_prev_tokens if prev_tokens is None else prev_tokens
            for w in step.row_writes:
                self.penalty_counts = self._write_row(self.penalty_counts, np.int32(w.slot), w.row, prev,
                                                      np.int32(w.pending_row))  # fmt: skip
            tokens, token_lp, self.penalty_counts = self._draw(logits, packed, self.penalty_counts, layout=layout)
        except BaseException:
            # The table may be gone (donated to a call that failed) or hold counts the host does not know of.
            self.penalty_slots.forget()
            if self.penalty_counts.is_deleted():
                self.penalty_counts = self.tp.zeros(self.penalty_counts.shape, jnp.int32, P())
            raise
        return tokens, token_lp

    def _launch_step(self, step: PreparedStep, adapters: AdapterStacks, prev_tokens: jax.Array | None):
        """The step alone: (its outputs, logits f32[R, V], hidden [T, D] in the model's dtype), all on the
        device."""
        if self.layer_launches:
            return self._launch_layers(step, adapters, prev_tokens)
        args, static = self._step_args(step, adapters, prev_tokens)
        self.kv_caches, out, logits, hidden = self._step(*args, **static)
        return out, logits, hidden

    def _step_args(self, step: PreparedStep, adapters: AdapterStacks, prev_tokens: jax.Array | None):
        """The step function's (arguments, static arguments) for a prepared step."""
        # Base-only steps get no adapter stacks at all, so loading an adapter never changes (and
        # recompiles) their variant.
        stacks = adapters if step.inputs.lora_slots is not None else {}
        packed, layout = pack_inputs(step.inputs)
        prev = self._no_prev_tokens if prev_tokens is None else prev_tokens
        return (self.params, self.kv_caches, stacks, packed, prev), {"layout": layout}

    def num_compiled(self) -> int:
        """Executables compiled or loaded so far: the step (one per variant), the draw and the top-n (one
        per row count), and the prompt-logprob function (one per bucket, ahead of time by the warm-up)."""
        return sum(len(f) for f in self._executables())

    def num_loaded(self) -> int:
        """Of num_compiled(), those read from executable_dir (neither traced nor lowered)."""
        return sum(f.loaded for f in self._executables())

    def _executables(self) -> tuple[Executables, ...]:
        steps = (self._pre, self._layer, self._post) if self.layer_launches else (self._step,)
        return *steps, self._draw, self._top, self._prompt_lp, self._write_row

    def compile_log(self) -> list[tuple[str, float, float]]:
        """(variant, seconds, started: perf_counter) of every compilation of this runner's functions, the
        longest first (bench/startup_gpu.py reports them: on several threads, the longest bound a start's
        wall time)."""
        return sorted((x for f in self._executables() for x in f.compile_log), key=lambda x: -x[1])

    @property
    def num_step_variants(self) -> int:
        """Compiled variants of the step (with layer launches: of the layer group, one per step variant and
        group size: a last group of fewer layers is a variant of its own)."""
        return len(self._layer if self.layer_launches else self._step)

    # -- layer launches ----------------------------------------------------------------------------------
    # A step as 2 + num_layers / layers_per_launch launches: the embedding (`_pre`: it also unpacks the
    # step's inputs once), one compiled group of `layers_per_launch` layers called with each group's own
    # weights and KV caches (donated), and the final norm with the logits (`_post`). A cold start then
    # compiles one group per step variant instead of num_layers unrolled layers (bench/startup_gpu.py),
    # while each matmul still reads its own weight array, as in the unrolled step (a scanned loop over
    # stacked weights made XLA's GEMM fusions read through dynamic slices: bench/scan_layers.py). The cost
    # is the host's: a launch per group, which async scheduling overlaps with the device's work; too many
    # launches per step (one per layer) outrun what the host can queue ahead of the device
    # (bench/profile_step.py --layers-per-launch).

    def _init_layer_launches(self, model: Decoder, pad_rows, per_launch: int) -> None:
        cfg, plan = self.cfg, self.plan
        self._groups = [range(i, min(i + per_launch, cfg.num_layers)) for i in range(0, cfg.num_layers, per_launch)]
        self._layer_weights = [model.layer_weights(i) for i in range(cfg.num_layers)]
        self._head = model.head_weights()
        self._embed = model.embed[...]
        self._stack_slices: tuple[tuple, list] | None = None  # (the stacks they were cut from, per-layer stacks)

        def pre_fn(embed, packed, prev_tokens, layout):
            inp: StepInputs = unpack_inputs(packed, layout)
            token_ids = jnp.where(inp.token_src >= 0, prev_tokens[jnp.maximum(inp.token_src, 0)], inp.token_ids)
            meta = (inp.positions, inp.attn, inp.lora_slots, inp.lora_segments, inp.logits_indices)
            return embed_tokens(cfg, embed, token_ids), meta

        # One layer body for the group's layers: traced and lowered once per variant, not once per layer
        # (as the fused step's, jalora/model/decoder.py); XLA inlines the calls before it optimizes.
        body = jax.jit(functools.partial(decoder_layer, cfg, plan))

        def layer_fn(ws, x, k_caches, v_caches, stacks, meta):  # a group: a tuple of each per layer
            positions, attn, slots, segments, _ = meta
            ks, vs = [], []
            for w, k, v, st in zip(ws, k_caches, v_caches, stacks, strict=True):
                lora = None if slots is None else LoraBatch(st, slots, segments)
                x, k, v = body(x, positions, w, k, v, attn, lora)
                ks.append(k)
                vs.append(v)
            return x, tuple(ks), tuple(vs)

        def post_fn(head, x, logits_indices):
            norm, w = head
            hidden = rms_norm(x, norm, cfg.rms_norm_eps)
            logits = logits_of(cfg, w, hidden[logits_indices])
            tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return StepOutputs(pad_rows(tokens), _logprob_of(logits, tokens), None, None, None), logits, hidden

        def slice_fn(stacks):  # each layer's slice of every stack, in one launch per set of stacks
            return [layer_stacks(stacks, i) for i in range(cfg.num_layers)]

        self._pre = self._executables_of(pre_fn, "pre", static_argnames=("layout",),
                                         variant_key=lambda args, static: static["layout"],
                                         describe=lambda args, static: _describe_step("pre",
                                                                                      static["layout"]))  # fmt: skip
        self._layer = self._executables_of(layer_fn, "layer", donate_argnums=(2, 3),
                                           variant_key=_layer_variant, describe=_describe_layer)  # fmt: skip
        self._post = self._executables_of(post_fn, "post",
                                          variant_key=lambda args, _: args[1].shape,  # (the step's rows)
                                          describe=lambda args, _: f"post T={args[1].shape[0]}")  # fmt: skip
        self._slice_stacks = jax.jit(slice_fn)

    def _layer_stacks(self, adapters: AdapterStacks) -> list:
        """Per layer, its slice of each adapter stack: cut once per set of stacks (an adapter load or
        swap makes new ones), so a layer launch reads its adapters as it reads its weights."""
        source = tuple((g, st.a, st.b, st.a_flat) for g, st in sorted(adapters.items()))
        kept = self._stack_slices
        if kept is None or len(kept[0]) != len(source) or any(
            x is not y for old, new in zip(kept[0], source) for x, y in zip(old, new)
        ):
            kept = self._stack_slices = (source, self._slice_stacks(adapters))
        return kept[1]

    def _layer_calls(self, step: PreparedStep, adapters: AdapterStacks, prev_tokens: jax.Array | None):
        """(pre's arguments, its layout, the per-layer adapter stacks) of a step with layer launches."""
        packed, layout = pack_inputs(step.inputs)
        prev = self._no_prev_tokens if prev_tokens is None else prev_tokens
        adapted = step.inputs.lora_slots is not None and bool(adapters)
        stacks = self._layer_stacks(adapters) if adapted else [{}] * self.cfg.num_layers
        return (self._embed, packed, prev), layout, stacks

    def _group_args(self, group: range, x, stacks: list, meta) -> tuple:
        """A layer group's arguments: its layers' weights, the hidden states, its K and V caches, its
        layers' adapter stacks and the step's metadata."""
        caches = self.kv_caches
        return (tuple(self._layer_weights[i] for i in group), x, tuple(caches[i][0] for i in group),
                tuple(caches[i][1] for i in group), tuple(stacks[i] for i in group), meta)  # fmt: skip

    def _launch_layers(self, step: PreparedStep, adapters: AdapterStacks, prev_tokens: jax.Array | None):
        args, layout, stacks = self._layer_calls(step, adapters, prev_tokens)
        x, meta = self._pre(*args, layout=layout)
        caches = self.kv_caches = list(self.kv_caches)  # (updated group by group: a failed launch leaves
        # the groups before it updated and its own donated caches deleted, which kv_cache_deleted sees)
        by_size: dict[int, Any] = {}  # the compiled group of each size (the last group may be smaller)
        for group in self._groups:
            group_args = self._group_args(group, x, stacks, meta)
            if (layer := by_size.get(len(group))) is None:
                layer = by_size[len(group)] = self._layer.get(*group_args)
            x, ks, vs = layer(*group_args)
            for i, k, v in zip(group, ks, vs, strict=True):
                caches[i] = (k, v)
        return self._post(self._head, x, meta[4])

    def _layer_compile_calls(self, step: PreparedStep, adapters: AdapterStacks) -> list:
        """What compiles a step variant with layer launches, for `get_all`: pre, the layer and post, the
        last two from the shapes pre returns (traced, not run)."""
        args, layout, stacks = self._layer_calls(step, adapters, None)
        traced = jax.eval_shape(functools.partial(self._pre._jit, layout=layout), *args)
        x, meta = jax.tree.map(self._like_weights, traced)
        sizes = {len(g): g for g in self._groups}  # (one group of each size)
        layers = [(self._layer, (self._group_args(g, x, stacks, meta), {})) for g in sizes.values()]
        return [(self._pre, (args, {"layout": layout})), *layers, (self._post, ((self._head, x, meta[4]), {}))]

    def _like_weights(self, spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        """A traced output's shape on the weights' device, as the launch's real arrays are."""
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=self._embed.sharding, weak_type=spec.weak_type)

    @staticmethod
    def _sampling_inputs(step: PreparedStep, adjust: bool = False) -> tuple[np.ndarray, tuple]:
        """The draw's (packed, layout) arguments: the step's per-row sampling parameters, with its logit biases
        and penalties where it has either (the other one neutral; with `adjust`, both neutral where it has
        neither: the warm-up's other draw of each row count)."""
        inp = step.inputs
        rows = inp.temperature.shape[0]
        extra = ()
        if adjust or step.draw_biases is not None or step.penalties is not None:
            extra = (*(step.draw_biases or _no_biases(rows)), *(step.penalties or _no_penalties(rows)))
        return pack_inputs(
            SamplingInputs(inp.temperature, inp.top_k, inp.top_p, inp.seeds, inp.counters, inp.min_p, *extra)
        )

    def _record_compile(self, count: int, groups: tuple[str, ...], seconds: float, num_tokens: int = 0) -> None:
        """First uses of `count` step variants (compiled or loaded, with the functions behind them) that
        took `seconds`: by the warm-up, or by a step of `num_tokens` rows while serving."""
        c = self.compiles
        if self._warming_up:
            c.warmup, c.warmup_seconds = c.warmup + count, c.warmup_seconds + seconds
            what = f"the warm-up's {count} step variants"
        else:
            c.serving, c.serving_seconds = c.serving + count, c.serving_seconds + seconds
            what = f"the {num_tokens}-token step"
        logger.info("compiled %s%s%s in %.2f s", what, " with adapters " if groups else "", "+".join(groups), seconds)

    def kv_cache_deleted(self) -> bool:
        """After a failed step: True if the cache donated into it is gone."""
        return any(k.is_deleted() or v.is_deleted() for k, v in self.kv_caches)

    def reset_kv_cache(self) -> None:
        """A zeroed cache in place of one that is gone or cannot be trusted; the penalties' counts table too,
        which the same failed launch wrote (its draw's output), every row of it to be written again."""
        if self.leader is None:
            self._zero_kv_cache()
            return
        with self.leader.lockstep("reset_kv_cache"):
            self._zero_kv_cache()

    def _zero_kv_cache(self) -> None:
        zeros = self.tp.zeros
        self.kv_caches = [tuple(zeros(c.shape, c.dtype, KV_SPEC) for c in kv) for kv in self.kv_caches]
        self.penalty_counts = zeros(self.penalty_counts.shape, jnp.int32, P())
        self.penalty_slots.forget()

    def gather_kv_blocks(self, blocks: np.ndarray) -> jax.Array:
        """Enqueues a copy of cache blocks `blocks` (i32[n]) for the host tier; returns the device array
        [n, layers, 2, block_size, kv heads, head_dim] (not waited for). Enqueued before the step that
        overwrites them, it reads their KV as it was. Where the devices have pinned host memory the
        result is moved there by the device (`device_put`, queued like the gather), so the tier's thread
        only copies host memory. Measured on the H200 (bench/host_tier_cost.py, 16 Granite-8B blocks per
        step, 42 MB): `copy_to_host_async` on the engine's thread held it for the whole transfer (20 ms per
        step); reading the device array on the tier's thread instead still stalled steps (mean 13.7 ms vs
        5.7 ms without copies); through pinned host memory 7.7 ms."""
        out = self._gather(self.kv_caches, blocks)
        if self._pinned_host:
            out = jax.device_put(out, out.sharding.with_memory_kind("pinned_host"))
        return out

    def put_kv_blocks(self, data: np.ndarray) -> jax.Array:
        """Host blocks ([n, layers, 2, block_size, kv heads, head_dim]) on the device(s), laid out as the
        cache (each device its own KV heads). Any thread: the host tier's worker calls it."""
        if self.tp.sharded:
            return self.tp.put(data, P(None, None, None, None, AXIS, None))
        return jax.device_put(data)  # (uncommitted, as a numpy argument would be: the cache's sharding
        # after the scatter stays what the step was compiled for)

    def scatter_kv_blocks(self, blocks: np.ndarray, data: jax.Array) -> None:
        """Enqueues writing `data` (from `put_kv_blocks`) into cache blocks `blocks` (i32[n]), the cache
        donated (as a step's); the next step reads them after it."""
        self.kv_caches = self._scatter(self.kv_caches, blocks, data)

    def warmup_kv_moves(self) -> None:
        """Compiles the host tier's copies for each size a run of them is split into (each block written
        back with the KV it holds: nothing changes)."""
        for n in move_sizes(self.kv_caches[0][0].shape[0]):
            blocks = np.arange(n, dtype=np.int32)
            self.scatter_kv_blocks(blocks, self.put_kv_blocks(np.asarray(self.gather_kv_blocks(blocks))))
        jax.block_until_ready(self.kv_caches)

    def dispatch(
        self,
        batch: ScheduledBatch,
        adapters: AdapterStacks,
        prev_tokens: jax.Array | None = None,
        prev_step: int | None = None,
    ) -> StepOutputs:
        """Prepares and enqueues one step, and starts copying its outputs back, without waiting;
        `prev_tokens` are the tokens sampled by step `prev_step`, which feed this step's pending ones."""
        out = self.launch(self.prepare(batch, prev_step), adapters, prev_tokens)
        for x in out:
            if x is not None:
                _local(x).copy_to_host_async()  # the copy back starts as soon as the step ends
        return out

    @staticmethod
    def fetch(out: StepOutputs) -> StepResult:
        """Waits for a dispatched step and brings its results to the host."""
        return StepResult(*jax.device_get(tuple(None if x is None else _local(x) for x in out)))

    def warmup(self, progress: bool = True, adapters: AdapterStacks | None = None, with_base: bool = False) -> None:
        """Compiles everything a step of every token bucket can run: the step (base-only, or with the
        adapter path; with `adapters` and `with_base`, both), each variant run once, and the draw, top-n
        and prompt-logprob functions behind it (the draw and the top-n run once; the prompt logprobs only
        compiled: for the largest bucket they would compute a [T, V] logits matrix at every start).
        The compilations come in one wave on a thread per core (`executables.get_all`; on a GPU only as
        many at once as its free memory lets autotune: `_compile_limits`), which waits for its longest
        one: every step variant (all of them together: a start whose adapters are known, a server's, waits
        once, not once per kind) and every function behind them, from the shapes the steps return (`_function_calls`);
        the host tier's few small copies compile after that."""
        from tqdm import tqdm

        kinds = [adapters] if adapters and not with_base else [None] + ([adapters] if adapters else [])
        desc = "jalora warm-up" + (" (adapters)" if adapters and not with_base else "")
        groups = () if with_base else tuple(sorted(adapters or {}))  # (the log's "with adapters ...")
        cores, device_bytes = _compile_limits()
        self._warming_up = True
        try:
            compiled, variants, start = self.num_compiled(), self.num_step_variants, time.perf_counter()
            # seconds of each part (bench/startup_gpu.py reports them)
            phases = {"kinds": len(kinds), "workers": cores, "compile_device_bytes": device_bytes}
            steps = self._warmup_steps(kinds)
            if self.layer_launches:
                work = [(fn, [call]) for a, step in steps for fn, call in self._layer_compile_calls(step, a)]
            else:
                work = [(self._step, [self._step_args(step, a, None) for a, step in steps])]
            # The functions behind the steps compile in the same wave, from the shapes the steps return.
            get_all(work + self._function_calls([step for _, step in steps]), cores, device_bytes)
            phases["steps_compile_s"] = (t := time.perf_counter()) - start
            # (compilations that ran out of device memory beside others, compiled again alone: `get_all`)
            phases["compiled_alone"] = sum(f.compiled_alone for f in self._executables())
            # The draw's and top-n's inputs, kept once per shape to run them, and the prompt logprobs' (the
            # hidden states' shape only): compiled above unless a step returned other shapes.
            draws: dict[tuple, tuple] = {}
            prompt_lp_args = []
            late = self.num_compiled()
            # Bars only on a terminal: piped into a log (a server's stderr) they would be noise.
            for a, step in tqdm(steps, desc=desc, disable=None if progress else True):
                out, logits, hidden = self._launch_step(step, a, None)
                jax.block_until_ready(out)
                for adjust in (False, True):  # (a step with a logit_bias or a penalty draws with its own layout)
                    packed, layout = self._sampling_inputs(step, adjust)
                    draws.setdefault((logits.shape, layout), (logits, packed, layout, adjust))
                prompt_lp_args.append((self.params, _spec(hidden), step.inputs.prompt_targets))
            phases["steps_run_s"] = (t2 := time.perf_counter()) - t
            get_all([
                (self._draw, [((logits, packed, self._counts_if(adjust)), {"layout": layout})
                              for logits, packed, layout, adjust in draws.values()]),
                (self._top, [((logits, out.tokens), {}) for logits, *_ in draws.values()]),
                (self._prompt_lp, [(args, {}) for args in prompt_lp_args]),
            ], cores, device_bytes)  # fmt: skip
            phases["functions_compile_s"] = (t := time.perf_counter()) - t2
            phases["functions_compiled_late"] = self.num_compiled() - late  # (0: all in the steps' wave)
            for logits, packed, layout, adjust in draws.values():  # (an adjusted draw with nothing to adjust or
                drawn = self._draw(logits, packed, self._counts_if(adjust), layout=layout)  # count: the same table)
                if adjust:
                    self.penalty_counts = drawn[2]
                jax.block_until_ready((drawn, self._top(logits, out.tokens)))
            phases["functions_run_s"] = time.perf_counter() - t
            self.warmup_phases.append(phases)
            if self.num_compiled() > compiled:  # (counted as the step's variants, with the functions' seconds)
                self._record_compile(self.num_step_variants - variants, groups, time.perf_counter() - start)
            if self.kv_moves and None in kinds:
                self.warmup_kv_moves()
        finally:
            self._warming_up = False

    def _warmup_steps(self, kinds: list[AdapterStacks | None]) -> list[tuple[AdapterStacks, PreparedStep]]:
        """Every step variant the warm-up compiles for these adapter kinds (None: base-only), as (stacks,
        step), in the order their compilations start (each is lowered on the warm-up's thread, then
        queued): the longest first, since the wave waits for its last. First the variants with their own
        attention kernels, the long-context grid's and the long-chunk ones: on an H100 at 8d36705 each took
        11-12 s to compile with XLA's autotuning off, against 2-4 s for a bucket's, and that time autotuning
        does not shorten (with it, the large buckets took 12-19 s, as long or longer, but many at once;
        bench/results/startup_gpu*_h100_8d36705.json). Queued after the buckets, the long-chunk ones began
        25 s into the first warm-up and 11 s into the second (with autotuning, the default), and each wave
        ended with them; queued first,
        the H200's cold start went from 71.3 to 57.7 s (startup_gpu_cold_h200_*.json). Then the buckets
        from the largest, then the split-prefill ones. Adapted variants (more to compile) before base-only
        ones."""
        order = kinds[::-1]
        steps = []
        if self.long_decode:  # (the smallest bucket's long-context variant)
            steps += [(a or {}, self._warmup_step(self.buckets[0], a, long=True)) for a in order]
        # (the small buckets' long-chunk variants; then every bucket; then the large buckets' one-sequence
        # prefill variants)
        groups = (("chunk", self.long_chunk_buckets), (None, self.buckets), ("split", self.split_prefill_buckets))
        for flag, buckets in groups:
            kw = {flag: True} if flag else {}
            steps += [(a or {}, self._warmup_step(t, a, **kw)) for t in buckets[::-1] for a in order]
        return steps

    def _function_calls(self, steps: list[PreparedStep]) -> list:
        """What compiles the functions behind `steps` before they run, for `get_all`: the draw and the
        top-n of their logits (f32[R, V], R the rows of logits_indices) and the prompt logprobs of their
        final hidden states ([T, D] in the model's dtype), placed as the steps' outputs are."""
        like = self._no_prev_tokens.sharding  # (every step output: replicated, on the device(s) of the step)
        draws, tops, prompt_lps = [], [], []
        for step in steps:
            rows, tokens = step.inputs.logits_indices.shape[0], step.inputs.token_ids.shape[0]
            logits = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), jnp.float32, sharding=like)
            hidden = jax.ShapeDtypeStruct((tokens, self.cfg.hidden_size), self._hidden_dtype, sharding=like)
            for adjust in (False, True):
                packed, layout = self._sampling_inputs(step, adjust)
                draws.append(((logits, packed, self._counts_if(adjust)), {"layout": layout}))
            tops.append(((logits, self._no_prev_tokens), {}))
            prompt_lps.append(((self.params, hidden, step.inputs.prompt_targets), {}))
        write_rows = [(self._write_row_args(), {})]
        return [(self._draw, draws), (self._top, tops), (self._prompt_lp, prompt_lps), (self._write_row, write_rows)]

    def _counts_if(self, adjust: bool) -> jax.Array | None:
        """The draw's counts-table argument: the table for a draw that adjusts logits, else None."""
        return self.penalty_counts if adjust else None

    def _write_row_args(self) -> tuple:
        """The arguments of a counts-table row write (the warm-up compiles it; it runs none: a row may be live)."""
        row = np.zeros(self.cfg.vocab_size, np.int32)
        return self.penalty_counts, np.int32(0), row, self._no_prev_tokens, np.int32(-1)

    def _warmup_step(
        self, t: int, adapters: AdapterStacks | None, long: bool = False, split: bool = False, chunk: bool = False
    ) -> PreparedStep:
        """A step of `t` padding rows: the shapes of any step of that bucket (adapted: every row in slot 0;
        `long`: with the long-context attention grid; `split`: as one sequence's prefill chunk, split; `chunk`:
        the long-chunk attention variant)."""
        step = self.prepare(_WarmupBatch(t))
        if long or split or chunk:
            flag = np.ones(1, np.int32)
            attn = step.inputs.attn._replace(long_context=flag if long else None, split_prefill=flag if split else None,
                                             long_chunk=flag if chunk else None)  # fmt: skip
            step = dataclasses.replace(step, inputs=step.inputs._replace(attn=attn))
        if not adapters:
            return step
        slots = np.zeros(t, np.int32)
        inputs = step.inputs._replace(lora_slots=slots, lora_segments=self._lora_segments(slots))
        return dataclasses.replace(step, inputs=inputs)


def move_sizes(num_blocks: int) -> list[int]:
    """The block counts the host tier's copies run with: powers of two up to MAX_MOVE_BLOCKS (and the cache)."""
    return [1 << i for i in range(MAX_MOVE_BLOCKS.bit_length()) if 1 << i <= min(MAX_MOVE_BLOCKS, num_blocks)]


# Device memory the warm-up leaves to everything but its compilations' autotuning (the allocator's
# fragmentation, the runtime's own buffers).
COMPILE_RESERVE_BYTES = 512 << 20


def _compile_limits() -> tuple[int, int | None]:
    """Compilations the warm-up runs at once: a thread per usable core, and on a GPU the device memory
    still free, which their autotuning shares (`executables.get_all`'s `device_bytes`): the KV cache already
    fills its share, and 16 compilations at once with no bound ran an H100 out of memory."""
    cores = _usable_cores()
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform == "gpu" and hasattr(dev, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return cores, None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return cores, max(0, free - COMPILE_RESERVE_BYTES)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _step_variant(args: tuple, static: dict) -> tuple:
    """What picks a compiled variant of the step: its layout (static) and the adapter groups' stacks (every
    other argument has one shape per engine)."""
    return static["layout"], _stacks_key(args[2])


def _layer_variant(args: tuple, static: dict) -> tuple:
    """What picks a compiled variant of a layer group: its size, the step's rows, the adapter stacks'
    shapes, whether (and how) the step adapts tokens and its attention variant (long-context grid, split prefill,
    long chunk)."""
    ws, x, stacks, (_, attn, slots, segments, _) = args[0], args[1], args[4], args[5]
    runs = None if segments is None else tuple(s.shape for s in jax.tree.leaves(segments))
    return (len(ws), x.shape, slots is None, runs, _stacks_key(stacks[0]), attn.long_context is None,
            attn.split_prefill is None, attn.long_chunk is None)  # fmt: skip


def _describe_step(name: str, layout: tuple, stacks: AdapterStacks | None = None) -> str:
    """A step variant (or its `pre`) by its rows, adapter path and attention grid, for the compile log."""
    inp: StepInputs = jax.tree.unflatten(layout[0], [shape for shape, _ in layout[1]])
    flags = ("" if inp.lora_slots is None else " adapted") + _attn_flags(inp.attn)
    return f"{name} T={inp.token_ids[0]}{flags}{' ' + '+'.join(sorted(stacks)) if stacks else ''}"


def _describe_layer(args: tuple, static: dict) -> str:
    """A layer group variant by its size, rows, adapter path and attention grid, for the compile log."""
    ws, x, (_, attn, slots, _, _) = args[0], args[1], args[5]
    flags = ("" if slots is None else " adapted") + _attn_flags(attn)
    return f"layer x{len(ws)} T={x.shape[0]}{flags}"


def _attn_flags(attn) -> str:
    """The attention variant of a step, for the compile log: the long-context grid, the split prefill or the
    long chunk."""
    return (("" if attn.long_context is None else " long") + ("" if attn.split_prefill is None else " split-prefill")
            + ("" if attn.long_chunk is None else " long-chunk"))


def _stacks_key(stacks: AdapterStacks) -> tuple:
    """The adapter groups' stacks as a compiled variant sees them: their shapes and dtype."""
    return tuple(
        (g, s.a.shape, s.b.shape, s.a.dtype, None if s.a_flat is None else s.a_flat.shape)
        for g, s in sorted(stacks.items())
    )


def _spec(x: jax.Array) -> jax.ShapeDtypeStruct:
    """What compiling a function of `x` needs of it (its variant key is the same as `x`'s)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type)


def _local(x: jax.Array) -> jax.Array:
    """A step output this process can read: itself, or over several hosts its copy on a local device
    (every output is replicated)."""
    return x if x.is_fully_addressable else x.addressable_data(0)


def _logprob_of(logits, tokens):  # f32[R, V], i32[R] -> f32[R]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


class _WarmupBatch:
    """A batch of zero sequences padded to `t` tokens: compiles the bucket without touching the cache."""

    def __init__(self, t: int):
        self.requests, self.num_tokens, self.total_tokens = [], [], t
