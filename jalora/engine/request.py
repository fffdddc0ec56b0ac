"""One request's state as it moves through the scheduler."""

import enum
import time

import numpy as np

from jalora.adapters.peft import BASE, ResolvedAdapter
from jalora.engine.block_hasher import HashDonors, extend_block_hashes
from jalora.outputs import RequestMetrics
from jalora.sampling_params import SamplingParams


class BlockIds(list):
    """A request's cache blocks in order. While the request holds them the list only grows (the block
    manager replaces the whole object on admission and release), so `as_array` extends a cached numpy
    copy instead of converting the whole list every step."""

    __slots__ = ("_array",)

    def as_array(self) -> np.ndarray:
        arr = getattr(self, "_array", None)
        if arr is not None and arr.shape[0] > len(self):  # shrunk (not done by the block manager): rebuild
            arr = None
        if arr is None or arr.shape[0] != len(self):
            done = 0 if arr is None else arr.shape[0]
            tail = np.asarray(self[done:], np.int32)
            arr = tail if arr is None else np.concatenate([arr, tail])
            self._array = arr
        return arr


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A request's tokens, its place in the KV cache and its progress through the steps."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        eos_token_ids: tuple[int, ...] = (),
        adapter_name: str | None = None,
        adapter: ResolvedAdapter = BASE,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else set(eos_token_ids))
        # what the draw bans within the first min_tokens tokens: every stop id and end-of-sequence, ignore_eos or not
        # (vLLM's all_stop_token_ids)
        self.early_bans = banned_early(params, eos_token_ids)
        self.adapter_name = adapter_name
        self.adapter_slot = adapter.slot  # device slot, -1 for the base model
        self.adapter_identity = adapter.identity
        self.activation_start = adapter.activation_start  # None: base; 0: plain LoRA
        self.held_since: int | None = None  # scheduler.num_admitted when it began waiting for an adapter slot
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_ids = BlockIds()
        self.block_hashes: list[bytes] = []
        self.hashed_tokens = bytearray()  # the int64 bytes of the blocks hashed so far (block_hasher.HashDonors)
        self.num_registered_blocks = 0  # leading blocks already published to the prefix cache
        # Async scheduling: (step id, row) of each token sampled by a step whose results the host has
        # not read yet, oldest first. The next step already feeds such a token (from the previous
        # step's output on the device). Written by the StepPipeline only.
        self.pending: list[tuple[int, int]] = []
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[float | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs else None
        )
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        # Pipeline sessions (jalora/engine/sessions.py): the session it joined, the blocks it reserved there,
        # and whether its end ends the session.
        self.session = None
        self.session_reserve = 0
        self.end_session = False

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids the host knows (prompt + outputs appended so far)."""
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + len(self.pending)

    @property
    def num_output_tokens_with_pending(self) -> int:
        """Output tokens, those still on the device included: how many come before the next draw."""
        return len(self.output_token_ids) + len(self.pending)

    def length_reached(self, max_model_len: int, extra: int = 0) -> bool:
        """True if `extra` more tokens bring the request to its length limit (max_tokens or the model's)."""
        return len(self.output_token_ids) + extra >= self.params.max_tokens or self.num_tokens + extra >= max_model_len

    def ends_with_pending(self, max_model_len: int) -> bool:
        """True if a pending token is bound to end the request (its length limit), so nothing should
        be scheduled after it."""
        return bool(self.pending) and self.length_reached(max_model_len, len(self.pending))

    def update_block_hashes(self, block_size: int, donors: HashDonors | None = None) -> list[bytes]:
        """Hashes the full blocks not hashed yet; the first ones from `donors` where one has them."""
        extend_block_hashes(
            self.block_hashes,
            self.all_token_ids,
            block_size,
            self.activation_start,
            self.adapter_identity,
            self.hashed_tokens,
            donors,
        )
        return self.block_hashes

    def offer_hashes(self, donors: HashDonors) -> None:
        """Offers this request's hashes to the requests after it (`HashDonors.add`)."""
        donors.add(self.block_hashes, self.hashed_tokens, self.activation_start, self.adapter_identity)


def banned_early(params: SamplingParams, eos_token_ids) -> list[int]:
    """The ids a request's min_tokens bans: its stop ids and the model's end-of-sequence ids (none without it)."""
    return sorted(set(params.stop_token_ids or ()) | set(eos_token_ids)) if params.min_tokens else []
