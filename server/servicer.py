"""jalora.v1.Jalora: turns RPCs into engine work on the EngineWorker and engine results into messages."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.engine.interface import Engine
from jalora.errors import InvalidRequestError
from jalora.sampling_params import SamplingParams
from server.engine_worker import Completion, Delta, EngineWorker
from server.errors import AdapterPathError, abort_with

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_MAX_REQUEST_ID_LEN = 256
_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs",
)  # fmt: skip


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset proto fields keep SamplingParams' defaults; bad values raise naming `sampling.<field>`."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _SAMPLING_FIELDS if msg.HasField(name)}
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    kwargs["prompt_logprobs"] = msg.prompt_logprobs
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", str(exc).split(": ", 1)[-1]) from None


def resolve_adapter_path(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` if it lies under one of `roots`; relative paths are tried under each root."""
    if not path:
        raise InvalidRequestError("path", "must name a PEFT adapter directory")
    if not roots:
        raise AdapterPathError("this server has no adapter roots (start it with --adapter-root DIR)")
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    for candidate in candidates:
        real = os.path.realpath(candidate)  # resolves symlinks and "..": no escaping a root through them
        if not any(os.path.commonpath([real, root]) == root for root in real_roots):
            continue
        if not os.path.isdir(real):
            raise FileNotFoundError(f"adapter directory {path!r} does not exist under the adapter roots")
        return real
    raise AdapterPathError(f"adapter path {path!r} is outside the server's adapter roots {list(roots)}")


def adapter_info_to_proto(info: Any) -> pb.AdapterInfo:
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


def _logprobs_to_proto(positions: list[dict[int, float]]) -> list[pb.PositionLogprobs]:
    return [
        pb.PositionLogprobs(entries=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in d.items()])
        for d in positions
    ]


def _completion_to_proto(c: Completion) -> pb.Completion:
    msg = pb.Completion(
        finish_reason=_FINISH_REASONS.get(c.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens, cached_tokens=c.cached_tokens
        ),
        timings=pb.Timings(
            queue_seconds=c.queue_seconds,
            time_to_first_token_seconds=c.time_to_first_token_seconds,
            total_seconds=c.total_seconds,
        ),
    )
    if c.activation_index is not None:
        msg.activation_index = c.activation_index
    if c.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(_logprobs_to_proto(c.prompt_logprobs))
    return msg


def delta_to_proto(request_id: str, d: Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=d.token_ids, text=d.text)
    if d.logprobs is not None:
        msg.logprobs.extend(_logprobs_to_proto(d.logprobs))
    if d.completion is not None:
        msg.completion.CopyFrom(_completion_to_proto(d.completion))
    return msg


class JaloraServicer(pb_grpc.JaloraServicer):
    def __init__(
        self,
        worker: EngineWorker,
        *,
        model_name: str = "",
        adapter_roots: Sequence[str] = (),
        version: str = "",
    ):
        self.worker = worker
        self.model_name = model_name
        self.adapter_roots = list(adapter_roots)
        self.version = version

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        stream = None
        try:
            if len(request.request_id) > _MAX_REQUEST_ID_LEN:
                raise InvalidRequestError("request_id", f"must be at most {_MAX_REQUEST_ID_LEN} characters")
            which = request.WhichOneof("prompt")
            if which is None:
                raise InvalidRequestError("prompt", "set either text or token_ids")
            prompt: str | list[int] = request.text if which == "text" else list(request.token_ids.ids)
            if len(prompt) == 0:
                raise InvalidRequestError(f"prompt.{which}", "must not be empty")
            params = sampling_params_from_proto(request.sampling)
            # The engine needs ids unique among requests in flight; the client's id is only echoed.
            client_id = request.request_id or uuid.uuid4().hex
            stream = self.worker.submit(uuid.uuid4().hex, prompt, params, request.adapter or None)
            while True:
                delta = await stream.next()
                yield delta_to_proto(client_id, delta)
                if delta.completion is not None:
                    return
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            # Cancelled call, disconnected client, passed deadline (all raise CancelledError at the
            # await above) or a failed write: the engine drops the request and frees its blocks.
            if stream is not None:
                stream.abort()

    async def ListAdapters(self, request, context):
        try:
            infos = await self.worker.call(lambda engine: engine.list_adapters())
        except Exception as exc:
            await abort_with(context, exc)
        return pb.ListAdaptersResponse(adapters=[adapter_info_to_proto(i) for i in infos])

    async def LoadAdapter(self, request, context):
        try:
            if not request.name:
                raise InvalidRequestError("name", "must not be empty")
            path = resolve_adapter_path(request.path, self.adapter_roots)
            name = request.name
            info = await self.worker.call(lambda engine: engine.load_adapter(name, path))
        except Exception as exc:
            await abort_with(context, exc)
        return adapter_info_to_proto(info)

    async def UnloadAdapter(self, request, context):
        try:
            if not request.name:
                raise InvalidRequestError("name", "must not be empty")
            await self.worker.call(lambda engine: engine.unload_adapter(request.name))
        except Exception as exc:
            await abort_with(context, exc)
        return pb.UnloadAdapterResponse()

    async def Tokenize(self, request, context):
        try:
            ids = await self.worker.call(lambda engine: engine.tokenize(request.text))
        except Exception as exc:
            await abort_with(context, exc)
        return pb.TokenizeResponse(token_ids=list(ids))

    async def GetServerInfo(self, request, context):
        try:
            info = await self.worker.call(self._server_info)
        except Exception as exc:
            await abort_with(context, exc)
        info.num_running_requests = self.worker.num_pending
        return info

    def _server_info(self, engine: Engine) -> pb.ServerInfo:
        """Runs on the engine thread."""
        e = engine.info()
        return pb.ServerInfo(
            version=self.version,
            model=self.model_name or e.model,
            dtype=e.dtype,
            platform=e.platform,
            block_size=e.block_size,
            num_total_blocks=e.num_total_blocks,
            num_free_blocks=e.num_free_blocks,
            max_model_len=e.max_model_len,
            max_num_seqs=e.max_num_seqs,
            max_loras=e.max_loras,
            vocab_size=e.vocab_size,
            eos_token_ids=e.eos_token_ids,
            adapter_roots=self.adapter_roots,
            max_pending_requests=self.worker.max_pending_requests,
        )
