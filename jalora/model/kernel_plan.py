"""KernelPlan: which kernel runs each op of the step, chosen once per engine.

The platform (GPU, TPU, or the pure-jnp reference elsewhere) and the device's tuning table decide the
defaults; EngineConfig may override each choice (tests run the Pallas kernels on CPU in interpret
mode). The decoder and the runner only read the plan: nothing else in the engine looks at the backend.

Masked multi-LoRA has two forms. The segment kernel walks runs of equal adapter slots that the host
builds per step and gives base-model rows no work at all (long prefills, where most rows precede the
activation). The one-hot form is two dense matmuls against every slot with the other slots' columns
zeroed, which needs only the per-token slots: cheaper than a kernel launch when the step is
decode-sized. `lora_tuning.onehot_max_tokens` is the step size (token rows) up to which the one-hot form
runs: on GPU decode-sized steps, on TPU none (the kernel always), on the CPU reference every step.
"""

from __future__ import annotations

import dataclasses

from jalora.config import EngineConfig
from jalora.errors import InvalidRequestError
from pallas_kernels.masked_lora import MaskedLoraTuning, masked_lora_tuning
from pallas_kernels.platform import device_kind, kernel_platform
from pallas_kernels.ragged_paged_attention import (
    GpuAttentionTuning,
    TpuAttentionTuning,
    gpu_attention_tuning,
    tpu_attention_tuning,
)

# The smallest step (token rows) whose last sequence's prefill chunk may take the split (a chunk of at least
# half of it). bench/attention.py on an H100 (725dc95): chunks of 256 rows run 0.72-0.80x the kernel's speed
# split, of 2048 rows 1.32x (no prefix) to 1.69x, of 8192 rows 1.64-1.66x; 1024 is unmeasured.
SPLIT_PREFILL_MIN_ROWS = 2048


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    attention: str  # "reference" | "gpu" | "tpu"
    lora: str  # the segment kernel: "reference" | "gpu" | "tpu"
    lora_tuning: MaskedLoraTuning  # when a step takes the one-hot form; the segment kernel's token tile
    interpret: bool  # Pallas kernels in interpret mode (CPU)
    attention_tuning: GpuAttentionTuning | TpuAttentionTuning | None  # the attention kernel's table entry
    norm: str = "reference"  # residual add + RMSNorm: "reference" (jnp) | "gpu" (one fused kernel)
    # one sequence's prefill chunk: "kernel" (the attention kernel, as every step) | "cudnn" | "reference"
    # (split_prefill_attention's impls)
    prefill: str = "kernel"

    @classmethod
    def from_config(cls, config: EngineConfig) -> KernelPlan:
        """The plan for this process's platform; raises InvalidRequestError naming the field if the config
        asks for a kernel this platform cannot run (a Pallas kernel of another platform runs only in
        interpret mode)."""
        platform, kind = kernel_platform(), device_kind()
        attention = config.attention_impl or platform
        lora = config.lora_impl or platform
        norm = config.norm_impl or "reference"
        nvidia = platform == "gpu" and kind.startswith("NVIDIA")
        # cuDNN's chunks by default where the GPU kernel runs on an NVIDIA GPU (bench/attention.py: 1.3-1.7x the
        # kernel on chunks of 2048 and 8192 rows on an H100; pipeline A's 64k base prefill 6.12 -> 4.61 s). A
        # start with them once ran out of device memory in the warm-up's autotuning, several compilations at
        # once: such a compilation is now compiled again alone (executables.get_all); the H100 start at
        # 795904c came up without needing it (bench/results/startup_gpu_cudnn_h100.json).
        prefill = config.prefill_attention_impl or ("cudnn" if nvidia and attention == "gpu" else "kernel")
        if prefill == "cudnn" and not nvidia:
            raise InvalidRequestError(
                "prefill_attention_impl", f"cudnn needs an NVIDIA GPU, not this {platform} platform ({kind})"
            )
        for field, impl in (("attention_impl", attention), ("lora_impl", lora), ("norm_impl", norm)):
            if impl not in ("reference", platform) and not config.kernel_interpret:
                raise InvalidRequestError(
                    field, f"the {impl} kernel cannot run on this {platform} platform (kernel_interpret runs it on any)"
                )
        lora_tuning = masked_lora_tuning(platform, kind)
        if config.lora_onehot_max_tokens is not None:
            lora_tuning = dataclasses.replace(lora_tuning, onehot_max_tokens=config.lora_onehot_max_tokens)
        attention_tuning = {"gpu": gpu_attention_tuning, "tpu": tpu_attention_tuning}.get(attention)
        return cls(
            attention=attention,
            lora=lora,
            lora_tuning=lora_tuning,
            interpret=config.kernel_interpret,
            attention_tuning=None if attention_tuning is None else attention_tuning(kind),
            norm=norm,
            prefill=prefill,
        )

    @property
    def single_token_step(self) -> bool:
        """True if steps of one token row compile on their own: where no Pallas kernel runs, so no kernel
        tile sets a smallest step size (jalora/engine/model_runner.py, token_buckets)."""
        return self.attention == "reference" and self.lora == "reference"

    def lora_takes_segments(self, num_tokens: int) -> bool:
        """True if a step of `num_tokens` rows runs the segment kernel (else the one-hot form)."""
        return not self.lora_tuning.takes_onehot(num_tokens)

    def keeps_flat_lora_a(self, smallest_step: int) -> bool:
        """True if some step can take the one-hot form, whose A layout adapter stacks must then keep."""
        return not self.lora_takes_segments(smallest_step)

    def long_decode(self, num_seqs: int, num_kv_heads: int, max_kv_len: int) -> bool:
        """True if a decode step of `num_seqs` sequences (`num_kv_heads` per device), the longest holding
        `max_kv_len` keys, should run the attention kernel's long-context grid (GPU kernel only)."""
        if self.attention != "gpu":
            return False
        from pallas_kernels.ragged_paged_attention.gpu import wants_long_grid

        return wants_long_grid(self.attention_tuning, num_seqs, num_kv_heads, max_kv_len)

    def long_chunk(self, rows: int, max_kv_len: int, longest_chunk: int, group: int) -> bool:
        """True if a decode-shaped step of `rows` token rows (its bucket) whose longest sequence brings
        `longest_chunk` rows, the longest context holding `max_kv_len` keys (`group` query heads per kv head),
        should run the attention kernel's long-chunk variant (query blocks of the bucket, the long-context grid;
        GPU kernel only; `gpu.wants_long_chunk`)."""
        if self.attention != "gpu":
            return False
        from pallas_kernels.ragged_paged_attention.gpu import wants_long_chunk

        return wants_long_chunk(self.attention_tuning, rows, max_kv_len, longest_chunk, group)

    def split_prefill(self, rows: int, last_chunk: int, sliding_window: int | None) -> bool:
        """True if a step of `rows` token rows (its bucket) whose last sequence brings `last_chunk` query rows
        runs that sequence through split_prefill_attention (the others through the kernel): a bucket of at
        least SPLIT_PREFILL_MIN_ROWS and a chunk of at least half that, where the plan asks for the split
        and the model has no sliding window."""
        return (self.prefill != "kernel" and rows >= SPLIT_PREFILL_MIN_ROWS
                and 2 * last_chunk >= SPLIT_PREFILL_MIN_ROWS and not sliding_window)  # fmt: skip

    @property
    def kv_write(self) -> str:
        """The impl that rotates the keys and writes K/V into the cache (`write_kv_rope`): "gpu" (one
        kernel) where the GPU attention kernel runs and its tuning asks for it, else "reference"."""
        return "gpu" if self.attention == "gpu" and self.attention_tuning.kv_write_kernel else "reference"

    @property
    def kv_write_rotates_q(self) -> bool:
        """True if the K/V write kernel also rotates the step's queries (`write_kv_rope(rotate_q=True)`), where
        it runs ("gpu") and its tuning asks for it; else XLA rotates them (`apply_rope`)."""
        return self.kv_write == "gpu" and self.attention_tuning.rope_q_in_kv_write

    def interpret_arg(self, impl: str):
        """The `interpret` argument of a Pallas call for kernel `impl`."""
        if not self.interpret or impl == "reference":
            return False
        if impl == "tpu":
            from jax.experimental.pallas import tpu as pltpu

            return pltpu.InterpretParams()
        return True
