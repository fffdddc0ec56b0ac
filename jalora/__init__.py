"""jalora: a JAX serving engine for a base model and many Activated-LoRA adapters."""

from jalora.errors import AdapterNotFoundError, InvalidRequestError, InvocationNotFoundError
from jalora.llm import LLM
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
