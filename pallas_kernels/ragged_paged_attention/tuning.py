"""Tuning of the ragged paged attention kernels, as data: one frozen record per device kind.

A kernel call takes its record as a static argument (`tuning=`; None = the current device's entry
of the table). Records are frozen and hashable, so a record can key a jit cache or be a static
argument of a jitted caller. Explicit per-call knobs of the kernels (block_m, num_kv_splits, ...)
override the record.

Measured on one H200 (JAX 0.11.2, bf16, Hq 32 / Hkv 8, D 128, block_size 16); the H100 shares the
H200's SM count and entry. The one-launch split merge and K/V write (combine_*, kv_write_kernel) were
measured at batch-1 decode on an H100 only (their first versions on the H200), batch 64 and prefill
steps not at all. Any other device gets the same values (`DEFAULT_*`), unmeasured there.
"""

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from pallas_kernels.platform import device_kind as current_device_kind

SplitRule = tuple[int, tuple[tuple[int, int], ...]]


@dataclasses.dataclass(frozen=True)
class GpuAttentionTuning:
    """Knobs of the GPU kernel (gpu.py) that the caller does not pass per call."""

    # kv splits per query block of a decode-shaped step as a function of its programs (real query
    # blocks x kv heads), read by `split_rule`: the most splits, then (programs bound, fewer splits
    # past it) pairs. H200 at the engine's padded step shapes (bench/results/attention_splits.json):
    # batch 1 and 4 are fastest with 16 splits (64k context: 157 us vs 486 us with the static
    # heuristic `default_num_kv_splits`), batch 16 with 4, batch 64 with 2 (8k: 526 us vs 648 us).
    # A 64-split grid whose rule gives 64 splits to <= 16 programs, (64, ((16, 48), (64, 12), (256, 2),
    # (1024, 1))), takes batch 1 at 64k from 164 to 100 us, but its idle programs cost every other
    # step of the same bucket (batch 1 at 1k 19 -> 28 us, batch 16 at 8k 162 -> 202 us;
    # bench/results/attention_split_grid.json), so the 16-split rule is the default.
    split_rule: SplitRule = (16, ((64, 12), (256, 2), (1024, 1)))
    # Long-context decode: a decode-shaped step whose caller passes `long_context=True` (the engine does
    # for its smallest bucket when a sequence holds >= `long_context_keys` keys and this rule gives its
    # sequences more splits than `split_rule`: a variant of its own) launches this rule's grid instead,
    # so the idle programs of the bigger grid cost only the steps that gain from it. None: never.
    long_split_rule: SplitRule | None = (64, ((16, 48), (64, 12), (256, 2), (1024, 1)))
    long_context_keys: int = 32768
    # Small chunks after a long context: a decode-shaped step of at most `long_chunk_max_rows` rows in which
    # a sequence brings several query rows (an adapter's invocation after a long cached prompt, a new chat
    # turn) and the context reaches `long_context_keys`. Decode's query blocks hold `decode_block_m // g`
    # tokens (4 at g = 4), so each block of such a chunk reads the whole context again: an 18-row aLoRA
    # judge after 64k cached keys read it 5 times, ~0.5 ms a layer on an H100 (pipeline A: 28.7 ms of its
    # 36 ms TTFT). The caller's `long_chunk=True` (a variant of its own) takes query blocks of the bucket's
    # rows (at most `prefill_block_m`: the chunk in one block, the context read once per kv head) and the
    # long-context rule with its whole grid (a chunk step may hold one sequence). 0: never. H100 (795904c):
    # an 18-row chunk after 64k keys 535 -> 188 us a layer (16k: 141 -> 97 us;
    # bench/results/attention_small_chunks_h100.json); pipeline A's 64k aLoRA judge 35.8 -> 20.2 ms TTFT
    # (pipeline_bench_granite-8b_h100.json against pipeline_bench_granite-8b_optin_h100.json).
    long_chunk_max_rows: int = 32
    # The dynamic rule gives each working split at least this many kv tiles of the sequence (1 = no
    # floor). Floors of 4 and 8 with the 64-split rule above: no better than without
    # (bench/results/attention_split_grid.json).
    min_tiles_per_split: int = 1
    # Decode-shaped steps (T <= S) launch `decode_grid_splits` split programs and pick on the device,
    # from the step's real sequence count, how many of them work (`split_rule`): batch 1 and batch 64
    # pad to the same shapes but want 16 and 2 splits. False: the static `default_num_kv_splits`.
    dynamic_splits: bool = True
    # Merge the kv splits' partials in one Pallas launch of `combine_block_rows` x `combine_block_cols`
    # programs (`combine_splits`) instead of XLA's combine (its reductions and the padding-row select). One
    # H100 call, batch-1 decode (bench/results/profile_step_b1*_onelaunch2*_h100.json): 165 us a step against
    # XLA's 169 us at 1k (16 splits), 369 us against ~455 us at 64k (the 64-split long grid). A first
    # version looping over the splits took 303 us at 1k on the H200 (profile_step_b1_onelaunch_h200.json).
    # A program unrolls the splits: it holds one partial tile of rows x columns per split in flight. The merge
    # of a step of at most `combine_small_max_tokens` tokens (its bucket: a batch of at most 16 decode rows)
    # and `combine_small_max_splits` splits takes the small tiling (`combine_small_*`) instead: many programs of
    # one warp on the few live rows of a small batch. H100, Granite-8B shapes (32 query heads), each line an
    # A/B in one call on one machine (bench/results/profile_step_b{1,1_ctx65536,64}_h100_*_combine_*.json):
    # - batch 1 at 1k (16 tokens, 16 splits; 035dc01): 16 x 64 tiles of 4 warps 165 us a step, 8 x 16 of one
    #   warp 97 us; the step 6.81 -> 6.72 ms.
    # - batch 1 at 64k (16 tokens, the long grid's 64 splits): 16 x 64 of 4 warps 366 us and 8 x 16 of four
    #   619 (035dc01: the step 10.55 -> 10.86 ms); 8 x 16 of one warp 377 and 16 x 16 of two 380 against 366
    #   (39efc23, at XLA's default autotuning level).
    # - batch 64 at 1k (64 tokens, 2 splits; 035dc01): 16 x 64 of 4 warps 109 us, 8 x 16 of one 128.
    # Unmeasured: batches of 2-16 (the same bucket, more live rows), other head counts, the H200.
    combine_kernel: bool = True
    combine_block_rows: int = 16
    combine_block_cols: int = 64
    combine_num_warps: int = 4
    combine_small_max_tokens: int = 16
    combine_small_max_splits: int = 16
    combine_small_block_rows: int = 8
    combine_small_block_cols: int = 16
    combine_small_num_warps: int = 1
    # At `combine_axis_min_splits` splits or more (0: never) the merge takes the splits as the first axis of one
    # tensor instead of unrolled: one load of every split's tile, reduced over that axis (`combine_tiling` then
    # takes the default rows and warps and as many columns as keep every split's tiles within
    # `combine_axis_elems`). Unrolled, the merge's time grew with the splits as if each split's loads waited for
    # the last (H100, 16 x 64 tiles: 4.1 us a call at 16 splits, 9.1 at 64). H100, batch 1 at 64k (the long
    # grid's 64 splits), three A/B pairs on one machine at 7912fae
    # (bench/results/profile_step_b1_ctx65536_h100_7912fae_combine_{unrolled,axis}*.json): 369 -> 254 us a
    # step, the step 10.63-10.66 -> 10.53-10.54 ms. 32: the long grid's merges only (its 64 splits; the other
    # grids have at most 16), where it was measured; fewer splits (batch-1 decode's 16, batch 64's 2), the
    # long-chunk variant's larger buckets, the H200 and the compile time are unmeasured.
    combine_axis_min_splits: int = 32
    combine_axis_elems: int = 8192
    # The decoder rotates the keys and writes K and V into the caches in one Pallas launch reading the
    # fused q/k/v projection (`write_kv_rope_gpu`) instead of XLA's two scatters (the key RoPE fused into
    # one): same H100 call, 121 us a step against 174 us, the keys bit-equal. (Writing already split K and V
    # in one launch saved nothing: XLA then materialised the rotated keys and the value slice, two
    # launches; H200, profile_step_b1_onelaunch_h200.json.) With both: the batch-1 step's device time
    # 6.86 -> 6.81 ms at 1k, 10.67 -> 10.52 ms at 64k, 682 -> 607 launches.
    kv_write_kernel: bool = True
    # The same launch rotates the queries too (a third output), where XLA runs q's RoPE as a fusion of its own
    # per layer (input_concatenate_fusion_7: 63 us a step on the H200 at 7c67e61, 66 on an H100). Off. H100,
    # batch 1 at 1k, 7912fae (bench/results/profile_step_b1_h100_7912fae{,_ropeq}.json): the fusion went, and
    # 50 launches a step with it, but one program rotating a whole row of queries (4096 columns) took the write
    # from 125 to 1179 us a step, the step 6.73 -> 7.74 ms. Since then the queries are rotated in blocks of
    # Hkv * D columns, a program each, as the keys are (a second grid axis). H100, e954969, two pairs at batch 1
    # (bench/results/profile_step_b1_h100_e954969_ropeq_*.json): the write 120 -> 168-172 us, 50 launches fewer,
    # but the gaps between launches grew as much: the step 6.67 / 6.64 -> 6.67 / 6.66 ms, no gain (batch 64:
    # 11.05 -> 11.08 ms). So it stays off.
    rope_q_in_kv_write: bool = False
    # SMs of the device (H100/H200: 132); only the static split heuristic uses it.
    num_sms: int = 132
    # The static heuristic (`default_num_kv_splits`, prefill-shaped steps and dynamic_splits=False):
    # enough splits for `static_waves` programs per SM, a power of two, at most `static_max_splits`
    # and at least `static_min_keys_per_split` keys of context per split.
    static_waves: int = 2
    static_max_splits: int = 16
    static_min_keys_per_split: int = 512
    # Query rows per program (block_q tokens x the GQA group) and keys per kv tile. Prefill, H200 8k
    # sweep of block_m 64/128, block_k 32/64/128, warps 4/8, stages 2-4: best block_m 128 (32 tokens x
    # 4 heads) and block_k 64, 272 TFLOP/s with 4 warps (block_m 64: 236, block_k 32: 192)
    # (bench/results/attention_run1.json).
    # Decode with 128-key tiles, H100 at e954969 (bench/results/profile_step_b*_h100_e954969_k*.json): batch 1 at 1k
    # gains (the step 6.69 / 6.67 / 6.68 -> 6.53 / 6.54 / 6.63 ms: attention 339 -> 315 us, the merge 96 -> 81), but
    # batch 1 at 64k (10.26 / 10.33 -> 10.34 / 10.35 ms), batch 64 at 1k (11.03 -> 11.19) and batch 16 at 8k
    # (13.68 -> 13.82) lose, and batch 1 and 16 share a compiled variant: 64 stays.
    decode_block_m: int = 16
    prefill_block_m: int = 128
    decode_block_k: int = 64
    prefill_block_k: int = 64
    # H200, 8k prefill: 4 warps 272 TFLOP/s, 8 warps 245 (bench/results/attention_run1.json).
    num_warps: int = 4
    # H200 decode B=8: 2 stages 79% / 120% of the copy ceiling at 4k / 16k context, 3 stages
    # 64% / 94%; prefill keeps 3 (bench/results/attention.json). Head dims above 128 take
    # `wide_head_num_stages` in every step.
    decode_num_stages: int = 2
    prefill_num_stages: int = 3
    wide_head_num_stages: int = 2

    def __post_init__(self):
        for field in ("split_rule", "long_split_rule"):
            rule = getattr(self, field)
            if rule is None and field == "long_split_rule":
                continue
            most, bounds = rule
            bounds = tuple((int(b), int(f)) for b, f in bounds)  # lists in, hashable tuples kept
            object.__setattr__(self, field, (int(most), bounds))
            if most < 1 or sum(f for _, f in bounds) >= most or any(f < 0 for _, f in bounds):
                raise ValueError(f"{field} must keep at least one split at every bound, got {rule}")
            if [b for b, _ in bounds] != sorted(b for b, _ in bounds):
                raise ValueError(f"{field} bounds must be increasing, got {rule}")
        for name in ("long_chunk_max_rows", "combine_small_max_tokens", "combine_small_max_splits",
                     "combine_axis_min_splits"):  # (0: never)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("long_context_keys", "min_tiles_per_split", "num_sms", "static_waves", "static_max_splits",
                     "static_min_keys_per_split", "decode_block_m", "prefill_block_m", "decode_block_k",
                     "prefill_block_k", "num_warps", "combine_block_rows", "combine_block_cols", "combine_num_warps",
                     "combine_small_block_rows", "combine_small_block_cols", "combine_small_num_warps",
                     "combine_axis_elems",
                     "decode_num_stages", "prefill_num_stages", "wide_head_num_stages"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("combine_block_rows", "combine_block_cols", "combine_small_block_rows",
                     "combine_small_block_cols"):  # fmt: skip
            if getattr(self, name) & (getattr(self, name) - 1):
                raise ValueError(f"{name} must be a power of two, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TpuAttentionTuning:
    """Defaults of the TPU kernel (tpu.py); never measured on a TPU here (interpret-mode tests only)."""

    # Query tokens per grid step: decode-shaped steps (T <= S) `decode_block_q`; prefill-shaped
    # `prefill_block_rows // g` (g = Hq / Hkv: that many rows of the kv head's matmul), at least
    # `min_block_q`.
    decode_block_q: int = 8
    prefill_block_rows: int = 128
    min_block_q: int = 8
    # Keys per DMA tile: pages_per_tile = tile_keys / block_size, at most the pages of a sequence.
    tile_keys: int = 512
    # Mosaic's scoped VMEM limit (None = the compiler's default).
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        for name in ("decode_block_q", "prefill_block_rows", "min_block_q", "tile_keys"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


H200_GPU_ATTENTION_TUNING = GpuAttentionTuning()
DEFAULT_GPU_ATTENTION_TUNING = GpuAttentionTuning()
DEFAULT_TPU_ATTENTION_TUNING = TpuAttentionTuning()

# device_kind -> record; devices not listed take the DEFAULT_* record.
GPU_ATTENTION_TUNING: Mapping[str, GpuAttentionTuning] = MappingProxyType({
    "NVIDIA H200": H200_GPU_ATTENTION_TUNING,
    "NVIDIA H100 80GB HBM3": H200_GPU_ATTENTION_TUNING,
})  # fmt: skip
TPU_ATTENTION_TUNING: Mapping[str, TpuAttentionTuning] = MappingProxyType({})


def gpu_attention_tuning(device_kind: str | None = None) -> GpuAttentionTuning:
    """The GPU kernel's record for `device_kind` (None = the current device's kind)."""
    kind = current_device_kind() if device_kind is None else device_kind
    return GPU_ATTENTION_TUNING.get(kind, DEFAULT_GPU_ATTENTION_TUNING)


def tpu_attention_tuning(device_kind: str | None = None) -> TpuAttentionTuning:
    """The TPU kernel's record for `device_kind` (None = the current device's kind)."""
    kind = current_device_kind() if device_kind is None else device_kind
    return TPU_ATTENTION_TUNING.get(kind, DEFAULT_TPU_ATTENTION_TUNING)


__all__ = [
    "DEFAULT_GPU_ATTENTION_TUNING",
    "DEFAULT_TPU_ATTENTION_TUNING",
    "GPU_ATTENTION_TUNING",
    "H200_GPU_ATTENTION_TUNING",
    "TPU_ATTENTION_TUNING",
    "GpuAttentionTuning",
    "TpuAttentionTuning",
    "gpu_attention_tuning",
    "tpu_attention_tuning",
]
