"""jalora.v1.Jalora: turns RPCs into engine work on the EngineWorker and engine results into messages.

Every engine access goes through the worker: `submit` for Generate, `run_host` for work that grows
with the request (tokenizing, chat templates: on the host pool, beside the engine thread),
`prepare_adapter` for adapter files, and `call` with an `Engine` protocol method for the rest (between
two steps). Calls are admitted by a CallGate (server/call_gate.py); messages are built by
server/convert.py and failures mapped by server/errors.py. Each request field is checked against its
bound (jalora/api/limits.py) before any slow work, and `add_to_server` registers the service so that
request bytes that do not parse are refused like any other bad argument. Imports neither JAX nor numpy.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from jalora.api.limits import (
    MAX_ADAPTER_PATH_BYTES,
    MAX_CHAT_MESSAGES,
    MAX_PROMPT_BYTES,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_TOKEN_IDS,
    is_adapter_name,
)
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.engine.chat import prompt_with_invocation
from jalora.errors import AdapterNameError, AdapterPathError, InvalidRequestError, quoted
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
from server.errors import MalformedRequestError, abort_with
from server.logs import REQUEST_ID, call_status, log_access


def resolve_adapter_path(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` if it lies under one of `roots`; relative paths are tried under each root."""
    if not path:
        raise InvalidRequestError("path", "must name a PEFT adapter directory")
    if len(path.encode()) > MAX_ADAPTER_PATH_BYTES:
        raise InvalidRequestError("path", f"is {len(path.encode())} bytes long; at most {MAX_ADAPTER_PATH_BYTES}")
    if "\0" in path:
        raise InvalidRequestError("path", f"{quoted(path)} holds a NUL character")
    if not roots:
        raise AdapterPathError("this server has no adapter roots (start it with --adapter-roots DIR)")
    real_roots = [os.path.realpath(r) for r in roots]
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in real_roots]
    for candidate in candidates:
        real = os.path.realpath(candidate)  # resolves symlinks and "..": no escaping a root through them
        if not any(os.path.commonpath([real, root]) == root for root in real_roots):
            continue
        if not os.path.isdir(real):
            raise FileNotFoundError(f"adapter directory {quoted(path)} does not exist under the adapter roots")
        return real
    raise AdapterPathError(f"{quoted(path)} is outside the server's adapter roots")


def _check_adapter_name(name: str, field: str) -> None:
    if not is_adapter_name(name):
        raise AdapterNameError(name, field)


def _check_text(text: str, field: str) -> None:
    if len(text) > MAX_PROMPT_BYTES or len(text.encode()) > MAX_PROMPT_BYTES:  # a character is >= 1 byte
        raise InvalidRequestError(field, f"is {len(text.encode())} bytes of UTF-8; at most {MAX_PROMPT_BYTES}")


def _check_messages(msg: pb.ChatMessages, field: str) -> None:
    if not msg.messages:
        raise InvalidRequestError(field, "must not be empty")
    if len(msg.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(field, f"has {len(msg.messages)} messages; at most {MAX_CHAT_MESSAGES}")
    size = 0
    for m in msg.messages:
        size += len(m.role.encode()) + len(m.content.encode())
        if size > MAX_PROMPT_BYTES:
            raise InvalidRequestError(field, f"roles and contents exceed {MAX_PROMPT_BYTES} bytes of UTF-8")


class JaloraServicer(pb_grpc.JaloraServicer):
    def __init__(self, worker: EngineWorker, config: ServerConfig, *, version: str = ""):
        self.worker = worker
        self.config = config
        self.version = version
        self.calls = CallGate(config.max_pending_calls)
        self._defaults: SamplingParams | None = None
        self._max_model_len: int | None = None

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received = time.monotonic()  # the reference point of the call's timings
        # The engine needs ids unique among requests in flight; the client's id is only echoed (and logged).
        client_id = request.request_id or uuid.uuid4().hex
        REQUEST_ID.set(client_id[:MAX_REQUEST_ID_CHARS])  # every log line of this call carries it
        stream = None
        finished = None
        try:
            self.calls.admit(context)
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                raise InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
            if request.adapter:
                _check_adapter_name(request.adapter, "adapter")
            which = request.WhichOneof("prompt")
            if which is None:
                raise InvalidRequestError("prompt", "set one of text, token_ids or messages")
            if which == "text":
                if not request.text:
                    raise InvalidRequestError("prompt.text", "must not be empty")
                _check_text(request.text, "prompt.text")
            elif which == "messages":
                _check_messages(request.messages, "prompt.messages")
            else:
                n, limit = len(request.token_ids.ids), await self._model_len()
                if n == 0:
                    raise InvalidRequestError("prompt.token_ids", "must not be empty")
                if n >= limit:
                    raise InvalidRequestError(
                        "prompt", f"has {n} tokens; max_model_len is {limit} (room for 1 new token)"
                    )
            if len(request.sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise InvalidRequestError("sampling.stop_token_ids", f"must hold at most {MAX_STOP_TOKEN_IDS} ids")
            messages = messages_from_proto(request.messages) if which == "messages" else None
            prompt: str | list[int] | None = None
            if messages is None:
                prompt = request.text if which == "text" else list(request.token_ids.ids)
            params = sampling_params_from_proto(request.sampling, await self._sampling_defaults())
            adapter = request.adapter or None
            if messages is not None or request.append_invocation:
                invoke = adapter if request.append_invocation else None
                prompt = await self.worker.run_host(lambda e: prompt_with_invocation(e, prompt, messages, invoke))
            stream = self.worker.submit(uuid.uuid4().hex, prompt, params, adapter)
            while True:
                delta = await stream.next()
                finished = delta.finished
                yield generate_response(client_id, delta, received)
                if finished is not None:
                    return
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            # Cancelled call, disconnected client, passed deadline (all raise CancelledError at the
            # await above) or a failed write: the engine drops the request and frees its blocks.
            if stream is not None:
                stream.abort()
            # Before the call's status goes out: a client that has its answer finds the line written.
            # sys.exc_info(): what ends the handler (a cancellation, an abort), None if it returned.
            status = call_status(context, sys.exc_info()[1])
            log_access(REQUEST_ID.get(), request.adapter or None, finished, status, time.monotonic() - received)

    async def _sampling_defaults(self) -> SamplingParams:
        """The engine's sampling defaults (the model's generation_config), asked once."""
        if self._defaults is None:
            self._defaults = await self.worker.call(lambda engine: engine.default_sampling_params())
        return self._defaults

    async def _model_len(self) -> int:
        """The engine's max_model_len, asked once: a prompt of token ids is checked against it here."""
        if self._max_model_len is None:
            self._max_model_len = (await self.worker.call(lambda engine: engine.info())).max_model_len
        return self._max_model_len

    @unary_call
    async def ListAdapters(self, request, context):
        try:
            infos = await self.worker.call(lambda engine: engine.list_adapters())
            return pb.ListAdaptersResponse(adapters=[adapter_info_to_proto(i) for i in infos])
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def LoadAdapter(self, request, context):
        try:
            name = request.name
            _check_adapter_name(name, "name")
            roots = self.config.adapter_roots
            path = resolve_adapter_path(request.path, roots)
            # Read beside the engine thread; every file read must resolve inside the roots too, not
            # only the directory.
            prepared = await self.worker.prepare_adapter(path, roots)
            info = await self.worker.call(lambda engine: engine.load_adapter(name, prepared))
            return adapter_info_to_proto(info)
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def UnloadAdapter(self, request, context):
        try:
            name = request.name
            _check_adapter_name(name, "name")
            await self.worker.call(lambda engine: engine.unload_adapter(name))
            return pb.UnloadAdapterResponse()
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def Tokenize(self, request, context):
        # On the host pool, message included: building millions of ids into one is work of its own.
        try:
            if request.WhichOneof("input") == "messages":
                _check_messages(request.messages, "messages")
                messages = messages_from_proto(request.messages)
                gen = not request.HasField("add_generation_prompt") or request.add_generation_prompt
                return await self.worker.run_host(
                    lambda engine: pb.TokenizeResponse(token_ids=engine.apply_chat_template(messages, gen))
                )
            text = request.text
            _check_text(text, "text")
            return await self.worker.run_host(lambda engine: pb.TokenizeResponse(token_ids=engine.tokenize(text)))
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def GetServerInfo(self, request, context):
        try:
            info = await self.worker.call(lambda engine: engine.info())
            return server_info_to_proto(
                info, self.config, version=self.version, num_running_requests=self.worker.num_pending
            )
        except Exception as exc:
            await abort_with(context, exc)


class _Malformed:
    """What a request deserializer hands the handler for bytes that are not its request message."""

    def __init__(self, message_type: str):
        self.message_type = message_type


def _parse_or_mark(message_class) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError; anything else a parser raises means the same: not this message
            return _Malformed(message_class.DESCRIPTOR.full_name)

    return parse


def _refusing_malformed(behavior, streaming: bool):
    def error(request: _Malformed) -> MalformedRequestError:
        return MalformedRequestError(f"the request bytes are not a valid {request.message_type} message")

    if streaming:

        async def stream(request, context):
            if isinstance(request, _Malformed):
                await abort_with(context, error(request))
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request, context):
        if isinstance(request, _Malformed):
            await abort_with(context, error(request))
        return await behavior(request, context)

    return unary


def add_to_server(servicer: JaloraServicer, server: grpc.aio.Server) -> None:
    """Registers jalora.v1.Jalora as the generated `add_JaloraServicer_to_server` does, except that bytes
    which do not parse as the request message end the call with INVALID_ARGUMENT and a short message.

    grpc.aio parses the request before any handler or interceptor code runs, and a parser that raises
    makes the call UNKNOWN and logs a full traceback for every such call; so the parser itself must not
    raise. It hands the handler a `_Malformed` marker instead, which the handler refuses through the one
    error mapping. (A server interceptor could wrap the parser as well, but this keeps the change inside
    the Jalora service and out of the interceptor chain.)"""
    service = pb.DESCRIPTOR.services_by_name["Jalora"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _refusing_malformed(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=_parse_or_mark(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
