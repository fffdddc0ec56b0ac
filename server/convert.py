"""Where engine values and jalora.v1 messages meet.

Requests in: `sampling_params_from_proto`, `messages_from_proto`. Results out: `generate_response` (a
`RequestDelta` and, on the last one, its `FinishedRequest` with timings measured from the server's
receipt of the call), `adapter_info_to_proto`, `server_info_to_proto`. Pure Python over protobuf: no JAX, no numpy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from jalora.api.v1 import jalora_pb2 as pb
from jalora.engine.interface import EngineInfo
from jalora.errors import InvalidRequestError
from jalora.outputs import FinishedRequest, RequestDelta
from jalora.sampling_params import SamplingParams
from server.config import ServerConfig

if TYPE_CHECKING:
    from jalora.adapters.peft import AdapterInfo

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
def sampling_params_from_proto(msg: pb.SamplingParams, defaults: SamplingParams | None = None) -> SamplingParams:
    """Unset proto fields keep `defaults` (the engine's, from the model's generation_config; else
    SamplingParams' own); bad values raise naming `sampling.<field>`.

    The proto mirrors SamplingParams field for field: an `optional` field is set when present; a plain
    bool, a repeated or a map field when true / non-empty (false and empty are SamplingParams' defaults)."""
    kwargs: dict[str, Any] = {} if defaults is None else dataclasses.asdict(defaults)
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if msg.HasField(field.name) if field.has_presence else value:
            if isinstance(value, int | float):
                kwargs[field.name] = value
            else:
                kwargs[field.name] = dict(value) if field.message_type is not None else list(value)
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None


def messages_from_proto(msg: pb.ChatMessages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def _logprobs_to_proto(positions: list[dict[int, float]]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(entries=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in d.items()])
        for d in positions
    ]


def completion_to_proto(finished: FinishedRequest, received: float, now: float | None = None) -> pb.Completion:
    """The final record of a request. Timings are seconds since `received` (time.monotonic() when the
    server got the call); an event that never happened (an abort before the first token) counts as `now`."""
    now = time.monotonic() if now is None else now
    m = finished.metrics

    def since(t: float | None) -> float:
        return max(0.0, (t if t is not None else now) - received)

    msg = pb.Completion(
        finish_reason=_FINISH_REASONS.get(finished.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(
            prompt_tokens=len(finished.prompt_token_ids),
            completion_tokens=finished.num_output_tokens,
            cached_tokens=finished.num_cached_tokens,
        ),
        timings=pb.Timings(
            queue_seconds=since(m.first_scheduled_time),
            time_to_first_token_seconds=since(m.first_token_time),
            total_seconds=since(m.finished_time),
        ),
    )
    if finished.activation_start is not None:
        msg.activation_index = finished.activation_start
    if finished.prompt_logprobs is not None:
        # One position per prompt token, {token: logprob} like the generated ones ({} for the first).
        msg.prompt_logprobs.extend(
            _logprobs_to_proto(
                [
                    {tok: lp} if lp is not None else {}
                    for tok, lp in zip(finished.prompt_token_ids, finished.prompt_logprobs)
                ]
            )
        )
    return msg


def generate_response(request_id: str, delta: RequestDelta, received: float) -> pb.GenerateResponse:
    """One streamed message: what one engine step added to the request, plus its Completion if it ended."""
    msg = pb.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.logprobs is not None:
        msg.logprobs.extend(_logprobs_to_proto(delta.logprobs))
    if delta.finished is not None:
        msg.completion.CopyFrom(completion_to_proto(delta.finished, received))
    return msg


def pipeline_response(request_id: str, stage, received: float) -> pb.PipelineResponse:
    """One finished stage of a Pipeline call (server/pipeline.py's Stage)."""
    msg = pb.PipelineResponse(request_id=request_id, adapter=stage.adapter or "", token_ids=stage.token_ids,
                              text=stage.text, completion=completion_to_proto(stage.finished, received))  # fmt: skip
    if stage.judge is not None:
        msg.judge = stage.judge
    if stage.logprobs is not None:
        msg.logprobs.extend(_logprobs_to_proto(stage.logprobs))
    return msg


def adapter_info_to_proto(info: AdapterInfo) -> pb.AdapterInfo:
    msg = pb.AdapterInfo(
        name=info.name,
        kind=info.kind,
        invocation_tokens=list(info.invocation_tokens or []),
        rank=int(info.rank),
        targets=list(info.targets),
        identity=info.identity,
    )
    if info.invocation_string is not None:
        msg.invocation_string = info.invocation_string
    return msg


def server_info_to_proto(
    info: EngineInfo, config: ServerConfig, *, version: str, num_running_requests: int
) -> pb.ServerInfo:
    """GetServerInfo's answer: the engine's `info()` plus what the server itself knows."""
    return pb.ServerInfo(
        version=version,
        model=config.model_name or info.model,
        dtype=info.dtype,
        platform=info.platform,
        block_size=info.block_size,
        num_total_blocks=info.num_total_blocks,
        num_free_blocks=info.num_free_blocks,
        max_model_len=info.max_model_len,
        max_num_seqs=info.max_num_seqs,
        max_loras=info.max_loras,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        adapter_roots=list(config.adapter_roots),
        num_running_requests=num_running_requests,
        max_pending_requests=config.max_pending_requests,
        max_cpu_loras=info.max_cpu_loras,
        host_kv_cache_blocks=info.host_kv_cache_blocks,
    )
