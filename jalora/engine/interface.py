"""The engine interface: what `LLM` and the gRPC server's engine thread depend on, and nothing more.

`LLMEngine` implements it. Callers never reach past it into the scheduler, the runner or the adapter
manager, so the server can be tested against any engine that implements these methods. One thread
owns an engine and is the only caller of its other methods; the methods marked *thread-safe* read only
what never changes after construction (the tokenizer, the chat template, the model's shapes) or a
snapshot replaced whole (the adapter list), so a server runs their slow, unbounded work (tokenizing a
long text, reading an adapter's files) on other threads while the owner keeps stepping. Importing this
module imports neither JAX nor numpy, so the server's RPC layer can be typed against it and stay light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from jalora.outputs import RequestDelta
from jalora.sampling_params import SamplingParams

if TYPE_CHECKING:  # only an annotation here: importing the interface must not import numpy
    from jalora.adapters.manager import PreparedAdapter
    from jalora.adapters.peft import AdapterInfo


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's token ids as `Engine.encode_prompt` checked them: `add_request` takes them as they are
    (no second pass over a long prompt on the engine's thread)."""

    token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What a server reports about its engine (gRPC GetServerInfo)."""

    model: str
    dtype: str
    platform: str  # "cpu" | "gpu" | "tpu"
    block_size: int
    num_total_blocks: int
    num_free_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_loras: int
    vocab_size: int
    eos_token_ids: list[int]
    max_session_ttl: float = 3600.0  # the longest TTL a request may give its pipeline session
    max_cpu_loras: int = 0  # adapters that may be loaded at once (0: as many as max_loras)
    host_kv_cache_blocks: int = 0  # KV blocks the host-memory tier holds (0: no tier)
    max_new_tokens: int | None = None  # generation_config's max_new_tokens (None: the model sets none)
    session_max_blocks: int = 0  # KV blocks one pipeline session may come to retain (0: sessions are off)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load and of its counters since it started (`Engine.stats()`).

    The first block is the present; the rest are counters that only grow. Tokens are tokens, blocks are
    KV-cache blocks, seconds are wall-clock seconds. The server turns a snapshot into Prometheus metrics
    (server/metrics.py); the engine itself knows nothing of Prometheus.
    """

    num_requests_running: int
    num_requests_waiting: int
    running_adapters: tuple[str, ...]  # the adapters of running requests, sorted, each named once
    waiting_adapters: tuple[str, ...]
    max_loras: int
    max_cpu_loras: int  # adapters that may be loaded at once (in host memory; max_loras of them on the device)
    num_adapters_loaded: int
    num_adapters_resident: int  # loaded adapters that hold a device slot now
    num_total_blocks: int
    num_used_blocks: int  # held by requests; the others are free (cached KV or not) or retained by a session
    num_cached_blocks: int  # findable in the prefix cache, held or free
    num_retained_blocks: int  # kept from eviction by pipeline sessions (held by requests or not)
    num_sessions: int  # live pipeline sessions

    prompt_tokens: int  # prompt tokens of the requests that got their first token
    generation_tokens: int
    num_preemptions: int  # running requests sent back to wait (their KV is recomputed)
    # Prefix cache, counted once per request, at its first admission: the tokens looked up and those found
    # (the sum of the requests' cached_tokens). Requests that skip the cache (prompt logprobs) count in neither.
    prefix_cache_queries: int
    prefix_cache_hits: int
    # Of the hits, those in base-keyed blocks (wholly before any activation: the base model's KV), and of
    # those, the ones that adapter requests found: base-model KV reused by an adapter.
    prefix_cache_hits_base_keyed: int
    prefix_cache_hits_base_keyed_by_adapters: int
    prefix_cache_evictions: int  # cached blocks overwritten to make room for new KV
    sessions_expired: int  # pipeline sessions ended by their TTL
    sessions_evicted: int  # ended to make room for another session's blocks (session_cache_share)
    # First uses of a compiled step variant (a compilation, or a load from JAX's persistent cache),
    # during the warm-up and while serving (each of the latter held up the requests of its step).
    warmup_compilations: int
    warmup_compile_seconds: float
    compilations: int
    compile_seconds: float
    # Adapters written into a device slot on demand (more adapters loaded than max_loras), and the host
    # seconds spent issuing those writes (the copies to the device are enqueued, not waited for).
    adapter_swaps: int
    adapter_swap_seconds: float
    # The host-memory KV tier (0 when it is off): tokens of prefix-cache hits served by copying blocks
    # back from host RAM, bytes copied each way, and the blocks it holds now and can hold.
    host_kv_cache_hits: int = 0
    host_kv_cache_bytes_to_host: int = 0
    host_kv_cache_bytes_to_device: int = 0
    host_kv_cache_blocks: int = 0
    host_kv_cache_capacity_blocks: int = 0

    @property
    def prefix_cache_hits_adapter_keyed(self) -> int:
        """Hits in blocks keyed by an adapter (its adapted KV, found by a later request of that adapter)."""
        return self.prefix_cache_hits - self.prefix_cache_hits_base_keyed

    @property
    def kv_cache_usage(self) -> float:
        """The share of KV-cache blocks held by requests, in [0, 1]."""
        return self.num_used_blocks / self.num_total_blocks if self.num_total_blocks else 0.0


class Engine(Protocol):
    def encode_prompt(self, prompt: str | Sequence[int], truncate: int | None = None) -> EncodedPrompt:
        """Thread-safe. A text prompt tokenized, or token ids checked, and either checked against the
        model's length (cheap size checks first: an oversized text is refused before it is tokenized); with
        `truncate` (SamplingParams.truncate_prompt_tokens) only its last tokens kept. Raises InvalidRequestError."""

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
        """Validates and queues a request; raises InvalidRequestError (or a subclass) and changes nothing.
        A text prompt is encoded here (`encode_prompt`); an `EncodedPrompt` is not checked again. With
        `session`, its blocks are retained for the session's next requests (`end_session`: the session
        ends with this request)."""

    def end_session(self, session: str) -> None:
        """Ends a live pipeline session (its blocks become evictable); SessionNotFoundError if not live."""

    def is_session_live(self, session: str) -> bool:
        """Whether `session` names a live pipeline session (one that a request opened and that has not ended)."""

    def expire_sessions(self) -> tuple[int, float | None]:
        """Ends the sessions idle past their TTL; how many it ended, and the seconds until the next may
        expire (None: no idle one)."""

    def abort_request(self, request_id: str) -> None:
        """Ends a request now (its final delta comes from the next `step`); unknown ids are ignored."""

    def step(self) -> list[RequestDelta]:
        """Runs one engine step; returns a delta for every request that got tokens or ended."""

    def has_unfinished_requests(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]:
        """Thread-safe."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Thread-safe. The text of `token_ids`, special tokens left out."""

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Thread-safe. Each token's own text, decoded alone (special tokens kept)."""

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Thread-safe. Each token's own bytes: those of one character's tokens add up to its UTF-8 even where each
        alone decodes to U+FFFD (OpenAI's chat logprobs `bytes`)."""

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Thread-safe. Token ids of a conversation ({'role', 'content'} messages) in the model's chat
        template."""

    def default_sampling_params(self) -> SamplingParams:
        """Thread-safe. The model's sampling defaults, for requests that bring none."""

    def prepare_adapter(self, path: str, roots: Sequence[str] | None = None) -> PreparedAdapter:
        """Thread-safe. Reads and validates a PEFT adapter directory into the arrays `load_adapter`
        installs; with `roots` (a server's adapter roots), every file read must resolve inside one of
        them, links followed. Raises InvalidRequestError naming the file at fault. Changes nothing."""

    def load_adapter(
        self, name: str, adapter: str | PreparedAdapter, roots: Sequence[str] | None = None
    ) -> AdapterInfo:
        """Installs an adapter (a directory, read confined to `roots` if given, or what
        `prepare_adapter` made of one) under `name`: into a free device slot, or, with every slot taken
        and fewer than max_cpu_loras adapters loaded, into host memory until a request needs it."""

    def unload_adapter(self, name: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]:
        """Thread-safe (a snapshot, replaced whole by each load and unload)."""

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats:
        """A snapshot of the load and the counters; cheap enough to take after every step."""

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` (from any thread) once the engine can run no step any more: a process of a
        multi-host engine is gone. Never called on one host."""

    def close(self) -> None:
        """Ends what the engine started beyond this process (a multi-host engine's followers)."""
