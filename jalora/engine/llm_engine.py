"""LLMEngine: the engine interface (jalora/engine/interface.py) over one model and its adapters.

A step is three verbs: the scheduler picks the batch, the step pipeline runs it on the device (and
reads back the step that is done), and postprocessing turns read-back tokens into deltas. Not
thread-safe: one thread owns an engine (the gRPC server runs it in its engine thread), except for the
methods jalora/engine/interface.py marks thread-safe, which a server runs on other threads: preparing a
request (`encode_prompt`: size checks, tokenization) and an adapter (`prepare_adapter`: reading and
validating its files) is split from admitting it (`add_request`, `load_adapter`), which is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer

from jalora.adapters.manager import AdapterManager, PreparedAdapter
from jalora.adapters.peft import AdapterInfo, module_dims
from jalora.cache import use_compile_cache
from jalora.config import EngineConfig
from jalora.engine import executables, multihost
from jalora.engine.block_manager import BlockManager
from jalora.engine.chat import ChatTemplate, read_chat_template, read_model_json
from jalora.engine.detokenizer import TokenBytes
from jalora.engine.host_tier import HostKVTier
from jalora.engine.interface import EncodedPrompt, EngineInfo, EngineStats
from jalora.engine.model_runner import ModelRunner, StepResult
from jalora.engine.output_processor import OutputProcessor
from jalora.engine.request import Request, Status, banned_early
from jalora.engine.scheduler import Scheduler
from jalora.engine.sessions import Sessions
from jalora.engine.step_pipeline import Row, StepPipeline
from jalora.errors import InvalidRequestError
from jalora.model.checkpoint import load_model, resolve_dtype
from jalora.model.config import ModelConfig
from jalora.model.gguf import resolve_model_dir
from jalora.model.kernel_plan import KernelPlan
from jalora.model.sharding import TensorParallel
from jalora.outputs import RequestDelta
from jalora.sampling_params import MAX_DRAW_BIASES, SamplingParams

# Host memory the KV cache may take where the device reports no memory limit (a CPU): like vLLM's
# CPU backend, a fixed budget rather than a share of RAM, which other processes also use.
CPU_KV_CACHE_BYTES = 1 << 30
# A text prompt longer than this many UTF-8 bytes per token of max_model_len (or than the vocabulary's
# longest token, if longer) is refused before it is tokenized: tokenizing megabytes only to count
# tokens costs seconds, and no prompt that fits can be that long.
PROMPT_BYTES_PER_TOKEN = 16
# Decoder layers per compiled launch on a GPU (EngineConfig.layers_per_launch's default there): on an H100,
# Granite-8B steps in groups of 8 ran as fast as the fused step (batch 1: 6.85 vs 6.82 ms; batch 64 with 8
# adapters: 11.67 vs 11.83 ms) and a cold start compiled in 58 s; groups of 1 took 4.5% longer at batch 1.
GPU_LAYERS_PER_LAUNCH = 8
# XLA's GPU autotuning level of the engine's compilations (EngineConfig.autotune_level's default on a GPU):
# XLA's own default, 4, whose check of each candidate kernel's result against a reference is what keeps a
# wrong one from being picked (XLA's GEMM-fusion autotuner disqualifies a candidate whose output differs;
# below 4 nothing compares outputs, and the fastest candidate wins whatever it computed). Level 2 (no
# reinitialising, no check) made an H100's cold start 45.7 s against 58.0 s at 4 with the same batch-1 step,
# 6.78 ms (bench/results/startup_gpu_cold_at*_h100_39efc23.json); it is `autotune_level=2` for whoever takes
# that risk for 12 s of a start that a warm compilation cache does not repeat.
GPU_AUTOTUNE_LEVEL = 4

logger = logging.getLogger(__name__)


def autotune_options(level: int | None) -> dict[str, int]:
    """The compiler options that set XLA's GPU autotuning `level` (EngineConfig.autotune_level): none off a
    GPU, nor where XLA_FLAGS sets the level (the user's flag stands); None = `GPU_AUTOTUNE_LEVEL`."""
    flagged = "xla_gpu_autotune_level" in os.environ.get("XLA_FLAGS", "")
    if jax.default_backend() != "gpu" or (level is None and flagged):
        return {}
    return {"xla_gpu_autotune_level": GPU_AUTOTUNE_LEVEL if level is None else level}


def _kv_blocks_from_memory(block_bytes: int, fraction: float) -> int | None:
    """Blocks of `block_bytes` (per device) that fit in `fraction` of the first device's memory, less what
    it holds already (the weights: under tensor parallelism every device holds the same share)."""
    stats = _memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] * fraction - stats.get("bytes_in_use", 0)
    return max(int(free // block_bytes), 1)


def memory_floor(config: EngineConfig, cfg: ModelConfig, tp: TensorParallel, max_model_len: int, dtype) -> dict:
    """{what: bytes} each device surely allocates for what the config sizes, known before any weight is read:
    the weights ("model"), the KV cache and a page-table row per sequence of an explicit num_kv_blocks, a
    float32 logits row and an int32 row of token counts (jalora/engine/penalties.py) per sequence (max_num_seqs),
    two hidden-state rows per step token (max_num_batched_tokens), and the smallest adapter stack, which loading
    any adapter allocates at max_loras x max_lora_rank. A floor, not an estimate: the engine needs more
    (activations, compiled steps), never less."""
    item = np.dtype(dtype).itemsize
    floor = {"model": cfg.num_params() * item // tp.size}
    pages = 0
    if config.num_kv_blocks is not None:
        floor["num_kv_blocks"] = config.num_kv_blocks * tp.kv_block_bytes(cfg, config.block_size, dtype)
        pages = -(-min(max_model_len, config.num_kv_blocks * config.block_size) // config.block_size)
    # (per sequence: its page-table row, a float32 logits row and an int32 row of token counts, the penalties')
    floor["max_num_seqs"] = config.max_num_seqs * (4 * pages + 8 * cfg.vocab_size)
    floor["max_num_batched_tokens"] = config.max_num_batched_tokens * 2 * cfg.hidden_size * item
    smallest = min(din + dout for din, dout in module_dims(cfg).values())
    lora = cfg.num_layers * config.max_loras * config.max_lora_rank * smallest * item // tp.size
    floor["max_lora_rank" if config.max_lora_rank >= config.max_loras else "max_loras"] = lora
    return floor


def _memory_stats() -> dict | None:
    """The first local device's memory statistics (None where it has none). On several hosts jax.devices()[0]
    may be another process's."""
    dev = jax.local_devices()[0]
    return dev.memory_stats() if hasattr(dev, "memory_stats") else None


def memory_limit() -> int | None:
    """Bytes one device can hold: a GPU's or TPU's limit, or on a CPU the host's memory (less where the
    process's address space is limited lower); None where unknown."""
    stats = _memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if jax.local_devices()[0].platform != "cpu":
        return None
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)
    except (ImportError, ValueError, OSError):
        pass
    return limit


def check_memory_floor(floor: dict, limit: int | None) -> None:
    """Raises InvalidRequestError naming the largest sized field (or the model) when `floor` (memory_floor)
    cannot fit in `limit` bytes."""
    total = sum(floor.values())
    if limit is None or total <= limit:
        return
    field = max(floor, key=floor.get)
    size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    rest = [f"{k} {size(v)}" for k, v in sorted(floor.items(), key=lambda kv: -kv[1])
            if k != field and v >= total / 100]  # fmt: skip
    others = f" ({', '.join(rest)} besides)" if rest else ""
    raise InvalidRequestError(field, f"takes at least {size(floor[field])} of device memory: with the rest, at least "
                              f"{size(total)}{others}, more than the {size(limit)} there are")  # fmt: skip


def _read_generation_config(model_dir: str) -> dict:
    """generation_config.json of the model directory ({} if absent)."""
    return read_model_json(model_dir, "generation_config.json")


def _ids(value) -> tuple[int, ...]:
    """An HF token-id field (an int, a list of ints or null) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _load_tokenizer(model_dir: str) -> Tokenizer | None:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise InvalidRequestError("tokenizer.json", f"cannot be loaded from {model_dir}: {e}") from e


def _adapter_names(requests) -> tuple[str, ...]:
    return tuple(sorted({r.adapter_name for r in requests if r.adapter_name is not None}))


class LLMEngine:
    def __init__(self, config: EngineConfig, *, clock=time.monotonic):
        """`clock` (seconds, monotonic) times pipeline sessions' TTLs; tests pass one they control."""
        self.host_tier = self.runner = self.multihost_leader = None
        try:
            self._start(config, clock)
        except BaseException as e:  # a multi-host process 0 that fails to start lets its followers go
            if self.multihost_leader is not None:
                self.close(f"process 0 failed to start: {type(e).__name__}: {e}")
            raise

    def _start(self, config: EngineConfig, clock) -> None:
        self.config = config
        # Before anything compiles (loading dummy weights does): the steps this start compiles are saved
        # there, and a later start with the same directory loads them instead (jalora/cache.py).
        self.compile_cache = use_compile_cache(config.compile_cache)
        self.dtype = resolve_dtype(config.dtype)
        # What is loaded: config.model itself, or for a .gguf file its converted HF-layout directory
        # (converted once into jalora's cache, jalora/model/gguf.py). config.model keeps the given name.
        self.model_dir = model_dir = resolve_model_dir(config.model)
        self.model_config = cfg = ModelConfig.from_dir(model_dir)
        max_model_len = config.max_model_len or cfg.max_position_embeddings
        if max_model_len < 2:
            raise InvalidRequestError("max_model_len", f"must be >= 2, got {max_model_len}")
        if max_model_len > cfg.max_position_embeddings:  # (allowed, as RoPE takes any position; said once)
            logger.warning("max_model_len %d is above the model's max_position_embeddings %d: positions past it are "
                           "outside what the model was trained on", max_model_len, cfg.max_position_embeddings)
        self.tokenizer = _load_tokenizer(model_dir)
        self._token_bytes = None if self.tokenizer is None else TokenBytes(self.tokenizer)
        template, special_tokens = read_chat_template(model_dir)
        self.chat_template = None
        if template is not None and self.tokenizer is not None:
            self.chat_template = ChatTemplate(template, special_tokens, self.tokenizer)
        self.generation_config = _read_generation_config(model_dir)
        # Both config.json and generation_config.json may name end-of-sequence tokens (instruct models
        # often end turns with a token only the latter lists): a request stops at any of them.
        self._default_params = self._sampling_defaults()  # a bad generation_config fails the start
        self.eos_token_ids = tuple(dict.fromkeys(cfg.eos_token_ids + _ids(self.generation_config.get("eos_token_id"))))
        eos = special_tokens.get("eos_token")
        if not self.eos_token_ids and eos is not None and self.tokenizer is not None:
            # Neither file names one: the tokenizer's end-of-sequence token (vLLM's eos, read the same way)
            self.eos_token_ids = tuple(t for t in [self.tokenizer.token_to_id(eos)] if t is not None)
        self.kernel_plan = KernelPlan.from_config(config)
        self.tp = tp = TensorParallel.create(cfg, config.tensor_parallel_size)  # checked before any weight is read
        # Sizes that cannot fit fail before any weight is read (or a follower joins), not in the warm-up.
        check_memory_floor(memory_floor(config, cfg, tp, max_model_len, self.dtype), memory_limit())
        self.host_tier = self._make_host_tier(cfg, tp)  # (before any weight or follower: a bad size fails fast)
        # Several hosts: process 0 leads (it schedules and sends every device call), the others follow.
        self.multihost_leader: multihost.Leader | None = None
        self.multihost_conn = None
        if multihost.is_multihost():
            if tp.size != jax.device_count():
                raise InvalidRequestError(
                    "tensor_parallel_size", f"must be {jax.device_count()} (every device of the "
                    f"{jax.process_count()} processes) on several hosts, got {tp.size}",
                )  # fmt: skip
            if jax.process_index() == 0:
                self.multihost_leader = multihost.Leader(jax.process_count() - 1)
            else:
                self.multihost_conn = multihost.connect()
        decoder = load_model(model_dir, cfg, self.kernel_plan, self.dtype, config.load_format, tp)
        num_blocks = config.num_kv_blocks
        block_bytes = tp.kv_block_bytes(cfg, config.block_size, self.dtype)
        if num_blocks is None:
            num_blocks = _kv_blocks_from_memory(block_bytes, config.gpu_memory_utilization)
        if num_blocks is None:  # CPU: every sequence at full length, within CPU_KV_CACHE_BYTES
            budget = CPU_KV_CACHE_BYTES // block_bytes
            num_blocks = max(min(config.max_num_seqs * -(-max_model_len // config.block_size), budget), 1)
        if multihost.is_multihost():  # every process's cache has the same shape: the smallest fits all
            from jax.experimental import multihost_utils

            num_blocks = int(np.min(multihost_utils.process_allgather(np.int64(num_blocks))))
        # A lone request must always fit, or it could never finish.
        self.max_model_len = min(max_model_len, num_blocks * config.block_size)
        self.num_total_blocks = num_blocks
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, host_tier=self.host_tier
        )
        self.sessions = Sessions(
            self.block_manager, int(config.session_cache_share * num_blocks), config.session_ttl,
            config.max_session_ttl, config.session_cache_share > 0 and config.enable_prefix_caching, clock,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self.scheduler.reclaim = self.sessions.reclaim
        self.scheduler.favored = self.sessions.favored
        per_launch = config.layers_per_launch
        if per_launch is None:  # (groups of layers: bench/profile_step.py, bench/startup_gpu.py)
            per_launch = GPU_LAYERS_PER_LAUNCH if jax.default_backend() == "gpu" and not tp.sharded else 0
        self.runner = ModelRunner(
            decoder, num_blocks, config.block_size, config.max_num_seqs, config.max_num_batched_tokens,
            self.max_model_len, self.dtype, tp, kv_moves=self.host_tier is not None,
            executable_dir=self._executable_dir(), layers_per_launch=per_launch,
            compiler_options=autotune_options(config.autotune_level),
        )  # fmt: skip
        self.pipeline = StepPipeline(self.runner, config.async_scheduling)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.adapters = AdapterManager(
            cfg, config.max_loras, config.max_lora_rank, self.max_model_len, self.dtype, self.tokenize,
            keep_flat_a=self.kernel_plan.keeps_flat_lora_a(self.runner.smallest_step), tp=tp,
            max_cpu_loras=config.max_cpu_loras,
        )  # fmt: skip
        self.scheduler.adapters = self.adapters  # admission claims each adapter request's slot
        bytes_per_token = PROMPT_BYTES_PER_TOKEN
        if self.tokenizer is not None:
            longest = max((len(t.encode()) for t in self.tokenizer.get_vocab(with_added_tokens=True)), default=0)
            bytes_per_token = max(bytes_per_token, longest)
        self.max_prompt_bytes = bytes_per_token * self.max_model_len
        self.requests: dict[str, Request] = {}
        self._owed: list[RequestDelta] = []  # deltas not handed out yet (aborts; outputs of a failed step() call)
        self._rng = random.Random(config.seed)
        if config.warmup:
            self.runner.warmup()
        self.runner.leader = self.multihost_leader  # from here on process 0 sends each device call
        self.adapters.on_place = self._replay_place  # and each adapter swap, before the step that reads it

    def _executable_dir(self) -> Path | None:
        """Where the runner keeps its compiled step variants across starts (jalora/engine/executables.py):
        inside the compile cache's directory, off with it. Several hosts keep JAX's cache only (each
        process would write the same files)."""
        if self.compile_cache is None or multihost.is_multihost():
            return None
        return self.compile_cache / executables.SUBDIR

    def _make_host_tier(self, cfg: ModelConfig, tp: TensorParallel) -> HostKVTier | None:
        """The host-memory KV tier of config.host_kv_cache_gb (None for 0). Raises InvalidRequestError
        naming host_kv_cache_gb where it cannot be made."""
        gib = self.config.host_kv_cache_gb
        if not gib:
            return None
        if multihost.is_multihost():
            raise InvalidRequestError(
                "host_kv_cache_gb", "is not supported on several hosts yet (each process would have to keep "
                "its own devices' KV heads); leave it at 0",
            )  # fmt: skip
        bs = self.config.block_size
        block_shape = (cfg.num_layers, 2, bs, tp.kv_shape(cfg, 1, bs)[2], cfg.head_dim)
        block_bytes = int(np.prod(block_shape)) * np.dtype(self.dtype).itemsize
        capacity = HostKVTier.capacity_for(gib, block_bytes)
        if capacity < 1:
            raise InvalidRequestError(
                "host_kv_cache_gb", f"{gib} GiB holds no KV block (one takes {block_bytes} bytes)"
            )
        try:
            return HostKVTier(capacity, block_shape, self.dtype)
        except MemoryError as e:
            raise InvalidRequestError(
                "host_kv_cache_gb", f"cannot reserve {gib} GiB of host memory for the KV tier: {e}"
            ) from e

    def on_failure(self, callback) -> None:
        """`callback(reason)` when a follower process of a multi-host engine is lost (at once if one is)."""
        if self.multihost_leader is not None:
            self.multihost_leader.on_lost(callback)

    def _replay_place(self, name: str, slot: int):
        """The context of an adapter swap's write: on a multi-host process 0, the followers' writes of the same
        slot run with it (a failure in between loses the group, as a step's would)."""
        if self.multihost_leader is None:
            return contextlib.nullcontext()
        return self.multihost_leader.lockstep("place_adapter", name, slot)

    def close(self, error: str | None = None) -> None:
        """Stops the follower processes of a multi-host engine (they return from `multihost.follow`, with
        `error`: why process 0 stops, if it failed) and the host tier's worker thread."""
        if self.host_tier is not None:
            self.host_tier.close()
        if self.multihost_leader is not None:
            self.multihost_leader.close(error)
            self.multihost_leader = None
            if getattr(self, "runner", None) is not None:
                self.runner.leader = None

    def warmup_adapters(self, progress: bool = True, with_base: bool = False) -> None:
        """Compiles the adapted-step variant of every bucket (call after loading adapters; a server
        does, so the first adapter request does not pay a compilation). `with_base`: the base-only
        variants too, compiled together with the adapted ones, for an engine built with
        `warmup=False` whose adapters were loaded next (a server's start: its start-up adapters are
        known before anything compiles). One process only: over several, each launch of a warm-up step
        runs with the other processes, which warm up the base steps as they build their engines."""
        if with_base:
            if self.multihost_leader is not None:
                raise ValueError("warmup_adapters(with_base=True) needs a single-process engine")
            self.runner.warmup(progress, adapters=self.adapters.stacks, with_base=True)
        elif self.adapters.stacks:
            if self.multihost_leader is None:
                self.runner.warmup(progress, adapters=self.adapters.stacks)
                return
            with self.multihost_leader.lockstep("warmup_adapters"):  # (an interrupt here loses the group)
                self.runner.warmup(progress, adapters=self.adapters.stacks)

    # -- tokenizer -------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Thread-safe (tokenizers' Rust tokenizer releases the GIL while it encodes)."""
        if not isinstance(text, str):
            raise InvalidRequestError("prompt", f"must be text to tokenize, got {type(text).__name__}")
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", f"{self.config.model} has no tokenizer.json; pass token ids instead")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Thread-safe. The text of `token_ids` (special tokens left out), as a stream's pieces add up to."""
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", f"{self.config.model} has no tokenizer.json: no text for token ids")
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Thread-safe. Each token's own text, decoded alone with special tokens kept (what OpenAI's
        logprobs show per token; a token inside a multi-byte character reads as U+FFFD)."""
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in token_ids]
        return [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Thread-safe. Each token's own bytes (detokenizer.TokenBytes); without a tokenizer its token_texts name."""
        if self.tokenizer is None:
            return [text.encode() for text in self.token_texts(token_ids)]
        return self._token_bytes(token_ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Thread-safe. Token ids of a conversation rendered with the model's chat template
        (jalora/engine/chat.py)."""
        if self.chat_template is None:
            raise InvalidRequestError("messages", f"{self.config.model} has no chat template; send a prompt instead")
        return self.chat_template.render(messages, add_generation_prompt)

    def default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults (generation_config.json), for requests that bring none."""
        return dataclasses.replace(self._default_params)

    def _sampling_defaults(self) -> SamplingParams:
        """Sampled with generation_config's temperature / top_p / top_k / min_p where it sets do_sample, else
        greedy; its max_new_tokens as max_tokens and its repetition_penalty (transformers applies it greedy or
        not; vLLM takes it too); SamplingParams' own defaults for the rest."""
        gen = self.generation_config
        fields = {}
        if gen.get("do_sample"):
            for key in ("temperature", "top_p", "top_k", "min_p"):
                if gen.get(key) is not None:
                    fields[key] = gen[key]
            fields.setdefault("temperature", 1.0)
        if gen.get("max_new_tokens") is not None:
            fields["max_tokens"] = gen["max_new_tokens"]
        if gen.get("repetition_penalty") is not None:
            fields["repetition_penalty"] = gen["repetition_penalty"]
        try:
            return SamplingParams(**fields)
        except InvalidRequestError as e:
            raise InvalidRequestError("generation_config.json", str(e)) from e

    # -- adapters --------------------------------------------------------------------------------

    def prepare_adapter(self, path: str, roots: Sequence[str] | None = None) -> PreparedAdapter:
        """Thread-safe: reads and validates a PEFT directory (see AdapterManager.prepare)."""
        return self.adapters.prepare(path, roots)

    def load_adapter(
        self, name: str, adapter: str | PreparedAdapter, roots: Sequence[str] | None = None
    ) -> AdapterInfo:
        """Loads a PEFT directory (confined to `roots` if given), or installs what `prepare_adapter` made
        of one, under `name`. On several hosts process 0 alone reads it, and sends the followers what it
        read and checked (they read nothing: a directory missing or different on their hosts changes
        nothing)."""
        info, prepared = self.adapters.load_prepared(name, adapter, roots)
        if self.multihost_leader is not None:  # the very arrays process 0 installed, into the same slot (or none)
            self.multihost_leader.send("load_adapter", name, prepared, self.adapters.slot_of(name))
        return info

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)
        if self.multihost_leader is not None:
            self.multihost_leader.send("unload_adapter", name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.infos()

    def info(self) -> EngineInfo:
        cfg = self.model_config
        return EngineInfo(
            model=self.config.model,
            dtype=self.config.dtype,
            platform=jax.default_backend(),
            block_size=self.config.block_size,
            num_total_blocks=self.num_total_blocks,
            num_free_blocks=self.block_manager.num_free_blocks(),
            max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_loras=self.config.max_loras,
            vocab_size=cfg.vocab_size,
            eos_token_ids=list(self.eos_token_ids),
            max_session_ttl=self.config.max_session_ttl,
            max_cpu_loras=self.adapters.max_cpu_loras,
            host_kv_cache_blocks=0 if self.host_tier is None else self.host_tier.capacity,
            max_new_tokens=self.generation_config.get("max_new_tokens"),
            session_max_blocks=self.sessions.max_blocks if self.sessions.enabled else 0,
        )

    def stats(self) -> EngineStats:
        sched, bm, compiles = self.scheduler, self.block_manager, self.runner.compiles
        prefix = sched.prefix_cache
        return EngineStats(
            num_requests_running=len(sched.running),
            num_requests_waiting=len(sched.waiting),
            running_adapters=_adapter_names(sched.running),
            waiting_adapters=_adapter_names(sched.waiting),
            max_loras=self.config.max_loras,
            max_cpu_loras=self.adapters.max_cpu_loras,
            num_adapters_loaded=self.adapters.num_loaded,
            num_adapters_resident=self.adapters.num_resident,
            num_total_blocks=self.num_total_blocks,
            num_used_blocks=bm.num_used_blocks(),
            num_cached_blocks=bm.num_cached_blocks(),
            num_retained_blocks=bm.num_retained_blocks(),
            num_sessions=len(self.sessions.live),
            prompt_tokens=self.output_processor.num_prompt_tokens,
            generation_tokens=self.output_processor.num_generation_tokens,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prefix_cache_hits_base_keyed=prefix.hits_base_keyed,
            prefix_cache_hits_base_keyed_by_adapters=prefix.hits_base_keyed_by_adapters,
            prefix_cache_evictions=bm.num_evictions,
            sessions_expired=self.sessions.counters.expired,
            sessions_evicted=self.sessions.counters.evicted,
            warmup_compilations=compiles.warmup,
            warmup_compile_seconds=compiles.warmup_seconds,
            compilations=compiles.serving,
            compile_seconds=compiles.serving_seconds,
            adapter_swaps=self.adapters.swaps.swaps,
            adapter_swap_seconds=self.adapters.swaps.seconds,
            **self._host_tier_stats(),
        )

    def _host_tier_stats(self) -> dict:
        tier = self.host_tier
        if tier is None:
            return {}
        c = tier.counters
        return dict(
            host_kv_cache_hits=c.hit_blocks * self.config.block_size,
            host_kv_cache_bytes_to_host=c.blocks_to_host * tier.block_bytes,
            host_kv_cache_bytes_to_device=c.blocks_to_device * tier.block_bytes,
            host_kv_cache_blocks=tier.num_used_blocks(),
            host_kv_cache_capacity_blocks=tier.capacity,
        )

    # -- requests --------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int], truncate: int | None = None) -> EncodedPrompt:
        """Thread-safe. Tokenizes a text prompt or checks token ids, and checks the length against
        max_model_len. Sizes are checked before anything is done per token: a text of more bytes than a
        prompt that fits can have (`max_prompt_bytes`) is refused untokenized, and a list of ids by its
        length before its values. With `truncate` (SamplingParams.truncate_prompt_tokens: k, or -1 for
        max_model_len - 1) only the prompt's last k tokens are kept, as vLLM keeps them, and a longer prompt is
        no error. Raises InvalidRequestError."""
        too_long = f"max_model_len is {self.max_model_len} (room for 1 new token)"
        keep = None
        if truncate is not None:
            keep = self.max_model_len - 1 if truncate == -1 else truncate
            if keep >= self.max_model_len:
                raise InvalidRequestError("truncate_prompt_tokens", f"is {truncate}; {too_long}, so at most "
                                          f"{self.max_model_len - 1} (or -1)")  # fmt: skip
        if isinstance(prompt, str):
            # len() first: a UTF-8 text has at least as many bytes as characters
            if keep is None and (len(prompt) > self.max_prompt_bytes or len(prompt.encode()) > self.max_prompt_bytes):
                raise InvalidRequestError(
                    "prompt", f"is over {self.max_prompt_bytes} bytes, more than any prompt within {too_long}"
                )
            ids = self.tokenize(prompt)
        elif isinstance(prompt, list | tuple | np.ndarray):
            if keep is None and len(prompt) >= self.max_model_len:
                raise InvalidRequestError("prompt", f"has {len(prompt)} tokens; {too_long}")
            ids = self._check_token_ids(prompt)
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        if keep is not None:
            ids = ids[-keep:]
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"has {len(ids)} tokens; {too_long}")
        return EncodedPrompt(ids)

    def _check_token_ids(self, prompt: list | tuple | np.ndarray) -> list[int]:
        """Token ids as Python ints, once every one is an integer (not a bool) of the vocabulary. Checked
        over the whole list at once: a 64k-token prompt took 33 ms one id at a time on a CI CPU, 3 ms so."""
        vocab = self.model_config.vocab_size
        if isinstance(prompt, np.ndarray):
            integers = prompt.ndim == 1 and prompt.dtype.kind in "iu"
        else:  # the distinct types of the ids (True's is bool, never int)
            integers = all(t is int or issubclass(t, np.integer) for t in set(map(type, prompt)))
        if not integers:
            raise InvalidRequestError("prompt_token_ids", "must be integers")
        try:
            ids = np.asarray(prompt, dtype=np.int64)
        except OverflowError:  # beyond int64: beyond the vocabulary
            ids = None
        if ids is None or (ids.size and (ids.min() < 0 or ids.max() >= vocab)):
            raise InvalidRequestError("prompt_token_ids", f"must be in [0, {vocab}) (the vocabulary)")
        return ids.tolist()

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int] | EncodedPrompt,
        params: SamplingParams,
        adapter: str | None = None,
        *,
        session: str | None = None,
        session_ttl: float | None = None,
        end_session: bool = False,
    ) -> None:
        """Validates and queues a request. Raises InvalidRequestError (or a subclass) and changes nothing.
        A prompt that is not an `EncodedPrompt` yet is encoded here (`encode_prompt`). With `session`, the
        blocks the request computed are retained for the session's next requests (jalora/engine/sessions.py)."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", "must be a SamplingParams")
        if params.n != 1:
            raise InvalidRequestError("n", f"is {params.n}: an engine request makes one completion (LLM.generate and "
                                      "the HTTP front run n requests, with params.child(i))")  # fmt: skip
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        if params.logit_bias and max(params.logit_bias) >= self.model_config.vocab_size:
            raise InvalidRequestError("logit_bias", f"keys must be token ids in [0, {self.model_config.vocab_size}) "
                                      "(the vocabulary)")  # fmt: skip
        if params.allowed_token_ids and max(params.allowed_token_ids) >= self.model_config.vocab_size:
            raise InvalidRequestError("allowed_token_ids", f"must be token ids in [0, {self.model_config.vocab_size}) "
                                      "(the vocabulary)")  # fmt: skip
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", f"{self.config.model} has no tokenizer.json: no text to match them in")
        early = banned_early(params, self.eos_token_ids)
        if params.allowed_token_ids and early and set(params.allowed_token_ids) <= set(early):
            raise InvalidRequestError("allowed_token_ids", f"are all stop or end-of-sequence ids, which min_tokens "
                                      f"({params.min_tokens}) bans: no token is left to draw")  # fmt: skip
        bans = len(early)
        if bans + len(params.logit_bias or ()) > MAX_DRAW_BIASES:
            raise InvalidRequestError("min_tokens", f"bans {bans} stop and end-of-sequence ids, which with the "
                                      f"logit_bias's {len(params.logit_bias or ())} are more than the draw's "
                                      f"{MAX_DRAW_BIASES}")  # fmt: skip
        ttl = self.sessions.check(session, session_ttl, end_session)
        if not isinstance(prompt, EncodedPrompt):
            prompt = self.encode_prompt(prompt, params.truncate_prompt_tokens)
        ids = prompt.token_ids
        resolved = self.adapters.resolve(adapter, ids)
        seed = params.draw_seed if params.seed is not None else self._rng.randrange(2**32)
        req = Request(request_id, ids, params, seed, self.eos_token_ids, adapter, resolved)
        first = self.sessions.continues(session)
        if session is not None:
            reserve = self.sessions.check_share(req, session, self.max_model_len)
            self.sessions.attach(req, session, ttl, end_session, reserve)
        self.adapters.acquire(adapter)
        self.requests[request_id] = req
        self.output_processor.add(req)
        self.scheduler.add(req, first=first)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return
        self._finish(req, "abort")
        self._owed.append(self.output_processor.finish(req))

    def end_session(self, session: str) -> None:
        """Ends a live pipeline session now: its retained blocks become evictable (still findable until
        evicted). Raises SessionNotFoundError for an id that is not live."""
        self.sessions.end(session)

    def is_session_live(self, session: str) -> bool:
        return self.sessions.is_live(session)

    def expire_sessions(self) -> tuple[int, float | None]:
        """Ends the sessions idle past their TTL (every step does too); returns how many it ended and the
        seconds until the next idle session may expire (None if there is none)."""
        return self.sessions.expire()

    def has_unfinished_requests(self) -> bool:
        loads = self.host_tier is not None and self.host_tier.num_loads > 0  # (blocks parked until they land)
        return self.scheduler.has_unfinished() or bool(self._owed) or self.pipeline.busy or loads

    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks()

    def _finish(self, req: Request, reason: str) -> None:
        self.sessions.finish(req)  # before its blocks are released: its session retains them
        self.scheduler.finish(req, reason)
        self.adapters.release(req.adapter_name)
        del self.requests[req.request_id]

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """Runs one engine step; returns the deltas of requests that got a token or ended.

        With async scheduling this enqueues the next batch, then reads back the previous one: the
        deltas returned are the previous step's."""
        deltas, self._owed = self._owed, []
        new, ready, reading, moving = None, [], False, False
        tier = self.host_tier
        try:
            self.sessions.expire()
            if tier is not None and tier.num_loads:  # copies back that reached the device: into the cache
                moving = True
                self.block_manager.landed(tier.land_loads(self.runner.scatter_kv_blocks))
                moving = False
            batch = self.scheduler.schedule()
            if tier is not None and not batch.requests and tier.num_loads and not self.pipeline.busy:
                # Nothing runs but requests waiting for their KV from the host tier: wait for it.
                moving = True
                self.block_manager.landed(tier.land_loads(self.runner.scatter_kv_blocks, wait=True))
                moving = False
                again = self.scheduler.schedule()
                again.preempted[:0] = batch.preempted
                batch = again
            if tier is not None:
                self.block_manager.copy_ahead()
            if tier is not None and tier.has_moves:  # the host tier's copies, ahead of the step (host_tier.py)
                moving = True
                tier.issue(self.runner.gather_kv_blocks, self.runner.put_kv_blocks)
                moving = False
            new = self.pipeline.dispatch(batch, self.adapters.stacks)  # rolls itself back if it fails
            ready = self.pipeline.take_ready(new)
            for step in ready:
                reading = True
                result = self.pipeline.read(step)
                reading = False
                now = time.monotonic()
                for row in self.pipeline.rows(step):
                    self._postprocess(row, result, now, deltas)
            if tier is not None:
                tier.poll()
        except BaseException as e:
            self._owed = deltas + self._owed  # outputs owed before the error come with the next call
            # Once read-back began, this call's steps are lost (results unread or half applied): their
            # requests recompute those tokens. A step that cannot be read back failed on the device
            # (an interrupt while waiting did not), and then the cache it wrote cannot be trusted.
            lost = list(ready)
            if new is not None and (ready or not self.pipeline.is_queued(new)):
                lost.append(new)  # read-back began, or an interrupt came before `new` was recorded
            self.pipeline.drop(lost)
            # A copy into the cache that failed leaves registered blocks without their KV.
            if (reading and isinstance(e, Exception)) or moving or self.runner.kv_cache_deleted():
                self._recompute_all()
            raise
        return deltas

    def _postprocess(self, row: Row, result: StepResult, now: float, deltas: list[RequestDelta]) -> None:
        req, i = row.request, row.index
        if req.prompt_logprobs is not None:
            for j in range(row.num_tokens):
                if row.start + j + 1 < len(req.prompt_token_ids):
                    req.prompt_logprobs[row.start + j + 1] = float(result.prompt_logprobs[row.first_row + j])
        if req.status is Status.RUNNING:  # publish the blocks this step completed (not a later one's)
            self.block_manager.register(req, row.start + row.num_tokens)
        if not row.sampled:
            return  # a prefill chunk: nothing sampled
        token = int(result.tokens[i])
        logprobs = ranks = None
        n = req.params.logprobs
        if n is not None:  # the sampled token, then the top n (vLLM's order and ranks: a top one's is its place)
            logprobs = {token: float(result.token_logprobs[i])}
            ranks = {token: int(result.token_ranks[i])}
            for place, (t, lp) in enumerate(zip(result.top_ids[i, :n].tolist(), result.top_logprobs[i, :n])):
                logprobs[t] = float(lp)
                ranks[t] = place + 1
        delta, reason = self.output_processor.append(req, token, logprobs, now, ranks)
        if reason is not None:
            self._finish(req, reason)
            delta = self.output_processor.finish(req, delta)
        deltas.append(delta)

    def _recompute_all(self) -> None:
        """After a step failed on the device (or took the donated cache with it): a fresh cache, an
        empty prefix cache, and every running request recomputed from its tokens."""
        self.runner.reset_kv_cache()
        self.sessions.forget_blocks()  # retained blocks hold no KV any more either
        self.block_manager.reset_prefix_cache()  # no cached block holds its KV any more (nor, trusted, the host tier)
        for req in list(self.scheduler.running):
            self.scheduler.preempt(req)
