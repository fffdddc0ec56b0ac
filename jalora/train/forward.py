"""The training forward: the decoder's layers over a dense [batch, time] batch, with LoRA weights as
differentiable arguments, applied to the tokens at or after each row's activation index only.

Serving runs `Decoder.__call__` over a paged KV cache; training needs whole sequences, causal
attention over them and gradients, so this module walks the same `Decoder` parameters with the same
building blocks (`rms_norm`, `rope_inv_freq`, `Decoder.logits` from decoder.py, `apply_rope` from the
kernels' reference) and the same fused projections, in the same order, but with dense causal attention.
The parity tests compare it with transformers + PEFT on the loss and the LoRA gradients.

LoRA weights are kept in PEFT's layout, stacked over layers: `{module: {"A": [L, r, in], "B": [L, out,
r]}}` in float32, so gradients and the exported file are PEFT's tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jalora.adapters.peft import GROUPS, MODULE_GROUP, module_dims
from jalora.model.config import ModelConfig
from jalora.model.decoder import Decoder, rms_norm, rope_inv_freq
from pallas_kernels.ragged_paged_attention import apply_rope

# projection group -> the layer's fused weight and bias (decoder.py)
GROUP_WEIGHTS = {"qkv": ("w_qkv", "b_qkv"), "o": ("w_o", "b_o"), "gate_up": ("w_gate_up", "b_gate_up"),
                 "down": ("w_down", "b_down")}  # fmt: skip

LoraParams = dict[str, dict[str, jax.Array]]  # module -> {"A": [L, r, in], "B": [L, out, r]}


class Batch(NamedTuple):
    """One micro-batch, right-padded to a bucket: T tokens per row, R loss positions per row."""

    token_ids: jax.Array  # i32[B, T]
    positions: jax.Array  # i32[B, T]
    adapted: jax.Array  # bool[B, T] position >= the row's activation index (padding: False)
    label_pos: jax.Array  # i32[B, R] position whose logits predict each response token
    labels: jax.Array  # i32[B, R] the response tokens
    weights: jax.Array  # f32[B, R] 1 for a response token, 0 for padding
    content: jax.Array  # f32[B, R] 1 for the response's own tokens (not its end-of-sequence token)


def init_lora(cfg: ModelConfig, targets, r: int, key: jax.Array) -> LoraParams:
    """PEFT's default initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)), B = 0,
    so the adapted model starts as the base model."""
    dims = module_dims(cfg)
    params = {}
    for k, module in enumerate(sorted(targets, key=list(MODULE_GROUP).index)):
        din, dout = dims[module]
        bound = 1.0 / np.sqrt(din)
        a = jax.random.uniform(jax.random.fold_in(key, k), (cfg.num_layers, r, din), jnp.float32, -bound, bound)
        params[module] = {"A": a, "B": jnp.zeros((cfg.num_layers, dout, r), jnp.float32)}
    return params


def _layer_weights(model: Decoder) -> list[dict[str, jax.Array]]:
    names = ("input_norm", "w_qkv", "b_qkv", "w_o", "b_o", "post_norm", "w_gate_up", "b_gate_up", "w_down", "b_down")
    return [{n: getattr(layer, n)[...] for n in names if getattr(layer, n) is not None} for layer in model.layers]


def _attention(q, k, v, cfg: ModelConfig, impl: str):
    """Causal attention of right-padded rows (a real token never sees padding). q [B,T,H,D], k/v [B,T,Hkv,D]."""
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=cfg.sm_scale, is_causal=True, local_window_size=window, implementation=impl
    )


def _layer(cfg: ModelConfig, scaling: float, dropout: float, attention: str):
    """The body of one decoder layer as a pure function (x, weights, lora of this layer, mask, key) -> x."""
    inv_freq = rope_inv_freq(cfg)

    def proj(h, w, b, group, lora, mask, key):
        y = jnp.dot(h, w, preferred_element_type=jnp.float32)
        if b is not None:
            y = y + b.astype(jnp.float32)
        members = [m for m in GROUPS[group] if m in lora]
        if members:  # the group's LoRA delta, zero columns for its members that are not adapted
            dims = module_dims(cfg)
            parts = []
            for m in GROUPS[group]:
                if m not in lora:
                    parts.append(jnp.zeros((*h.shape[:-1], dims[m][1]), jnp.float32))
                    continue
                x = h
                if dropout > 0.0 and key is not None:  # PEFT: dropout on the LoRA input only
                    keep = jax.random.bernoulli(jax.random.fold_in(key, MODULE_GROUP_INDEX[m]), 1.0 - dropout, h.shape)
                    x = jnp.where(keep, h / (1.0 - dropout), 0).astype(h.dtype)
                a, bm = lora[m]["A"], lora[m]["B"]  # [r, in], [out, r]
                s = jnp.einsum("...i,ri->...r", x, a.astype(h.dtype), preferred_element_type=jnp.float32)
                parts.append(jnp.einsum("...r,or->...o", s, bm, preferred_element_type=jnp.float32) * scaling)
            delta = parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)
            y = y + jnp.where(mask[..., None], delta, 0.0)
        return y.astype(h.dtype)

    def layer(x, w, lora, mask, positions, key):
        bsz, t = x.shape[:2]
        flat_pos = positions.reshape(-1)
        h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
        qkv = proj(h, w["w_qkv"], w.get("b_qkv"), "qkv", lora, mask, key)
        q = qkv[..., : cfg.q_size].reshape(bsz * t, cfg.num_heads, cfg.head_dim)
        k = qkv[..., cfg.q_size : cfg.q_size + cfg.kv_size].reshape(bsz * t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[..., cfg.q_size + cfg.kv_size :].reshape(bsz, t, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, flat_pos, inv_freq).reshape(bsz, t, cfg.num_heads, cfg.head_dim)
        k = apply_rope(k, flat_pos, inv_freq).reshape(bsz, t, cfg.num_kv_heads, cfg.head_dim)
        o = _attention(q, k, v, cfg, attention).reshape(bsz, t, cfg.q_size)
        o = proj(o, w["w_o"], w.get("b_o"), "o", lora, mask, key)
        x = x + o * cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else x + o
        h = rms_norm(x, w["post_norm"], cfg.rms_norm_eps)
        gu = proj(h, w["w_gate_up"], w.get("b_gate_up"), "gate_up", lora, mask, key)
        f = cfg.intermediate_size
        m = (jax.nn.silu(gu[..., :f].astype(jnp.float32)) * gu[..., f:].astype(jnp.float32)).astype(h.dtype)
        d = proj(m, w["w_down"], w.get("b_down"), "down", lora, mask, key)
        return x + d * cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else x + d

    return layer


MODULE_GROUP_INDEX = {m: i for i, m in enumerate(MODULE_GROUP)}


def hidden_states(
    model: Decoder, lora: LoraParams, batch: Batch, scaling: float, *, dropout: float = 0.0,
    key: jax.Array | None = None, attention: str = "xla", remat: bool = False,
) -> jax.Array:  # fmt: skip
    """[B, T, D] hidden states after the final norm; LoRA applied where `batch.adapted`."""
    cfg = model.cfg
    x = model.embed[...][batch.token_ids]
    if cfg.embedding_multiplier != 1.0:
        x = x * cfg.embedding_multiplier
    body = _layer(cfg, scaling, dropout, attention)
    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    for i, w in enumerate(_layer_weights(model)):
        layer_lora = {m: {"A": p["A"][i], "B": p["B"][i]} for m, p in lora.items()}
        layer_key = None if key is None else jax.random.fold_in(key, i)
        x = body(x, w, layer_lora, batch.adapted, batch.positions, layer_key)
    return rms_norm(x, model.norm[...], cfg.rms_norm_eps)


def response_stats(model: Decoder, hidden: jax.Array, batch: Batch):
    """(sum of the response tokens' negative log-likelihoods, their count, exact-match count, rows with a
    response): logits only at the positions that predict response tokens."""
    h = jnp.take_along_axis(hidden, batch.label_pos[..., None], axis=1)  # [B, R, D]
    logits = model.logits(h)  # f32[B, R, V]
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch.labels[..., None], -1)[..., 0]
    loss_sum = jnp.sum(nll * batch.weights)
    right = (jnp.argmax(logits, -1) == batch.labels) | (batch.content == 0)
    has_content = jnp.any(batch.content > 0, -1)
    exact = jnp.sum(jnp.all(right, -1) & has_content)
    return loss_sum, jnp.sum(batch.weights), exact, jnp.sum(has_content)


def loss_fn(lora, graphdef, state, batch: Batch, scaling: float, dropout: float, key, attention: str, remat: bool):
    """(sum of response-token NLLs, (token count, exact matches, rows)): the sum, so that micro-batches
    add up and one division by the optimizer step's token count gives the mean over all its tokens."""
    model = nnx.merge(graphdef, state)
    hidden = hidden_states(model, lora, batch, scaling, dropout=dropout, key=key, attention=attention, remat=remat)
    loss_sum, count, exact, rows = response_stats(model, hidden, batch)
    return loss_sum, (count, exact, rows)
