"""What the engine returns for a request (cumulative: each step's output holds everything so far)."""

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """time.monotonic() seconds; None until the event happens."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class RequestOutput:
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
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
