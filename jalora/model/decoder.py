"""Flax NNX decoder for the Llama / Granite / Mistral families over a paged KV cache.

The module holds parameters only; everything that changes per step (tokens, KV cache, attention
metadata, adapter stacks and per-token adapter slots) is an explicit argument, so one pure jitted
function (see model_runner.py) runs a whole ragged batch and returns the new caches.

Projections are fused as on the serving path: q/k/v into one [D, Dq + 2*Dkv] matmul and gate/up into
one [D, 2F] matmul; adapters follow the same fusion (jalora/adapters/manager.py). Which kernel runs
attention and masked LoRA is the engine's KernelPlan, a static attribute of the module.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jalora.adapters.manager import AdapterStacks, LoraStack
from jalora.model.config import ModelConfig
from jalora.model.kernel_plan import KernelPlan
from pallas_kernels.masked_lora import LoraSegments, masked_lora_add, masked_lora_onehot_flat
from pallas_kernels.ragged_paged_attention import (
    apply_rope,
    ragged_paged_attention,
    split_prefill_attention,
    write_kv_rope,
)
from pallas_kernels.rms_norm import add_rms_norm
from pallas_kernels.rms_norm import rms_norm_reference as rms_norm


class AttentionMetadata(NamedTuple):
    slot_mapping: jax.Array  # i32[T] flat cache slot of each token; -1 = padding
    kv_lens: jax.Array  # i32[S] context length after this step
    page_indices: jax.Array  # i32[S, P]
    cu_q_lens: jax.Array  # i32[S + 1]
    num_seqs: jax.Array  # i32[1]
    # None, or i32[1] (any value) where the step decodes one token for each of few sequences with a long
    # context: the GPU kernel's long-context grid (a compiled variant of its own; KernelPlan.long_decode)
    long_context: jax.Array | None = None
    # None, or i32[1] (any value) where the step's last sequence is a prefill chunk that runs split into
    # prefix and self attention through a library (KernelPlan.split_prefill; a compiled variant of its own)
    split_prefill: jax.Array | None = None
    # None, or i32[1] (any value) where a small decode-shaped step holds a sequence of several rows and a
    # long context: the GPU kernel's long-chunk variant (KernelPlan.long_chunk; a compiled variant of its own)
    long_chunk: jax.Array | None = None


class LoraBatch(NamedTuple):
    """Adapter stacks (scaling folded into B, ranks zero-padded) and this step's adapted tokens."""

    stacks: AdapterStacks  # group -> LoraStack
    token_slots: jax.Array  # i32[T] adapter slot of each token row, -1 = base token or padding
    segments: LoraSegments | None  # runs of tokens per slot for the segment kernel; None = one-hot form


def masked_lora_fn(y, x, a, b, a_flat, lora: LoraBatch, plan: KernelPlan):
    """y [T, Dout] + the LoRA delta of adapted tokens only (a, b, a_flat: one layer of a LoraStack).

    With segments: the plan's masked multi-LoRA kernel (slot -1 rows cost nothing; long prefills).
    Without: two dense matmuls against every slot, masked per row (decode-sized steps, and the CPU).
    """
    if lora.segments is not None:
        return masked_lora_add(y, x, a, b, lora.segments, impl=plan.lora, interpret=plan.interpret_arg(plan.lora))
    if a_flat is None:
        raise ValueError("the one-hot LoRA form needs the flat A stack (the plan takes segments for every step)")
    delta = masked_lora_onehot_flat(x, a_flat, b, lora.token_slots)
    return (y.astype(jnp.float32) + delta).astype(y.dtype)


def rope_inv_freq(cfg: ModelConfig):
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv / float(rs["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, smooth blend in between.
    factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * jnp.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
    mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    return jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def _param(shape, dtype):
    # Placeholder values: real weights come from checkpoint.py (loaded or dummy) via nnx.merge.
    return nnx.Param(jnp.zeros(shape, dtype))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        qkv = cfg.q_size + 2 * cfg.kv_size
        self.input_norm = _param((d,), dtype)
        self.w_qkv = _param((d, qkv), dtype)
        self.b_qkv = _param((qkv,), dtype) if cfg.attention_bias else None
        self.w_o = _param((cfg.q_size, d), dtype)
        self.b_o = _param((d,), dtype) if cfg.attention_bias else None
        self.post_norm = _param((d,), dtype)
        self.w_gate_up = _param((d, 2 * f), dtype)
        self.b_gate_up = _param((2 * f,), dtype) if cfg.mlp_bias else None
        self.w_down = _param((f, d), dtype)
        self.b_down = _param((d,), dtype) if cfg.mlp_bias else None


class Decoder(nnx.Module):
    """With `tp_axis` the module is one device's part of a tensor-parallel model (jalora/model/sharding.py):
    `cfg` then holds that device's heads, features and vocabulary rows, `vocab_size` the whole
    vocabulary, and the call runs inside shard_map over the mesh axis `tp_axis`."""

    def __init__(
        self, cfg: ModelConfig, plan: KernelPlan, dtype=jnp.float32, tp_axis: str | None = None, vocab_size=None
    ):
        self.cfg = cfg
        self.plan = plan
        self.tp_axis = tp_axis
        self.vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])
        self.norm = _param((cfg.hidden_size,), dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _param((cfg.hidden_size, cfg.vocab_size), dtype)

    def __call__(
        self,
        token_ids,  # i32[T]
        positions,  # i32[T]
        kv_caches,  # list over layers of (K, V), each [num_blocks, block_size, Hkv, D]
        attn: AttentionMetadata,
        lora: LoraBatch | None,
    ):
        """Returns (hidden [T, D] after the final norm, new kv_caches)."""
        cfg = self.cfg
        tp_axis = self.tp_axis
        x = embed_tokens(cfg, self.embed[...], token_ids, tp_axis)
        inv_freq = rope_inv_freq(cfg)
        # One layer body for all layers: a jitted function called once per layer with the same shapes is
        # traced and lowered once (a private function of the step's module, called num_layers times),
        # where a plain loop traced and lowered every layer again; XLA inlines the calls before it
        # optimizes, so the compiled step is the unrolled one.
        body = jax.jit(functools.partial(_layer, cfg, self.plan, tp_axis))
        new_caches = []
        for i in range(cfg.num_layers):
            stacks = None
            if lora is not None:
                stacks = LoraBatch(layer_stacks(lora.stacks, i), lora.token_slots, lora.segments)
            x, k_cache, v_cache = body(x, positions, inv_freq, self.layer_weights(i), kv_caches[i][0],
                                       kv_caches[i][1], attn, stacks)  # fmt: skip
            new_caches.append((k_cache, v_cache))
        return rms_norm(x, self.norm[...], cfg.rms_norm_eps), new_caches

    def layer_weights(self, i: int) -> dict:
        """Layer `i`'s arrays by DecoderLayer's names (None where a bias is absent)."""
        layer = self.layers[i]
        return {name: None if (p := getattr(layer, name)) is None else p[...] for name in _LAYER_PARAMS}

    def head_weights(self) -> tuple:
        """(final norm, output matrix [D, V]): what `logits_of` takes after the norm (a tied model's
        output matrix is its embedding, transposed where it is used)."""
        return self.norm[...], self.embed[...] if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden):
        """f32[..., V] logits (Granite divides by logits_scaling)."""
        out = logits_of(self.cfg, self.head_weights()[1], hidden)
        if self.tp_axis is not None:  # each device's vocabulary columns, gathered (padding dropped)
            out = jax.lax.all_gather(out, self.tp_axis, axis=out.ndim - 1, tiled=True)[..., : self.vocab_size]
        return out


def embed_tokens(cfg: ModelConfig, embed, token_ids, tp_axis=None):
    """The embeddings [T, D] of i32[T] token ids (Granite scales them by embedding_multiplier)."""
    x = embed[token_ids] if tp_axis is None else _vocab_parallel_embed(embed, token_ids, tp_axis)
    return x * cfg.embedding_multiplier if cfg.embedding_multiplier != 1.0 else x


def logits_of(cfg: ModelConfig, w, hidden):
    """f32[..., V] logits of hidden states against `w`: [D, V], or a tied embedding [V, D]."""
    if cfg.tie_word_embeddings:
        w = w.T
    out = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
    return out / cfg.logits_scaling if cfg.logits_scaling != 1.0 else out


def layer_stacks(stacks: AdapterStacks, i: int) -> AdapterStacks:
    """Layer `i`'s slice of each adapter group's stack."""
    return {g: LoraStack(st.a[i], st.b[i], None if st.a_flat is None else st.a_flat[i]) for g, st in stacks.items()}


def decoder_layer(cfg: ModelConfig, plan: KernelPlan, x, positions, w, k_cache, v_cache, attn, lora):
    """One layer of an unsharded decoder as a function of its own arrays (`w`: `Decoder.layer_weights`;
    `lora`: None or a LoraBatch of the layer's stacks): (x after it, new k_cache, new v_cache)."""
    return _layer(cfg, plan, None, x, positions, rope_inv_freq(cfg), w, k_cache, v_cache, attn, lora)


_LAYER_PARAMS = ("input_norm", "w_qkv", "b_qkv", "w_o", "b_o", "post_norm", "w_gate_up", "b_gate_up", "w_down",
                 "b_down")  # fmt: skip (DecoderLayer's parameters)


def _layer(cfg: ModelConfig, plan: KernelPlan, tp_axis, x, positions, inv_freq, w, k_cache, v_cache, attn, lora):
    """One decoder layer: (x after it, new k_cache, new v_cache). `w` holds the layer's arrays by
    DecoderLayer's names (None where a bias is absent); `lora` is None or a LoraBatch of this layer's
    slice of each stack."""
    t = x.shape[0]

    def proj(h, name, group):
        # Row-parallel (o, down) under tensor parallelism: partial sums, the LoRA delta of this
        # device's rows included, all-reduced; the bias is added once, after.
        reduce = tp_axis is not None and group in ("o", "down")
        b = w["b_" + name]
        y = jnp.dot(h, w["w_" + name], preferred_element_type=jnp.float32)
        if b is not None and not reduce:
            y = y + b.astype(jnp.float32)
        y = y.astype(h.dtype)
        if lora is not None and group in lora.stacks:
            st = lora.stacks[group]
            y = masked_lora_fn(y, h, st.a, st.b, st.a_flat, lora, plan)
        if reduce:
            y = jax.lax.psum(y, tp_axis)
            if b is not None:
                y = (y.astype(jnp.float32) + b.astype(jnp.float32)).astype(h.dtype)
        return y

    h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
    qkv = proj(h, "qkv", "qkv")
    written = write_kv_rope(k_cache, v_cache, qkv, positions, inv_freq, attn.slot_mapping, q_size=cfg.q_size,
                            rotate_q=plan.kv_write_rotates_q, impl=plan.kv_write,
                            interpret=plan.interpret_arg(plan.kv_write))  # fmt: skip
    if plan.kv_write_rotates_q:  # (the queries rotated in the same launch)
        k_cache, v_cache, q = written
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    else:
        k_cache, v_cache = written
        q = apply_rope(qkv[:, : cfg.q_size].reshape(t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
    meta = (attn.kv_lens, attn.page_indices, attn.cu_q_lens)
    split = attn.split_prefill is not None  # the last sequence, a prefill chunk, runs split; the kernel the rest
    o = ragged_paged_attention(
        q,
        k_cache,
        v_cache,
        *meta,
        jnp.maximum(attn.num_seqs - 1, 0) if split else attn.num_seqs,
        sm_scale=cfg.sm_scale,
        sliding_window=cfg.sliding_window,
        impl=plan.attention,
        interpret=plan.interpret_arg(plan.attention),
        tuning=plan.attention_tuning,
        long_context=attn.long_context is not None,
        long_chunk=attn.long_chunk is not None,
    )
    if split:  # (rows of the others from the kernel, zero elsewhere; the chunk's rows from the split)
        o = o + split_prefill_attention(q, k_cache, v_cache, *meta, attn.num_seqs, attn.slot_mapping,
                                        sm_scale=cfg.sm_scale, impl=plan.prefill)  # fmt: skip
    o = proj(o.reshape(t, cfg.q_size), "o", "o")
    x, h = add_rms_norm(x, o, w["post_norm"], eps=cfg.rms_norm_eps, residual_multiplier=cfg.residual_multiplier,
                        impl=plan.norm, interpret=plan.interpret_arg(plan.norm))  # (one kernel with norm_impl="gpu")
    gu = proj(h, "gate_up", "gate_up")
    f = cfg.intermediate_size
    m = (jax.nn.silu(gu[:, :f].astype(jnp.float32)) * gu[:, f:].astype(jnp.float32)).astype(h.dtype)
    d = proj(m, "down", "down")
    x = x + d * cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else x + d
    return x, k_cache, v_cache


def _vocab_parallel_embed(embed, token_ids, axis):
    """Embeddings of `token_ids` from vocabulary-sharded rows: each device looks up the ids it holds."""
    rows = embed.shape[0]
    local = token_ids - jax.lax.axis_index(axis) * rows
    mine = (local >= 0) & (local < rows)
    x = jnp.where(mine[:, None], embed[jnp.clip(local, 0, rows - 1)], jnp.zeros((), embed.dtype))
    return jax.lax.psum(x, axis)
