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
from collections.abc import Mapping, Sequence
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


class Engine(Protocol):
    def encode_prompt(self, prompt: str | Sequence[int]) -> EncodedPrompt:
        """Thread-safe. A text prompt tokenized, or token ids checked, and either checked against the
        model's length (cheap size checks first: an oversized text is refused before it is tokenized).
        Raises InvalidRequestError."""

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int] | EncodedPrompt,
        params: SamplingParams,
        adapter: str | None = None,
    ) -> None:
        """Validates and queues a request; raises InvalidRequestError (or a subclass) and changes nothing.
        A text prompt is encoded here (`encode_prompt`); an `EncodedPrompt` is not checked again."""

    def abort_request(self, request_id: str) -> None:
        """Ends a request now (its final delta comes from the next `step`); unknown ids are ignored."""

    def step(self) -> list[RequestDelta]:
        """Runs one engine step; returns a delta for every request that got tokens or ended."""

    def has_unfinished_requests(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]:
        """Thread-safe."""

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Thread-safe. Token ids of a conversation ({'role', 'content'} messages) in the model's chat
        template."""

    def default_sampling_params(self) -> SamplingParams:
        """Thread-safe. The model's sampling defaults, for requests that bring none."""

    def prepare_adapter(self, path: str) -> PreparedAdapter:
        """Thread-safe. Reads and validates a PEFT adapter directory into the arrays `load_adapter`
        installs; raises InvalidRequestError naming the file at fault. Changes nothing."""

    def load_adapter(self, name: str, adapter: str | PreparedAdapter) -> AdapterInfo:
        """Installs an adapter (a directory, or what `prepare_adapter` made of one) under `name`."""

    def unload_adapter(self, name: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]:
        """Thread-safe (a snapshot, replaced whole by each load and unload)."""

    def info(self) -> EngineInfo: ...
