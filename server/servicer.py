"""jalora.v1.Jalora: turns RPCs into engine work on the EngineWorker and engine results into messages.

Every engine access goes through the worker: `submit` for Generate, `run_host` for work that grows
with the request (tokenizing, chat templates: on the host pool, beside the engine thread),
`prepare_adapter` for adapter files, and `call` with an `Engine` protocol method for the rest (between
two steps). Calls are admitted by a CallGate (server/call_gate.py); messages are built by
server/convert.py and failures mapped by server/errors.py. Imports neither JAX nor numpy.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.engine.chat import prompt_with_invocation
from jalora.errors import InvalidRequestError
from jalora.sampling_params import SamplingParams
from server.call_gate import CallGate, unary_call
from server.config import ServerConfig
from server.convert import (
    adapter_info_to_proto,
    generate_response,
    messages_from_proto,
    sampling_params_from_proto,
    server_info_to_proto,
)
from server.engine_worker import EngineWorker
from server.errors import AdapterPathError, abort_with

_MAX_REQUEST_ID_LEN = 256


def resolve_adapter_path(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` if it lies under one of `roots`; relative paths are tried under each root."""
    if not path:
        raise InvalidRequestError("path", "must name a PEFT adapter directory")
    if not roots:
        raise AdapterPathError("this server has no adapter roots (start it with --adapter-roots DIR)")
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


class JaloraServicer(pb_grpc.JaloraServicer):
    def __init__(self, worker: EngineWorker, config: ServerConfig, *, version: str = ""):
        self.worker = worker
        self.config = config
        self.version = version
        self.calls = CallGate(config.max_pending_calls)
        self._defaults: SamplingParams | None = None

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received = time.monotonic()  # the reference point of the call's timings
        stream = None
        try:
            self.calls.admit(context)
            if len(request.request_id) > _MAX_REQUEST_ID_LEN:
                raise InvalidRequestError("request_id", f"must be at most {_MAX_REQUEST_ID_LEN} characters")
            which = request.WhichOneof("prompt")
            if which is None:
                raise InvalidRequestError("prompt", "set one of text, token_ids or messages")
            messages = messages_from_proto(request.messages) if which == "messages" else None
            prompt: str | list[int] | None = None
            if messages is None:
                prompt = request.text if which == "text" else list(request.token_ids.ids)
            if len(prompt if messages is None else messages) == 0:
                raise InvalidRequestError(f"prompt.{which}", "must not be empty")
            params = sampling_params_from_proto(request.sampling, await self._sampling_defaults())
            adapter = request.adapter or None
            if messages is not None or request.append_invocation:
                invoke = adapter if request.append_invocation else None
                prompt = await self.worker.run_host(lambda e: prompt_with_invocation(e, prompt, messages, invoke))
            # The engine needs ids unique among requests in flight; the client's id is only echoed.
            client_id = request.request_id or uuid.uuid4().hex
            stream = self.worker.submit(uuid.uuid4().hex, prompt, params, adapter)
            while True:
                delta = await stream.next()
                yield generate_response(client_id, delta, received)
                if delta.finished is not None:
                    return
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            # Cancelled call, disconnected client, passed deadline (all raise CancelledError at the
            # await above) or a failed write: the engine drops the request and frees its blocks.
            if stream is not None:
                stream.abort()

    async def _sampling_defaults(self) -> SamplingParams:
        """The engine's sampling defaults (the model's generation_config), asked once."""
        if self._defaults is None:
            self._defaults = await self.worker.call(lambda engine: engine.default_sampling_params())
        return self._defaults

    @unary_call
    async def ListAdapters(self, request, context):
        try:
            infos = await self.worker.call(lambda engine: engine.list_adapters())
        except Exception as exc:
            await abort_with(context, exc)
        return pb.ListAdaptersResponse(adapters=[adapter_info_to_proto(i) for i in infos])

    @unary_call
    async def LoadAdapter(self, request, context):
        try:
            if not request.name:
                raise InvalidRequestError("name", "must not be empty")
            path = resolve_adapter_path(request.path, self.config.adapter_roots)
            name = request.name
            prepared = await self.worker.prepare_adapter(path)  # the files are read beside the engine thread
            info = await self.worker.call(lambda engine: engine.load_adapter(name, prepared))
        except Exception as exc:
            await abort_with(context, exc)
        return adapter_info_to_proto(info)

    @unary_call
    async def UnloadAdapter(self, request, context):
        try:
            if not request.name:
                raise InvalidRequestError("name", "must not be empty")
            name = request.name
            await self.worker.call(lambda engine: engine.unload_adapter(name))
        except Exception as exc:
            await abort_with(context, exc)
        return pb.UnloadAdapterResponse()

    @unary_call
    async def Tokenize(self, request, context):
        # On the host pool, message included: building millions of ids into one is work of its own.
        try:
            if request.WhichOneof("input") == "messages":
                messages = messages_from_proto(request.messages)
                gen = not request.HasField("add_generation_prompt") or request.add_generation_prompt
                return await self.worker.run_host(
                    lambda engine: pb.TokenizeResponse(token_ids=engine.apply_chat_template(messages, gen))
                )
            text = request.text
            return await self.worker.run_host(lambda engine: pb.TokenizeResponse(token_ids=engine.tokenize(text)))
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def GetServerInfo(self, request, context):
        try:
            info = await self.worker.call(lambda engine: engine.info())
        except Exception as exc:
            await abort_with(context, exc)
        return server_info_to_proto(
            info, self.config, version=self.version, num_running_requests=self.worker.num_pending
        )
