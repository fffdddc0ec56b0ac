"""Shared by the benchmarks: run metadata, hardware ceilings measured in the same run, result files."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from jalora.sampling_params import SamplingParams

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Granite-3.2-8B-Instruct shapes (the aLoRA paper's base model).
GRANITE_8B = {
    "architectures": ["GraniteForCausalLM"],
    "model_type": "granite",
    "vocab_size": 49155,
    "hidden_size": 4096,
    "intermediate_size": 12800,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000000.0,
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.0078125,
    "residual_multiplier": 0.22,
    "logits_scaling": 16.0,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


# The same family at toy size, for CPU smoke runs of the benchmarks.
TINY = {**GRANITE_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def git_commit() -> str:
    """JALORA_COMMIT if set (the device machine's copy of the tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("JALORA_COMMIT"):
        return os.environ["JALORA_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, text=True).strip()
    except Exception:
        return os.environ.get("JALORA_COMMIT", "unknown")


def run_metadata() -> dict:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_model_dir(path: str, config: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def timeit(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds of fn() (fn must block until its device work is done)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def measure_ceilings() -> dict:
    """HBM bandwidth (a copy: read + write bytes; a reduction: read bytes) and the bf16 matmul rate."""
    n = 1 << 30  # 2 GiB of bf16, far beyond L2
    src = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t_copy = timeit(lambda: copy(src).block_until_ready())
    read = jax.jit(lambda a: jnp.sum(a.reshape(-1, 4096).astype(jnp.float32), axis=0))
    t_read = timeit(lambda: read(src).block_until_ready())
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timeit(lambda: mm(a, b).block_until_ready())
    copy_bw, read_bw = 2 * n * 2 / t_copy / 1e9, n * 2 / t_read / 1e9
    return {
        "hbm_copy_GBps": copy_bw,
        "hbm_read_GBps": read_bw,
        "hbm_GBps": max(copy_bw, read_bw),  # the roofline's bandwidth: the best we measured
        "bf16_matmul_TFLOPs": 2 * m**3 / t_mm / 1e12,
    }


def replay_step_seconds(engine, iters: int) -> float:
    """Median time of the engine's next step replayed with its inputs prepared once, waiting for each
    replay: dispatch plus device time, without scheduling, input building or output handling.

    Call while requests are running; the replays rewrite the same cache slots, then the caller aborts.
    """
    runner, queued = engine.runner, engine._inflight  # async scheduling: the step still on the device
    inp, flags = runner.prepare(engine.scheduler.schedule(), None if queued is None else queued.step_id)
    prev = None if queued is None else queued.out[0]

    def replay():
        jax.block_until_ready(runner._run(inp, flags, prev))

    return timeit(replay, warmup=2, iters=iters)


def decode_step_seconds(engine, prompts, adapters, steps: int) -> tuple[float, float]:
    """(median engine.step() seconds, median replay seconds) once every request is decoding.

    A replay runs the same step again with its inputs prepared once and waits for it: dispatch plus
    device time, without scheduling, input building or output handling (and without overlap).

    Requests are prefilled (chunked) until each has its first token, 3 steps warm the decode bucket,
    then `steps` steps are timed; all requests are aborted afterwards.
    """
    # Early requests decode while later ones prefill: leave room so none finishes inside the window.
    params = SamplingParams(max_tokens=steps + 16 + len(prompts), ignore_eos=True)
    ids = [f"decode-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p, a in zip(ids, prompts, adapters):
        engine.add_request(rid, p, params, a)
    started = set()
    while len(started) < len(ids):
        started |= {o.request_id for o in engine.step() if o.token_ids}
    for _ in range(3):
        engine.step()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = engine.step()
        ts.append(time.perf_counter() - t0)
        assert len(outs) == len(ids)
    replay_t = replay_step_seconds(engine, steps)  # the same step: dispatch + device, not overlapped
    for rid in ids:
        engine.abort_request(rid)
    engine.step()
    ts.sort()
    return ts[len(ts) // 2], replay_t


def save(name: str, result: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(result, f, indent=2)
    return path
