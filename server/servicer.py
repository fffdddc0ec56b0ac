"""jalora.v1.Jalora: turns RPCs into engine work on the EngineWorker and engine results into messages.

What every front does with a call (the bounds of each field, starting a generation, adapter
management, the CallGate that admits calls) is server/frontend.py's; this module maps protobuf
messages onto it. Every engine access goes through the worker: `run_host` for work that grows with the
request (tokenizing, chat templates: on the host pool, beside the engine thread), and `call` with an
`Engine` protocol method for the rest (between two steps). Messages are built by server/convert.py and
failures mapped by server/errors.py. `add_to_server` registers the service so that request bytes that
do not parse are refused like any other bad argument. Imports neither JAX nor numpy.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from jalora.api.limits import MAX_REQUEST_ID_CHARS
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.errors import InvalidRequestError
from server.call_gate import unary_call
from server.config import ServerConfig
from server.convert import (
    adapter_info_to_proto,
    generate_response,
    messages_from_proto,
    pipeline_response,
    sampling_params_from_proto,
    server_info_to_proto,
)
from server.errors import MalformedRequestError, abort_with
from server.frontend import (
    Frontend,
    check_adapter_name,
    check_messages,
    check_stop_token_ids,
    check_text,
)
from server.logs import REQUEST_ID, call_status, log_access
from server.pipeline import Judge, run_pipeline


def _pairs(msg: pb.ChatMessages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in msg.messages]


class JaloraServicer(pb_grpc.JaloraServicer):
    def __init__(self, front: Frontend, *, version: str = ""):
        self.front = front
        self.worker = front.worker
        self.config: ServerConfig = front.config
        self.version = version
        self.calls = front.calls

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
                check_adapter_name(request.adapter, "adapter")
            prompt, messages = await self._prompt(request)
            check_stop_token_ids(request.sampling.stop_token_ids, "sampling.stop_token_ids")
            params = sampling_params_from_proto(request.sampling, await self.front.sampling_defaults())
            adapter = request.adapter or None
            ttl = request.session_ttl if request.HasField("session_ttl") else None
            session = await self.front.session_fields(request.session or None, ttl, request.end_session)
            stream = await self.front.start(prompt, messages, params, adapter, request.append_invocation, session)
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

    async def Pipeline(
        self, request: pb.PipelineRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PipelineResponse]:
        received = time.monotonic()
        client_id = request.request_id or uuid.uuid4().hex
        REQUEST_ID.set(client_id[:MAX_REQUEST_ID_CHARS])
        try:
            self.calls.admit(context)
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                raise InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
            prompt, messages = await self._prompt(request)
            check_stop_token_ids(request.sampling.stop_token_ids, "sampling.stop_token_ids")
            defaults = await self.front.sampling_defaults()
            params = sampling_params_from_proto(request.sampling, defaults)
            judges = []
            for k, j in enumerate(request.judges):
                check_stop_token_ids(j.sampling.stop_token_ids, f"judges[{k}].sampling.stop_token_ids")
                try:
                    judge_params = sampling_params_from_proto(j.sampling, defaults)
                except InvalidRequestError as e:
                    raise InvalidRequestError(f"judges[{k}].{e.field}", e.message) from None
                text = j.invocation_text if j.HasField("invocation_text") else None
                judges.append(Judge(j.adapter or None, text, judge_params))
            ttl = request.session_ttl if request.HasField("session_ttl") else None
            stages = run_pipeline(self.front, prompt, messages, params, judges, ttl)
            try:
                async for stage in stages:
                    yield pipeline_response(client_id, stage, received)
            finally:
                await stages.aclose()  # aborts what still runs, ends the call's session
        except Exception as exc:
            await abort_with(context, exc)

    async def _prompt(self, request) -> tuple[str | list[int] | None, list[dict[str, str]] | None]:
        """A request's prompt oneof (text, token_ids or messages), checked: (prompt, None) or (None, messages)."""
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidRequestError("prompt", "set one of text, token_ids or messages")
        if which == "text":
            if not request.text:
                raise InvalidRequestError("prompt.text", "must not be empty")
            check_text(request.text, "prompt.text")
            return request.text, None
        if which == "messages":
            check_messages(_pairs(request.messages), "prompt.messages")
            return None, messages_from_proto(request.messages)
        sampling = request.sampling  # (a prompt it truncates may be longer than the model takes)
        truncate = sampling.truncate_prompt_tokens if sampling.HasField("truncate_prompt_tokens") else None
        await self.front.check_token_ids(request.token_ids.ids, "prompt.token_ids", truncate=truncate)
        return list(request.token_ids.ids), None

    @unary_call
    async def EndSession(self, request, context):
        try:
            await self.front.end_session(request.session)
            return pb.EndSessionResponse()
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def ListAdapters(self, request, context):
        try:
            infos = await self.front.list_adapters()
            return pb.ListAdaptersResponse(adapters=[adapter_info_to_proto(i) for i in infos])
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def LoadAdapter(self, request, context):
        try:
            return adapter_info_to_proto(await self.front.load_adapter(request.name, request.path))
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def UnloadAdapter(self, request, context):
        try:
            await self.front.unload_adapter(request.name)
            return pb.UnloadAdapterResponse()
        except Exception as exc:
            await abort_with(context, exc)

    @unary_call
    async def Tokenize(self, request, context):
        # On the host pool, message included: building millions of ids into one is work of its own.
        try:
            if request.WhichOneof("input") == "messages":
                check_messages(_pairs(request.messages), "messages")
                messages = messages_from_proto(request.messages)
                gen = not request.HasField("add_generation_prompt") or request.add_generation_prompt
                return await self.worker.run_host(
                    lambda engine: pb.TokenizeResponse(token_ids=engine.apply_chat_template(messages, gen))
                )
            text = request.text
            check_text(text, "text")
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
