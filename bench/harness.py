"""What every benchmark shares: run metadata, hardware ceilings measured in the same run, timing,
result files, the model shapes and random adapters, and driving the engine's decode step.

Result files: `result_path(out, default, smoke)` says where a result goes and `save(path, result)`
writes it (JSON, with a copy under $OUT when that is set, the device machine's return folder). A
smoke run (tiny shapes, CPU numbers) without an explicit `--out` writes under SMOKE_RESULTS, never
over the device results in bench/results/.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jalora.sampling_params import SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SMOKE_RESULTS = os.path.join(tempfile.gettempdir(), "jalora-bench-smoke")

# -- model shapes ------------------------------------------------------------------------------------

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

# Llama-3.3-70B-Instruct and Mistral-Large-Instruct-2407 (123B) shapes: the paper's multi-GPU models.
LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
}
MISTRAL_LARGE = {
    **LLAMA_70B,
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 12288,
    "num_hidden_layers": 88,
    "num_attention_heads": 96,
    "head_dim": 128,
    "rope_theta": 1000000.0,
    "sliding_window": None,  # (as the model's config.json says: an absent key is MistralConfig's 4096 window)
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MODELS = {"granite-8b": GRANITE_8B, "llama-70b": LLAMA_70B, "mistral-large": MISTRAL_LARGE}

# The same family at toy size, for CPU smoke runs of the benchmarks.
TINY = {**GRANITE_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def write_model_dir(path: str, config: dict) -> str:
    """A model directory holding only config.json (the engine's load_format="dummy" makes the weights)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def kv_blocks(num_seqs: int, tokens_per_seq: int, block_size: int = 16) -> int:
    """KV-cache blocks for `num_seqs` sequences of up to `tokens_per_seq` tokens each."""
    return num_seqs * -(-tokens_per_seq // block_size)


# -- random adapters -----------------------------------------------------------------------------------


def write_adapter(path: str, cfg: dict, r: int, targets: list[str], invocation: list[int] | None, seed: int) -> str:
    """A PEFT-format adapter with random weights (what a trained intrinsic looks like to the engine);
    `invocation` makes it an aLoRA, None a plain LoRA. `targets`: some of q_proj, k_proj, v_proj."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // heads
    out = {"q_proj": heads * hd, "k_proj": kv * hd, "v_proj": kv * hd}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, d)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out[m], r)) * 0.02).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
            "bias": "none", "alora_invocation_tokens": invocation}  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(acfg, f)
    return path


def load_qkv_aloras(llm, root: str, cfg: dict, n: int, rank: int = 32) -> list[list[int]]:
    """Loads aLoRA adapters a0..a{n-1} (random weights, rank `rank` on q/k/v) into `llm`; adapter i is
    invoked by [V-2-i, V-1], two tokens no random prompt of the benchmarks holds. Returns the invocations."""
    v = cfg["vocab_size"]
    invocations = [[v - 2 - i, v - 1] for i in range(n)]
    for i, inv in enumerate(invocations):
        path = write_adapter(os.path.join(root, f"a{i}"), cfg, rank, ["q_proj", "k_proj", "v_proj"], inv, i)
        llm.load_adapter(f"a{i}", path)
    return invocations


# -- run metadata ------------------------------------------------------------------------------------


def commit() -> str:
    """JALORA_COMMIT if set (the device machine's copy of the tree carries a stale .git), else git's HEAD."""
    if os.environ.get("JALORA_COMMIT"):
        return os.environ["JALORA_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run: `python -m <module> <args>` (`argv` None: this process's)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return " ".join(["python", "-m", module, *([shlex.join(args)] if args else [])])


def run_metadata(module: str, argv: list[str] | None = None) -> dict:
    """Device, platform, JAX version, commit, command line and time of this run (every result file
    starts with these). `module` is the script's module name (`__spec__.name`), `argv` its arguments."""
    from jalora.engine.executables import source_hash
    from jalora.engine.llm_engine import autotune_options

    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "commit": commit(),
        # sha256 of the jalora and pallas_kernels sources that ran: it names the tree even where the
        # commit above is stale (the device copy's .git), by comparison with source_hash() at a commit.
        "source_sha256": source_hash(),
        "command": command_line(module, argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # (they change what compiles: the autotuning level)
        # the options an engine of the default config compiles with (the autotuning level on a GPU; {} where
        # XLA_FLAGS sets it or off a GPU)
        "engine_compiler_options": autotune_options(None),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- result files ----------------------------------------------------------------------------------


def result_path(out: str | None, default: str, smoke: bool = False) -> str:
    """Where a result goes: `out` (a file name in bench/results/, or a path with a directory) if given,
    else `default` in bench/results/, or in SMOKE_RESULTS for a smoke run (tiny shapes on a CPU: its
    numbers must never replace a device result)."""
    if out:
        return out if os.path.dirname(out) else os.path.join(RESULTS, out)
    return os.path.join(SMOKE_RESULTS if smoke else RESULTS, default)


def save(path: str, result: dict) -> str:
    """Writes `result` as JSON at `path` (from `result_path`), and a copy into $OUT when it is set."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    out = os.environ.get("OUT")
    if out:
        copy = os.path.join(out, os.path.basename(path))
        if os.path.abspath(copy) != os.path.abspath(path):
            with open(copy, "w") as f:
                json.dump(result, f, indent=2)
    return path


# -- timing ------------------------------------------------------------------------------------------


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


# -- hardware ceilings ---------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int, warmup: int = 2, iters: int = 10) -> float:
    """GB/s of a device-to-device elementwise pass over `nbytes` of bf16 (bytes read + written)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = timeit(lambda: f(x).block_until_ready(), warmup=warmup, iters=iters)
    return 2 * nbytes / t / 1e9


# Output widths the batch-1 matmul ceiling tries, with 4096 rows: an 8B decoder's own (o 4096, qkv 6144, gate/up
# 25600, about the LM head's 49155) and one between.
GEMV_WIDTHS = (4096, 6144, 16384, 25600, 49152)
# Rows of its activations: a batch-1 decode step's, padded to the smallest token bucket. XLA picks its kernel by
# shape, and with one row it picked a slower one: on the H200 at 7c67e61 the step's own [16, 4096] x
# [4096, 25600] read at 4.20 TB/s (profile_step_b1_h200_7c67e61.json's trace) while x[1, 4096] read at most
# 3.72 TB/s over the same widths in the same run.
GEMV_ROWS = 16


def gemv_bandwidth(nbytes: int, k: int = 4096, warmup: int = 2, iters: int = 10,
                   widths: tuple[int, ...] = GEMV_WIDTHS, rows: int = GEMV_ROWS) -> float:  # fmt: skip
    """GB/s of weight bytes a batch-1 bf16 matmul reads (x[rows, k] @ W[k, n], f32 accumulation as the engine's
    projections; `rows` as a batch-1 step pads them): what a decode step's weight GEMMs can reach on this
    device, where an elementwise copy is XLA's other kernel family (on the H100 it ran at 2.39 TB/s while
    the step's gate/up GEMM read at 2.99, bench/results/pipeline_bench_granite-8b_h100.json and
    profile_step_b1_h100.json). The best of
    `widths`: for each, one launch of as many distinct [k, n] matrices as `nbytes` holds, one after another
    as a step's layers are (XLA picks a kernel per shape: one [4096, 262144] matrix, the earlier single
    shape, read at 2.52 TB/s on the H100 while the step's own [4096, 25600] read at 2.97). Each timed call
    queues `GEMV_LAUNCHES` launches and waits for the last, so the device is not idle while the host
    dispatches a launch's arguments (65 at the narrowest width)."""
    x = jax.random.normal(jax.random.key(4), (rows, k), jnp.bfloat16)
    f = jax.jit(lambda x, ws: [jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16) for w in ws])
    best = 0.0
    for n in widths:
        count = max(1, nbytes // (2 * k * n))
        ws = [jax.random.normal(jax.random.key(3 + i), (k, n), jnp.bfloat16) for i in range(count)]
        t = timeit(lambda ws=ws: jax.block_until_ready([f(x, ws) for _ in range(GEMV_LAUNCHES)][-1]),
                   warmup=warmup, iters=iters)  # fmt: skip
        best = max(best, GEMV_LAUNCHES * 2 * k * n * count / t / 1e9)
        del ws
    return best


GEMV_LAUNCHES = 4


def measure_ceilings() -> dict:
    """HBM bandwidth (a copy: read + write bytes; a reduction and a batch-1 matmul: read bytes) and the bf16
    matmul rate."""
    n = 1 << 30  # 2 GiB of bf16, far beyond L2
    copy_bw = copy_bandwidth(2 * n)
    gemv_bw = gemv_bandwidth(2 * n)
    src = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    read = jax.jit(lambda a: jnp.sum(a.reshape(-1, 4096).astype(jnp.float32), axis=0))
    t_read = timeit(lambda: read(src).block_until_ready())
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timeit(lambda: mm(a, b).block_until_ready())
    read_bw = n * 2 / t_read / 1e9
    return {
        "hbm_copy_GBps": copy_bw,
        "hbm_read_GBps": read_bw,
        "hbm_gemv_GBps": gemv_bw,
        "hbm_GBps": max(copy_bw, read_bw, gemv_bw),  # the roofline's bandwidth: the best we measured
        "bf16_matmul_TFLOPs": 2 * m**3 / t_mm / 1e12,
    }


# -- the engine's decode step ----------------------------------------------------------------------------


def drain(engine) -> None:
    """Steps `engine` until nothing is running, queued on the device or owed (after aborts)."""
    while engine.has_unfinished_requests():
        engine.step()


def replay_step_seconds(engine, iters: int) -> float:
    """Median time of the engine's next step replayed with its inputs prepared once, waiting for each
    replay: dispatch plus device time, without scheduling, input building or output handling.

    The step is scheduled as the engine would (`scheduler.schedule()`), prepared on top of the step
    still on the device (`engine.pipeline.queued`, async scheduling), and launched with the engine's
    adapter stacks. Call while requests are running; the replays rewrite the same cache slots and the
    schedule is not dispatched, so the caller aborts the requests afterwards.
    """
    runner, queued = engine.runner, engine.pipeline.queued
    prepared = runner.prepare(engine.scheduler.schedule(), None if queued is None else queued.step_id)
    prev_tokens = None if queued is None else queued.tokens

    def replay():
        jax.block_until_ready(runner.launch(prepared, engine.adapters.stacks, prev_tokens))

    return timeit(replay, warmup=2, iters=iters)


def start_decoding(engine, prompts, adapters, params: SamplingParams) -> list[str]:
    """Adds one request per prompt and steps until every request is decoding: each has its first token
    (prefill is chunked, so early requests decode while later ones prefill), then 3 more steps warm
    the decode bucket. Returns the request ids."""
    ids = [f"decode-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p, a in zip(ids, prompts, adapters):
        engine.add_request(rid, p, params, a)
    started = set()
    while len(started) < len(ids):
        started |= {d.request_id for d in engine.step() if d.token_ids}
    for _ in range(3):
        engine.step()
    return ids


def decode_step_seconds(engine, prompts, adapters, steps: int) -> tuple[float, float]:
    """(median engine.step() seconds, median replay seconds) once every request is decoding.

    A replay runs the same step again with its inputs prepared once and waits for it: dispatch plus
    device time, without scheduling, input building or output handling (and without overlap).

    Requests are prefilled (chunked) until each has its first token, 3 steps warm the decode bucket,
    then `steps` steps are timed; all requests are aborted afterwards.
    """
    # Early requests decode while later ones prefill: leave room so none finishes inside the window.
    params = SamplingParams(max_tokens=steps + 16 + len(prompts), ignore_eos=True)
    ids = start_decoding(engine, prompts, adapters, params)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        deltas = engine.step()
        ts.append(time.perf_counter() - t0)
        assert len(deltas) == len(ids), "a request ended inside the timed window"
    replay_t = replay_step_seconds(engine, steps)  # the same step: dispatch + device, not overlapped
    for rid in ids:
        engine.abort_request(rid)
    drain(engine)
    ts.sort()
    return ts[len(ts) // 2], replay_t
