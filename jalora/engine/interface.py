"""The engine interface: what `LLM` and the gRPC server's engine thread depend on, and nothing more.

`LLMEngine` implements it. Callers never reach past it into the scheduler, the runner or the adapter
manager, so the server can be tested against any engine that implements these methods. One thread
owns an engine: none of the methods are thread-safe. Importing this module imports neither JAX nor
numpy, so the server's RPC layer can be typed against it and stay light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from jalora.outputs import RequestDelta
from jalora.sampling_params import SamplingParams

if TYPE_CHECKING:  # only an annotation here: importing the interface must not import numpy
    from jalora.adapters.peft import AdapterInfo


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
    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, adapter: str | None = None
    ) -> None:
        """Validates and queues a request; raises InvalidRequestError (or a subclass) and changes nothing."""

    def abort_request(self, request_id: str) -> None:
        """Ends a request now (its final delta comes from the next `step`); unknown ids are ignored."""

    def step(self) -> list[RequestDelta]:
        """Runs one engine step; returns a delta for every request that got tokens or ended."""

    def has_unfinished_requests(self) -> bool: ...

    def tokenize(self, text: str) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation ({'role', 'content'} messages) in the model's chat template."""

    def default_sampling_params(self) -> SamplingParams:
        """The model's sampling defaults, for requests that bring none."""

    def load_adapter(self, name: str, path: str, roots: Sequence[str] | None = None) -> AdapterInfo:
        """Loads the PEFT directory `path` as `name`; with `roots` (a server's adapter roots), every file
        read must resolve inside one of them, links followed."""

    def unload_adapter(self, name: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def info(self) -> EngineInfo: ...
