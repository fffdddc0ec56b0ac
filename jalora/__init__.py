"""jalora: a JAX serving engine for a base model and many Activated-LoRA adapters."""

from jalora.config import EngineConfig
from jalora.errors import AdapterNotFoundError, InvalidRequestError, InvocationNotFoundError, SessionNotFoundError
from jalora.lora_request import LoRARequest
from jalora.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput
from jalora.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineConfig",
    "SamplingParams",
    "LoRARequest",
    "RequestDelta",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "InvalidRequestError",
    "AdapterNotFoundError",
    "InvocationNotFoundError",
    "SessionNotFoundError",
]


def __getattr__(name: str):
    # The engine (and JAX with it) loads on first use: `import jalora.client` (a gRPC client, which
    # runs the package's __init__ first) must not pay for importing JAX.
    if name == "LLM":
        from jalora.llm import LLM

        return LLM
    raise AttributeError(f"module 'jalora' has no attribute {name!r}")
