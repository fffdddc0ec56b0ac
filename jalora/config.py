"""EngineConfig: every knob of the engine in one validated dataclass.

`LLM(model, **kwargs)` and `jalora serve` both build one; the command line derives its flags, types,
defaults and help from the fields below (server/cli.py), so each default is written once, here.
Validation runs on construction, before any weight is read or any step compiled: a bad value raises
`InvalidRequestError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jalora.errors import InvalidRequestError

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "orbax", "dummy")
KERNEL_IMPLS = ("reference", "gpu", "tpu")


def config_field(default, help: str, **extra):
    """A config field whose metadata carries what a command line needs: help, and optional choices/metavar."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def require(ok: bool, field: str, message: str) -> None:
    """Validation of a config: raises InvalidRequestError naming `field` unless `ok`."""
    if not ok:
        raise InvalidRequestError(field, message)


def is_int(value) -> bool:
    """An int that is not a bool (True passes isinstance(True, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool; an int too large for a float (10**400) is not one."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = config_field(
        "", "HF model directory (config.json, safetensors, tokenizer.json) or a llama .gguf file (converted once "
        "into jalora's cache)"
    )
    dtype: str = config_field("float32", "weights, activations and KV cache dtype", choices=DTYPES)
    load_format: str = config_field("auto", "'dummy' makes deterministic random weights of the config's shapes; "
                              "'orbax' restores a checkpoint of 'jalora export-orbax' (auto finds it)",
                              choices=LOAD_FORMATS)  # fmt: skip
    block_size: int = config_field(16, "tokens per KV-cache block (the unit of prefix sharing)")
    num_kv_blocks: int | None = config_field(
        None, "KV-cache blocks (default: gpu_memory_utilization of the device's memory; on a CPU, every "
        "sequence at full length within 1 GiB)"
    )
    gpu_memory_utilization: float = config_field(0.9, "share of device memory the weights and KV cache may take")
    max_num_seqs: int = config_field(64, "sequences in one step")
    max_num_batched_tokens: int = config_field(2048, "tokens in one step (prefill chunks and decode tokens together)")
    max_model_len: int | None = config_field(None, "longest sequence, prompt + output (default: the model's)")
    enable_prefix_caching: bool = config_field(True, "share full KV blocks between requests by base-aligned hash")
    host_kv_cache_gb: float = config_field(
        0.0,
        "host RAM (GiB) for KV blocks evicted from the device, copied back on a prefix-cache hit instead of "
        "recomputed (0 = off)",
    )
    max_loras: int = config_field(4, "adapter slots on the device")
    max_cpu_loras: int | None = config_field(
        None, "adapters loaded at once, kept in host memory; up to max_loras of them hold a device slot and the "
        "others are swapped into the least recently used idle slot when a request needs them (default: "
        "max_loras, no swapping)"
    )
    max_lora_rank: int = config_field(64, "largest adapter rank (every slot is padded to it)")
    async_scheduling: bool = config_field(
        True, "enqueue step N+1 before reading step N back, so host work overlaps the device's"
    )
    warmup: bool = config_field(True, "compile every step shape at start, before serving")
    seed: int = config_field(0, "draws the seed of sampled requests that bring none")
    attention_impl: str | None = config_field(
        None, "ragged paged attention kernel (default: the platform's)", choices=KERNEL_IMPLS
    )
    lora_impl: str | None = config_field(
        None, "masked multi-LoRA kernel (default: the platform's)", choices=KERNEL_IMPLS
    )
    norm_impl: str | None = config_field(
        None, "residual add + RMSNorm: 'gpu' fuses them in one Pallas kernel (default: 'reference', the jnp "
        "form XLA compiles, on every platform)", choices=("reference", "gpu")
    )
    prefill_attention_impl: str | None = config_field(
        None, "a step's last sequence when it is a prefill chunk of >= 1024 rows in a step of >= 2048: 'kernel' "
        "runs the attention kernel as every step does; 'cudnn' runs cuDNN's flash attention, the chunk's prefix "
        "and its own keys apart, merged (NVIDIA GPUs; models without a sliding window); 'reference' that split "
        "in jnp (tests) (default: 'cudnn' where the GPU attention kernel runs on an NVIDIA GPU, else 'kernel')",
        choices=("kernel", "cudnn", "reference")
    )
    lora_onehot_max_tokens: int | None = config_field(
        None, "steps of at most this many token rows take the one-hot LoRA matmuls instead of the kernel "
        "(default: the device's tuning table; 0 = always the kernel)"
    )
    kernel_interpret: bool = config_field(False, "run the Pallas kernels in interpret mode (CPU tests)")
    layers_per_launch: int | None = config_field(
        None, "run each step as a compiled group of this many decoder layers launched once per group (a cold "
        "start compiles a group per step variant instead of every layer unrolled); 0 = one compiled launch "
        "of the whole step (default: 8 on a GPU with an unsharded model, else 0); unsharded models only"
    )
    compile_cache: str | None = config_field(
        "auto", "directory of JAX's persistent compilation cache, so a later start loads the compiled steps "
        "instead of compiling them ('auto': compile-cache under jalora's cache directory; 'none': off)",
        metavar="DIR",
    )
    autotune_level: int | None = config_field(
        None, "XLA's GPU autotuning level for the engine's compilations, 0 (off) to 5; default: 4 on a GPU, XLA's "
        "own (buffers initialised, outputs reinitialised, a candidate whose result differs from a reference "
        "not picked), unless XLA_FLAGS sets --xla_gpu_autotune_level. 2 skips the check: a faster cold start, "
        "at the risk of a wrong kernel",
        metavar="LEVEL",
    )
    tensor_parallel_size: int = config_field(
        1, "devices the model is split over (Megatron-style: heads, MLP features, vocabulary; KV cache by KV head)"
    )
    session_cache_share: float = config_field(
        0.5, "largest share of the KV cache that pipeline sessions may keep from eviction (0 turns sessions off)"
    )
    session_ttl: float = config_field(60.0, "seconds an idle pipeline session lives when its request names no TTL")
    max_session_ttl: float = config_field(3600.0, "longest TTL a request may give its pipeline session (seconds)")

    def __post_init__(self):
        model = os.fspath(self.model) if isinstance(self.model, os.PathLike) else self.model
        require(isinstance(model, str) and bool(model), "model", "must name a model directory or .gguf file")
        object.__setattr__(self, "model", model)
        dtype = _dtype_name(self.dtype)
        require(dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        require(self.load_format in LOAD_FORMATS, "load_format",
                f"must be one of {list(LOAD_FORMATS)}, got {self.load_format!r}")  # fmt: skip
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank",
                     "tensor_parallel_size"):  # fmt: skip
            value = getattr(self, name)
            require(is_int(value) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        require(self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks >= 1),
                "num_kv_blocks", f"must be None or an integer >= 1, got {self.num_kv_blocks!r}")  # fmt: skip
        require(self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len >= 2),
                "max_model_len", f"must be None or an integer >= 2, got {self.max_model_len!r}")  # fmt: skip
        u = self.gpu_memory_utilization
        require(is_number(u) and 0 < u <= 1,
                "gpu_memory_utilization", f"must be a number in (0, 1], got {u!r}")  # fmt: skip
        g = self.host_kv_cache_gb
        require(is_number(g) and g >= 0,
                "host_kv_cache_gb", f"must be a number >= 0 (GiB; 0 = no host tier), got {g!r}")  # fmt: skip
        require(g == 0 or self.enable_prefix_caching is not False, "host_kv_cache_gb",
                "keeps prefix-cache blocks: it needs enable_prefix_caching")  # fmt: skip
        for name in ("enable_prefix_caching", "async_scheduling", "warmup", "kernel_interpret"):
            require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        n = self.layers_per_launch
        require(n is None or (is_int(n) and n >= 0), "layers_per_launch", f"must be None or an integer >= 0, got {n!r}")
        require(not (n and self.tensor_parallel_size > 1), "layers_per_launch",
                "runs an unsharded model only (tensor_parallel_size is 1)")  # fmt: skip
        require(is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        for name, impls in (("attention_impl", KERNEL_IMPLS), ("lora_impl", KERNEL_IMPLS),
                            ("norm_impl", ("reference", "gpu"))):  # fmt: skip
            value = getattr(self, name)
            require(value is None or value in impls, name, f"must be None or one of {list(impls)}, got {value!r}")
        n = self.max_cpu_loras
        require(n is None or (is_int(n) and n >= self.max_loras), "max_cpu_loras",
                f"must be None or an integer >= max_loras ({self.max_loras}), got {n!r}")  # fmt: skip
        n = self.autotune_level
        require(n is None or (is_int(n) and 0 <= n <= 5), "autotune_level", f"must be None or 0 to 5, got {n!r}")
        cc = os.fspath(self.compile_cache) if isinstance(self.compile_cache, os.PathLike) else self.compile_cache
        require(cc is None or (isinstance(cc, str) and bool(cc)), "compile_cache",
                f"must be a directory, 'auto' or 'none', got {self.compile_cache!r}")  # fmt: skip
        object.__setattr__(self, "compile_cache", None if cc is None or cc.lower() == "none" else cc)
        n = self.lora_onehot_max_tokens
        require(n is None or (is_int(n) and n >= 0), "lora_onehot_max_tokens",
                f"must be None or an integer >= 0, got {n!r}")  # fmt: skip

        share = self.session_cache_share
        require(is_number(share) and 0 <= share < 1, "session_cache_share",
                f"must be a number in [0, 1), got {share!r}")  # fmt: skip
        require(is_number(self.max_session_ttl) and self.max_session_ttl > 0, "max_session_ttl",
                f"must be a number > 0, got {self.max_session_ttl!r}")  # fmt: skip
        ttl = self.session_ttl
        require(is_number(ttl) and 0 < ttl <= self.max_session_ttl, "session_ttl",
                f"must be a number in (0, max_session_ttl={self.max_session_ttl!r}], got {ttl!r}")  # fmt: skip

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _dtype_name(dtype) -> str | None:
    """'bfloat16' from a name, a numpy/JAX dtype or a scalar type such as jnp.bfloat16."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None) or getattr(getattr(dtype, "dtype", None), "name", None)
    if name is None and isinstance(dtype, type):  # jnp.bfloat16 and friends are scalar types
        name = getattr(dtype, "__name__", None)
    return name if name in DTYPES else None
