"""jalora: a JAX serving engine for a base model and many Activated-LoRA adapters."""

from jalora.errors import AdapterNotFoundError, InvalidRequestError, InvocationNotFoundError
from jalora.outputs import RequestOutput
from jalora.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "InvalidRequestError",
    "AdapterNotFoundError",
    "InvocationNotFoundError",
]


def __getattr__(name: str):
    # The engine (and JAX with it) loads on first use, so `jalora.client` stays a light gRPC client.
    if name == "LLM":
        from jalora.llm import LLM

        return LLM
    raise AttributeError(f"module 'jalora' has no attribute {name!r}")
