"""Host-side segment metadata of the masked multi-LoRA kernels.

The scheduler orders a step's tokens so that equal LoRA slots form contiguous runs. A run of slot
`s >= 0` is a *segment*; runs of -1 (base tokens, padding) are no segment and cost no work. The
kernels walk a *work list*: one item per (token tile, segment) pair that overlap, in token order,
so a tile shared by two segments appears twice, in consecutive items, each masking its own rows.
Tiles that hold no adapted token appear in no item. Every array has a fixed length so that the
jitted step keeps static shapes; the tail past `num_work` (`num_segments`) is padding that repeats
the last real tile and slot (so a TPU pipeline fetches nothing new for it) with an empty row range.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_TOKENS = 16  # rows of a token tile: Triton's smallest dot, and a bf16 TPU sublane tile


@dataclasses.dataclass(frozen=True)
class LoraSegments:
    """Segment metadata; numpy on the host, jnp arrays (same pytree) inside the jitted step."""

    seg_start: np.ndarray  # i32[max_segments] first token row of each segment
    seg_len: np.ndarray  # i32[max_segments] rows of each segment (0 past num_segments)
    seg_slot: np.ndarray  # i32[max_segments] adapter slot of each segment (>= 0)
    num_segments: np.ndarray  # i32[1] valid segments
    work_tile: np.ndarray  # i32[max_work] token tile (rows tile*block_tokens ...) of each work item
    work_slot: np.ndarray  # i32[max_work] adapter slot of each work item
    work_start: np.ndarray  # i32[max_work] first row of the item's segment inside the tile (absolute)
    work_end: np.ndarray  # i32[max_work] one past its last row (absolute); start == end past num_work
    num_work: np.ndarray  # i32[1] valid work items
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # static: rows per token tile the work list was cut for

    @property
    def max_segments(self) -> int:
        return self.seg_start.shape[0]

    @property
    def max_work(self) -> int:
        return self.work_tile.shape[0]


jax.tree_util.register_dataclass(
    LoraSegments,
    data_fields=[
        "seg_start",
        "seg_len",
        "seg_slot",
        "num_segments",
        "work_tile",
        "work_slot",
        "work_start",
        "work_end",
        "num_work",
    ],
    meta_fields=["block_tokens"],
)


def default_max_work(num_tokens: int, max_segments: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> int:
    """Work items that can never be exceeded: every tile once, plus one per extra segment boundary."""
    return max(1, -(-num_tokens // block_tokens) + max_segments - 1)


def build_lora_segments(
    token_slots,  # i32[T_padded] adapter slot of each token row, -1 = none (base token or padding)
    max_segments: int,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    max_work: int | None = None,
    num_slots: int | None = None,
) -> LoraSegments:
    """Cut `token_slots` into segments and a per-tile work list (numpy, O(T) host work).

    `max_segments` bounds the runs of equal non-negative slots: the engine passes its maximum number
    of sequences per step (each sequence adds at most one adapted run). `max_work` defaults to the
    bound `default_max_work`; an engine that buckets the count of adapted tokens may pass less to
    shrink the kernels' grids. `num_slots`, if given, checks every slot is < num_slots.
    """
    slots = np.asarray(token_slots)
    if slots.ndim != 1 or slots.shape[0] == 0:
        raise ValueError(f"token_slots must be a non-empty 1-D array, got shape {slots.shape}")
    if not np.issubdtype(slots.dtype, np.integer):
        raise ValueError(f"token_slots must be integers, got {slots.dtype}")
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    if block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two, got {block_tokens}")
    if slots.min() < -1:
        raise ValueError(f"token_slots must be >= -1, got min {slots.min()}")
    if num_slots is not None and slots.max() >= num_slots:
        raise ValueError(f"token_slots must be < num_slots={num_slots}, got max {slots.max()}")
    t = slots.shape[0]
    slots = slots.astype(np.int32)
    if max_work is None:
        max_work = default_max_work(t, max_segments, block_tokens)

    run_starts = np.flatnonzero(np.concatenate([[True], slots[1:] != slots[:-1]]))
    run_ends = np.append(run_starts[1:], t)
    keep = slots[run_starts] >= 0
    starts, ends = run_starts[keep], run_ends[keep]
    seg_slots = slots[starts]
    n_seg = starts.shape[0]
    if n_seg > max_segments:
        raise ValueError(f"max_segments={max_segments} is too small: token_slots has {n_seg} adapted runs")

    first_tile = starts // block_tokens
    tiles_per_seg = (ends - 1) // block_tokens - first_tile + 1
    n_work = int(tiles_per_seg.sum())
    if n_work > max_work:
        raise ValueError(f"max_work={max_work} is too small: token_slots needs {n_work} work items")
    seg_of_item = np.repeat(np.arange(n_seg), tiles_per_seg)
    item_rank = np.arange(n_work) - np.repeat(np.cumsum(tiles_per_seg) - tiles_per_seg, tiles_per_seg)
    work_tile = first_tile[seg_of_item] + item_rank
    work_start = np.maximum(starts[seg_of_item], work_tile * block_tokens)
    work_end = np.minimum(ends[seg_of_item], (work_tile + 1) * block_tokens)

    def padded(values, length, fill):
        out = np.full(length, fill, dtype=np.int32)
        out[: len(values)] = values
        return out

    last_tile = int(work_tile[-1]) if n_work else 0
    last_slot = int(seg_slots[-1]) if n_seg else 0
    return LoraSegments(
        seg_start=padded(starts, max_segments, 0),
        seg_len=padded(ends - starts, max_segments, 0),
        seg_slot=padded(seg_slots, max_segments, last_slot),
        num_segments=np.array([n_seg], dtype=np.int32),
        work_tile=padded(work_tile, max_work, last_tile),
        work_slot=padded(seg_slots[seg_of_item], max_work, last_slot),
        work_start=padded(work_start, max_work, 0),
        work_end=padded(work_end, max_work, 0),
        num_work=np.array([n_work], dtype=np.int32),
        block_tokens=block_tokens,
    )


def segments_to_token_slots(segments: LoraSegments, num_tokens: int):
    """i32[num_tokens] slot per row (-1 outside every segment), rebuilt on device from the segments."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    starts = jnp.asarray(segments.seg_start)
    ends = starts + jnp.asarray(segments.seg_len)
    valid = jnp.arange(starts.shape[0]) < jnp.asarray(segments.num_segments)[0]
    inside = valid[None, :] & (rows[:, None] >= starts[None, :]) & (rows[:, None] < ends[None, :])
    slot = jnp.max(jnp.where(inside, jnp.asarray(segments.seg_slot)[None, :], -1), axis=1)
    return slot.astype(jnp.int32)
