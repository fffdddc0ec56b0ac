"""On-device sampling: greedy, temperature, min-p, top-k, top-p with per-request reproducible keys; the
penalties over a request's token counts."""

import jax
import jax.numpy as jnp

# A row of token counts (jalora/engine/penalties.py) holds, per vocabulary entry, how many times the request has
# generated that token, plus PROMPT_FLAG where the token is in its prompt and DISALLOWED_FLAG where it is outside the
# request's allowed_token_ids.
PROMPT_FLAG = 1 << 30
DISALLOWED_FLAG = 1 << 29


def apply_penalties(
    logits,  # f32[S, V]
    counts,  # i32[S, V] each row's token counts (with PROMPT_FLAG and DISALLOWED_FLAG)
    presence,  # f32[S]; 0 = off
    frequency,  # f32[S]; 0 = off
    repetition,  # f32[S]; 1 = off
):
    """The logits with OpenAI's and vLLM's penalties applied, in vLLM's order: a token seen in the prompt or the
    output has its logit divided by the repetition penalty where positive and multiplied by it where not
    (transformers' RepetitionPenaltyLogitsProcessor, over prompt and output as vLLM takes it); then each generated
    token's logit loses frequency * its count and presence once. A token outside the row's allowed ones is -inf (vLLM
    masks them first; -inf stays -inf through the rest). A row whose penalties are off is unchanged but for that."""
    generated = (counts & (DISALLOWED_FLAG - 1)).astype(logits.dtype)
    rep = repetition[:, None]
    x = jnp.where((counts & ~DISALLOWED_FLAG) != 0, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    x = x - frequency[:, None] * generated - presence[:, None] * (generated > 0)
    return jnp.where((counts & DISALLOWED_FLAG) != 0, -jnp.inf, x)


def sample(
    logits,  # f32[S, V]
    temperature,  # f32[S]; 0 = greedy
    top_k,  # i32[S]; 0 = off
    top_p,  # f32[S]; 1 = off
    seeds,  # u32[S] per-request seed
    counters,  # i32[S] tokens generated so far (the key of the next draw)
    min_p=None,  # f32[S]; 0 = off (None: off for every row)
):
    """Returns i32[S] token ids. A request's draw depends only on (seed, counter, logits).

    Greedy or sampled is a per-row choice (temperature 0 or not) made on the device, so one compiled
    function serves any mix of requests; every row pays the draw (a sort over the vocabulary), which is
    why the engine runs this only for steps where some row samples (jalora/engine/model_runner.py).

    The filters apply in vLLM's order: temperature, then min-p (a token stays if its probability is at
    least min_p times the most likely token's), then top-k and top-p over what min-p kept."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    # Tempered from the row's maximum: the most likely token sits at 0 however small the temperature (dividing
    # the raw logits by 1e-37 overflowed to infinities, and the draw took the first of them, not the argmax).
    x = (logits - jnp.max(logits, axis=-1, keepdims=True)) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if min_p is not None:  # p_i >= min_p * p_max  <=>  x_i >= log(min_p), x_max being 0 (log 0 = -inf keeps all)
        x = jnp.where(x < jnp.log(min_p)[:, None], -jnp.inf, x)
    # One ascending sort serves both filters, as transformers' warpers define them. Top-k keeps every token
    # at least as likely as the k-th (ties at the boundary stay); top-p then drops the least likely tokens while
    # the mass they add up to stays <= 1 - top_p (so the kept ones reach top_p), one by one in sorted order:
    # of tokens tied at the boundary only as many stay as the mass needs (the lower ids go first).
    order = jnp.argsort(x, axis=-1, stable=True)
    srt = jnp.take_along_axis(x, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(srt, (v - k)[:, None], axis=-1)
    srt = jnp.where(srt < kth, -jnp.inf, srt)
    mass = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
    drop = (mass <= (1 - top_p)[:, None]) | (srt == -jnp.inf)
    drop = drop.at[:, -1].set(False)  # the most likely token always stays
    rows = jnp.arange(x.shape[0])[:, None]
    x = jnp.where(jnp.zeros_like(drop).at[rows, order].set(drop), -jnp.inf, x)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
