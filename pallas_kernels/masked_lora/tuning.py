"""Tuning of masked multi-LoRA, as data: one frozen record per (platform, device kind).

The ops never choose the one-hot path themselves (`impl=None` is the platform's kernel, or the
reference off GPU/TPU); a caller that builds steps (the engine) reads `onehot_max_tokens` to decide
which form a step takes, and `block_tokens` to cut the segments' work list.
"""

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from pallas_kernels.masked_lora.segments import DEFAULT_BLOCK_TOKENS
from pallas_kernels.platform import PLATFORMS, kernel_platform
from pallas_kernels.platform import device_kind as current_device_kind


@dataclasses.dataclass(frozen=True)
class MaskedLoraTuning:
    """When a step takes the one-hot matmuls instead of the kernel, and the kernels' token tile."""

    # Steps of at most this many token rows take the one-hot path (`masked_lora_onehot_flat`);
    # larger steps take the kernel, which gives slot -1 rows no work at all. 0 = always the kernel;
    # None = no limit, always one-hot.
    onehot_max_tokens: int | None
    # Rows of a token tile of the segments' work list (`build_lora_segments(block_tokens=...)`).
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self):
        if self.onehot_max_tokens is not None and self.onehot_max_tokens < 0:
            raise ValueError(f"onehot_max_tokens must be >= 0 or None, got {self.onehot_max_tokens}")
        if self.block_tokens < 1 or self.block_tokens & (self.block_tokens - 1):
            raise ValueError(f"block_tokens must be a power of two, got {self.block_tokens}")

    def takes_onehot(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` token rows takes the one-hot path."""
        return self.onehot_max_tokens is None or num_tokens <= self.onehot_max_tokens


# GPU: decode-sized steps take the one-hot path. There the whole LoRA work is
# T * slots * (Din + Dout) * R MACs, a few hundred MFLOP per layer, and the kernel's two launches per
# projection cost more than that work (H200: one-hot 27.7 us vs kernel 37.2 us per fused-qkv call at
# 64 tokens over 8 adapters, bench/results/lora.json).
GPU_MASKED_LORA_TUNING = MaskedLoraTuning(onehot_max_tokens=128)
# TPU: always the kernel (one call fuses shrink and expand).
TPU_MASKED_LORA_TUNING = MaskedLoraTuning(onehot_max_tokens=0)
# Reference platforms (CPU): always the one-hot matmuls, which need no host-built segments.
REFERENCE_MASKED_LORA_TUNING = MaskedLoraTuning(onehot_max_tokens=None)

# (platform, device kind) -> record; device_kind None is the platform's entry for any device.
MASKED_LORA_TUNING: Mapping[tuple[str, str | None], MaskedLoraTuning] = MappingProxyType({
    ("gpu", None): GPU_MASKED_LORA_TUNING,
    ("tpu", None): TPU_MASKED_LORA_TUNING,
    ("reference", None): REFERENCE_MASKED_LORA_TUNING,
})  # fmt: skip


def masked_lora_tuning(platform: str | None = None, device_kind: str | None = None) -> MaskedLoraTuning:
    """The record of (platform, device_kind): the device's own entry if the table has one, else the
    platform's. platform None = `kernel_platform()`; device_kind None = the current device's kind
    when the platform is the current one, else the platform's entry."""
    if platform is None:
        platform = kernel_platform()
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
    if device_kind is None and platform == kernel_platform():
        device_kind = current_device_kind()
    own = MASKED_LORA_TUNING.get((platform, device_kind))
    return own if own is not None else MASKED_LORA_TUNING[(platform, None)]


__all__ = [
    "GPU_MASKED_LORA_TUNING",
    "MASKED_LORA_TUNING",
    "REFERENCE_MASKED_LORA_TUNING",
    "TPU_MASKED_LORA_TUNING",
    "MaskedLoraTuning",
    "masked_lora_tuning",
]
