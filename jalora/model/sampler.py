"""On-device sampling: greedy, temperature, min-p, top-k, top-p with per-request reproducible keys."""

import jax
import jax.numpy as jnp


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
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if min_p is not None:  # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p) (log 0 = -inf keeps all)
        floor = jnp.max(x, axis=-1) + jnp.log(min_p)
        x = jnp.where(x < floor[:, None], -jnp.inf, x)
    srt = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    rank = jnp.arange(v)[None, :]
    srt = jnp.where(rank < k[:, None], srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    # Keep the smallest prefix of the sorted tokens whose mass reaches top_p (the first always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(keep & (rank < k[:, None]), axis=-1), 1)
    threshold = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
