"""Turns a scheduled batch into padded arrays and runs the one jitted step on the device.

Shapes are bucketed: the flattened token count T is padded to a power of two (>= 16) and the
sequence axis to `max_num_seqs`, so the number of compilations stays small and fixed. The KV cache
is donated into the step and comes back updated in place.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalora.model import AttentionMetadata, Decoder, LoraBatch
from jalora.sampler import sample
from jalora.sampling_params import MAX_LOGPROBS
from jalora.scheduler import ScheduledBatch
from pallas_kernels.masked_lora import LoraSegments, build_lora_segments

MIN_BUCKET = 16


class StepInputs(NamedTuple):
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    lora_segments: LoraSegments | None  # adapted-token runs; None when no token of the step is adapted
    prompt_targets: jax.Array  # i32[T] next prompt token (for prompt logprobs), -1 = none
    attn: AttentionMetadata
    logits_indices: jax.Array  # i32[S] row of each sequence's last token
    temperature: jax.Array  # f32[S]
    top_k: jax.Array  # i32[S]
    top_p: jax.Array  # f32[S]
    seeds: jax.Array  # u32[S]
    counters: jax.Array  # i32[S]


class StepResult(NamedTuple):
    tokens: np.ndarray  # i32[S]
    token_logprobs: np.ndarray  # f32[S]
    top_ids: np.ndarray | None  # i32[S, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None  # f32[S, MAX_LOGPROBS]
    prompt_logprobs: np.ndarray | None  # f32[T]


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    top = max(MIN_BUCKET, 1 << math.ceil(math.log2(max_num_batched_tokens)))
    return [1 << i for i in range(int(math.log2(MIN_BUCKET)), int(math.log2(top)) + 1)]


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
    ):
        cfg = model.cfg
        self.cfg = cfg
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_model_len // block_size)
        self.buckets = token_buckets(max_num_batched_tokens)
        self.graphdef, self.state = nnx.split(model)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)) for _ in range(cfg.num_layers)]
        self.lora_weights: dict = {}  # group -> (A [L, n, Din, R], B [L, n, R, Dout]); see adapters.py
        graphdef = self.graphdef

        def step_fn(state, kv_caches, lora_weights, inp: StepInputs, do_sample, want_logprobs, want_prompt_lp):
            model = nnx.merge(graphdef, state)
            lora = LoraBatch(lora_weights, inp.lora_segments) if inp.lora_segments is not None else None
            hidden, kv_caches = model(inp.token_ids, inp.positions, kv_caches, inp.attn, lora)
            logits = model.logits(hidden[inp.logits_indices])
            tokens = sample(
                logits, inp.temperature, inp.top_k, inp.top_p, inp.seeds, inp.counters, do_sample=do_sample
            )
            lp = jax.nn.log_softmax(logits, axis=-1)
            token_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
            top = jax.lax.top_k(lp, MAX_LOGPROBS) if want_logprobs else (None, None)
            prompt_lp = None
            if want_prompt_lp:
                all_lp = jax.nn.log_softmax(model.logits(hidden), axis=-1)
                targets = jnp.maximum(inp.prompt_targets, 0)
                prompt_lp = jnp.take_along_axis(all_lp, targets[:, None], axis=-1)[:, 0]
            return kv_caches, (tokens, token_lp, top[1], top[0], prompt_lp)

        self._step = jax.jit(
            step_fn, static_argnames=("do_sample", "want_logprobs", "want_prompt_lp"), donate_argnums=(1,)
        )

    def bucket(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.buckets[-1]}")

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, dict]:
        """Host side: numpy arrays for one step. Work is O(tokens + sequences * pages)."""
        t = self.bucket(batch.total_tokens)
        s = self.max_num_seqs
        bs = self.block_size
        token_ids = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slot_mapping = np.full(t, -1, np.int32)
        token_slots = np.full(t, -1, np.int32)
        prompt_targets = np.full(t, -1, np.int32)
        kv_lens = np.zeros(s, np.int32)
        page_indices = np.zeros((s, self.max_pages), np.int32)
        cu = np.zeros(s + 1, np.int32)
        logits_indices = np.zeros(s, np.int32)
        temperature = np.zeros(s, np.float32)
        top_k = np.zeros(s, np.int32)
        top_p = np.ones(s, np.float32)
        seeds = np.zeros(s, np.uint32)
        counters = np.zeros(s, np.int32)
        flags = {"do_sample": False, "want_logprobs": False, "want_prompt_lp": False}
        off = 0
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            start = req.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            token_ids[off : off + n] = req.all_token_ids[start : start + n]
            positions[off : off + n] = pos
            blocks = np.asarray(req.block_ids, np.int32)
            slot_mapping[off : off + n] = blocks[pos // bs] * bs + pos % bs
            if req.adapter_slot >= 0:
                token_slots[off : off + n] = np.where(pos >= req.activation_start, req.adapter_slot, -1)
            p = req.params
            if p.prompt_logprobs:
                nxt = pos + 1
                ok = nxt < len(req.prompt_token_ids)
                prompt_targets[off : off + n][ok] = np.asarray(req.prompt_token_ids)[nxt[ok]]
                flags["want_prompt_lp"] = True
            kv_lens[i] = start + n
            page_indices[i, : len(blocks)] = blocks
            cu[i + 1] = off + n
            logits_indices[i] = off + n - 1
            temperature[i] = p.temperature
            top_k[i] = p.top_k
            top_p[i] = p.top_p
            seeds[i] = req.seed
            counters[i] = len(req.output_token_ids)
            flags["do_sample"] |= not p.greedy
            flags["want_logprobs"] |= p.logprobs is not None
            off += n
        cu[len(batch.requests) + 1 :] = off
        attn = AttentionMetadata(
            slot_mapping, kv_lens, page_indices, cu, np.array([len(batch.requests)], np.int32)
        )
        segments = None
        if (token_slots >= 0).any():  # base-only steps skip the LoRA path entirely (another compilation)
            segments = build_lora_segments(token_slots, max_segments=s)
        inp = StepInputs(
            token_ids, positions, segments, prompt_targets, attn, logits_indices,
            temperature, top_k, top_p, seeds, counters,
        )  # fmt: skip
        return inp, flags

    def _run(self, inp: StepInputs, flags: dict):
        # Base-only steps get no adapter stacks at all, so loading an adapter never changes (and
        # recompiles) their variant.
        weights = self.lora_weights if inp.lora_segments is not None else {}
        self.kv_caches, out = self._step(self.state, self.kv_caches, weights, inp, **flags)
        return out

    def kv_cache_lost(self) -> bool:
        """After a failed step: True if the donated cache is gone; a zeroed one then replaces it."""
        if not any(k.is_deleted() or v.is_deleted() for k, v in self.kv_caches):
            return False
        self.kv_caches = [(jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype)) for k, v in self.kv_caches]
        return True

    def execute(self, batch: ScheduledBatch) -> StepResult:
        inp, flags = self.prepare(batch)
        out = self._run(inp, flags)
        tokens, token_lp, top_ids, top_lp, prompt_lp = jax.device_get(out)
        return StepResult(tokens, token_lp, top_ids, top_lp, prompt_lp)

    def warmup(self, progress: bool = True, lora: bool = False) -> None:
        """Compiles the greedy step for every token bucket: base-only, or with the adapter path."""
        from tqdm import tqdm

        desc = "jalora warm-up (adapters)" if lora else "jalora warm-up"
        for t in tqdm(self.buckets, desc=desc, disable=not progress):
            inp, flags = self.prepare(_WarmupBatch(t))
            if lora:  # every padding row in slot 0: the shapes of any adapted step of this bucket
                inp = inp._replace(lora_segments=build_lora_segments(np.zeros(t, np.int32), self.max_num_seqs))
            jax.block_until_ready(self._run(inp, flags))


class _WarmupBatch:
    """A batch of zero sequences padded to `t` tokens: compiles the bucket without touching the cache."""

    def __init__(self, t: int):
        self.requests, self.num_tokens, self.total_tokens = [], [], t
