"""What the engine hands out.

`LLMEngine.step()` returns one `RequestDelta` per request that a step advanced: only what is new (token
ids, their logprobs, the text they completed), so a stream's cost per token does not grow with its
length. The last delta of a request carries a `FinishedRequest` (finish reason, usage, timings, prompt
logprobs). `LLM.generate` folds deltas into vLLM-style cumulative `RequestOutput`s; the gRPC server
forwards them as they come.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """time.monotonic() seconds; None until the event happens."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """The final record of a request, attached to its last delta."""

    finish_reason: str  # "stop" | "length" | "abort"
    prompt_token_ids: list[int]
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    activation_start: int | None  # aLoRA activation index; None for base requests, 0 for plain LoRA
    adapter: str | None
    prompt_logprobs: list[float | None] | None  # log p(prompt[i] | prompt[:i]); None at i = 0
    metrics: RequestMetrics


@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request."""

    request_id: str
    token_ids: list[int]  # the new tokens (empty in an abort's final delta)
    text: str  # the text they completed ("" while a multi-byte character is incomplete)
    logprobs: list[dict[int, float]] | None  # per new token: {token id: logprob}, if asked for
    finished: FinishedRequest | None = None
    # per new token, with `logprobs`: {token id: rank} (1: the most likely token; the sampled token's rank
    # counts every token at least as likely, itself included, and a top-n token's is its place, as in vLLM)
    logprob_ranks: list[dict[int, int]] | None = None

    @property
    def is_final(self) -> bool:
        return self.finished is not None


@dataclasses.dataclass
class RequestOutput:
    """A whole request, as `LLM.generate` returns it (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # None while running, then "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[float | None] | None
    num_cached_tokens: int
    activation_start: int | None  # None for base requests, 0 for plain LoRA
    adapter: str | None
    metrics: RequestMetrics | None
    # vLLM's form of `logprobs` (what `outputs` returns): {token id: Logprob} per output token
    logprob_objects: list[dict[int, Logprob]] | None = dataclasses.field(default=None, repr=False)
    # with n > 1 completions of the prompt: all n (the flat fields above are the first's)
    completions: list[CompletionOutput] | None = dataclasses.field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's `outputs`: the completions of this request, n of them if its parameters asked for n
        (`output.outputs[0].text` is `output.text`; their logprobs are vLLM's `Logprob` objects)."""
        if self.completions is not None:
            return list(self.completions)
        cumulative = None
        if self.logprobs is not None:
            cumulative = sum(lp[t] for t, lp in zip(self.token_ids, self.logprobs) if t in lp)
        return [CompletionOutput(0, self.text, self.token_ids, cumulative, self.logprob_objects, self.finish_reason)]


@dataclasses.dataclass(frozen=True)
class Logprob:
    """One token's entry in a completion's logprobs, as vLLM's `Logprob`."""

    logprob: float
    rank: int | None = None  # 1: the most likely token of its position
    decoded_token: str | None = None  # the token's own text (None where no tokenizer decodes it)


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    """One completion of a request, in vLLM's shape (jalora returns one per request)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # the sum of the sampled tokens' logprobs, where logprobs were asked for
    logprobs: list[dict[int, Logprob]] | None  # per token: {token id: Logprob}, where logprobs were asked for
    finish_reason: str | None


class OutputAccumulator:
    """Folds one request's deltas into a RequestOutput (the text in pieces, joined once at the end).
    `decode` (token ids -> each one's own text) fills the `Logprob` objects' decoded_token."""

    def __init__(self, request_id: str, prompt: str | None, want_logprobs: bool, decode=None):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[dict[int, float]] | None = [] if want_logprobs else None
        self.objects: list[dict[int, Logprob]] | None = [] if want_logprobs else None
        self.decode = decode
        self.finished: FinishedRequest | None = None

    def add(self, delta: RequestDelta) -> None:
        self.token_ids.extend(delta.token_ids)
        self.text.append(delta.text)
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
            ranks = delta.logprob_ranks or [{}] * len(delta.logprobs)
            ids = sorted({t for lps in delta.logprobs for t in lps})  # (decoded once each, in one call)
            texts = dict(zip(ids, self.decode(ids))) if self.decode is not None else {}
            for lps, rank in zip(delta.logprobs, ranks):
                self.objects.append({t: Logprob(lp, rank.get(t), texts.get(t)) for t, lp in lps.items()})
        if delta.finished is not None:
            self.finished = delta.finished

    def output(self) -> RequestOutput:
        f = self.finished
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=[] if f is None else f.prompt_token_ids,
            token_ids=list(self.token_ids),
            text="".join(self.text),
            finish_reason=None if f is None else f.finish_reason,
            logprobs=self.logprobs,
            logprob_objects=self.objects,
            prompt_logprobs=None if f is None else f.prompt_logprobs,
            num_cached_tokens=0 if f is None else f.num_cached_tokens,
            activation_start=None if f is None else f.activation_start,
            adapter=None if f is None else f.adapter,
            metrics=None if f is None else f.metrics,
        )
