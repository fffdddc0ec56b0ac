"""The OpenAI-compatible HTTP front: Starlette routes served by uvicorn on the gRPC server's event loop.

    POST /v1/completions        prompt as text or token ids; streamed as server-sent events with stream
    POST /v1/chat/completions   a conversation in the model's chat template
    GET  /v1/models             the served model and every loaded adapter (kind, invocation)
    POST /v1/load_lora_adapter  {"lora_name", "lora_path"}: confined to the adapter roots, as over gRPC
    POST /v1/unload_lora_adapter {"lora_name"}
    GET  /health                200 while serving, 503 once the server drains

`model` picks what generates: the served model's name (ServerConfig.model_name, else the engine's model)
the base model, an adapter's name that adapter. An aLoRA request must hold the adapter's invocation, as
over gRPC, unless the body asks the server to append it (`"append_invocation": true`, jalora's
extension; the OpenAI client sends it through `extra_body`).

Everything a call does goes through server/frontend.py, the gRPC servicer's path too: the same bounds,
the same engine worker and admission bound (429 past it), the same CallGate (a drain refuses both
fronts' calls with 503 and waits for both fronts' running calls), the same error classification
(server/errors.py: HTTP status and OpenAI error type, `param` naming the field) and the same bearer
tokens (server/security.py's TokenPolicy, from an `Authorization: Bearer` header; the admin token for
loading and unloading adapters when there is one). A streamed request's errors before its first
token (an unknown adapter, a missing invocation, overload) get their HTTP status; a failure after
that (the server stopping) arrives as an `error` event. A client that disconnects aborts its request,
which frees its KV blocks at once. Imports neither JAX nor numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jalora.api.limits import MAX_ERROR_MESSAGE_CHARS, MAX_HTTP_BODY_BYTES, is_adapter_name
from jalora.engine.chat import prompt_with_invocation
from jalora.engine.detokenizer import CONTEXT_IDS
from jalora.errors import AdapterNotFoundError, InvalidRequestError, InvocationNotFoundError, quoted
from jalora.outputs import FinishedRequest, RequestDelta
from server.config import ServerConfig
from server.engine_worker import RequestStream
from server.errors import MalformedRequestError, RequestTooLargeError, http_status_for, http_status_of
from server.frontend import Frontend
from server.logs import REQUEST_ID, log_access
from server.openai_api import (
    Generation,
    chat_logprobs,
    completion_logprobs,
    extension,
    parse_chat,
    parse_completion,
    usage,
)
from server.security import TokenPolicy, bearer_token

logger = logging.getLogger(__name__)

# Bodies up to this size are parsed on the event loop; larger ones on the host pool.
_INLINE_JSON_BYTES = 64 * 1024
_HOW = "an `Authorization: Bearer <token>` header"

# Engine and shared field names -> the OpenAI parameter a client sent.
_COMPLETION_FIELDS = {"adapter": "model", "prompt_token_ids": "prompt"}
_CHAT_FIELDS = {"adapter": "model", "prompt": "messages", "prompt_token_ids": "messages"}
_ADAPTER_FIELDS = {"name": "lora_name", "path": "lora_path", "adapter": "lora_name"}


def error_body(status: int, kind: str, code: str, message: str, param: str | None) -> JSONResponse:
    """OpenAI's error shape."""
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        cut = " ... (cut)"
        message = message[: MAX_ERROR_MESSAGE_CHARS - len(cut)] + cut
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _EventStream(StreamingResponse):
    """Server-sent events, and `cleanup()` once the response ends however it ends (even unstarted: a
    generator that never ran would not run its own `finally`)."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class HttpFront:
    """The routes over a Frontend, and the uvicorn server that serves them (`start`, `stop`)."""

    def __init__(self, front: Frontend, config: ServerConfig, policy: TokenPolicy | None):
        self.front = front
        self.config = config
        self.policy = policy
        self.port: int | None = None
        self._served: str | None = None
        self._created = int(time.time())
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main: asyncio.Future | None = None
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/models", self._route(self._models), methods=["GET"]),
                Route("/v1/completions", self._route(self._completions, unary=False), methods=["POST"]),
                Route("/v1/chat/completions", self._route(self._chat, unary=False), methods=["POST"]),
                Route("/v1/load_lora_adapter", self._route(self._load, admin=True), methods=["POST"]),
                Route("/v1/unload_lora_adapter", self._route(self._unload, admin=True), methods=["POST"]),
            ]
        )

    # ---- serving -----------------------------------------------------------------------------------

    async def start(self) -> int:
        """Binds the port (0 picks a free one) on the config's host and starts serving; returns the port."""
        host, port = self.config.host.strip("[]"), self.config.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror:
            pass
        sock = socket.create_server((host, port), family=family)  # SO_REUSEADDR, as gRPC binds
        tls = {}
        if self.config.tls_cert is not None:
            tls = dict(ssl_certfile=self.config.tls_cert, ssl_keyfile=self.config.tls_key)
            if self.config.tls_client_ca is not None:
                tls.update(ssl_ca_certs=self.config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        uv_config = uvicorn.Config(
            self.app, lifespan="off", log_config=None, access_log=False, server_header=False,
            timeout_graceful_shutdown=5, **tls,
        )  # fmt: skip
        uv_config.load()
        server = uvicorn.Server(uv_config)
        server.lifespan = uv_config.lifespan_class(uv_config)  # "off": a no-op, as uvicorn's own serve() sets it
        # startup / main_loop / shutdown rather than serve(): serve() would take over SIGINT and SIGTERM,
        # whose handlers are the gRPC server's drain.
        await server.startup(sockets=[sock])
        self._server, self._socket = server, sock
        self._main = asyncio.ensure_future(server.main_loop())
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Closes the port and the connections (their calls have ended by now: the server drains first)."""
        if self._server is None:
            return
        self._server.should_exit = True
        await self._main
        await self._server.shutdown(sockets=[self._socket])
        self._server = None

    # ---- plumbing ----------------------------------------------------------------------------------

    def _route(
        self, handler: Callable[[Request, Callable[[], None]], Awaitable[Response]], *, admin: bool = False,
        unary: bool = True,
    ) -> Callable[[Request], Awaitable[Response]]:  # fmt: skip
        """The token check, then admission through the CallGate, then `handler(request, release)`;
        `release` ends the call's admission (a streamed response releases when its stream ends, every
        other response when the handler returns)."""

        async def endpoint(request: Request) -> Response:
            denied = self._authorize(request, admin)
            if denied is not None:
                return denied
            try:
                release = self.front.calls.enter(unary)
            except Exception as exc:
                return self._error(exc, {})
            streaming = False
            try:
                response = await handler(request, release)
                streaming = isinstance(response, StreamingResponse)
                return response
            finally:
                if not streaming:
                    release()

        return endpoint

    def _authorize(self, request: Request, admin: bool) -> Response | None:
        if self.policy is None:
            return None
        presented = bearer_token(request.headers.get("authorization"))
        denied = self.policy.check(presented, admin, f"{request.method} {request.url.path}", _HOW)
        if denied is None:
            return None
        code, why = denied
        status, kind = http_status_of(grpc.StatusCode[code])
        return error_body(status, kind, code.lower(), why, None)

    def _error(self, exc: BaseException, fields: dict[str, str]) -> JSONResponse:
        """`exc` in OpenAI's error shape, its field renamed to the parameter the client sent."""
        status, kind, code, message, field = http_status_for(exc)
        param = None if field is None else fields.get(field, field)
        if isinstance(exc, InvalidRequestError) and param is not None:
            message = f"{param}: {exc.message}"
        elif param is not None:  # a file that is not there: the message says what, the param where
            message = f"{param}: {message}"
        if isinstance(exc, AdapterNotFoundError) and param == "model":
            message = (
                f"model: {quoted(exc.name)} is neither the served model {quoted(self._served)} nor a loaded "
                "adapter (GET /v1/models lists them)"
            )
        if isinstance(exc, InvocationNotFoundError):
            message = (
                f"{param}: does not contain the invocation sequence {quoted(exc.invocation)} of aLoRA adapter "
                f"{quoted(exc.name)}; end the prompt with it (GET /v1/models shows it), or send "
                '"append_invocation": true (the OpenAI client: extra_body) to have the server append it'
            )
        return error_body(status, kind, code, message, param)

    async def _json(self, request: Request) -> dict:
        """The body as a JSON object, read up to MAX_HTTP_BODY_BYTES."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_HTTP_BODY_BYTES:
                raise RequestTooLargeError(f"the request body is over {MAX_HTTP_BODY_BYTES} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        try:
            if len(data) <= _INLINE_JSON_BYTES:
                body = json.loads(data)
            else:
                body = await self.front.worker.run_host(lambda _: json.loads(data))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise MalformedRequestError(f"the request body is not JSON: {e}") from None
        except RecursionError:
            raise MalformedRequestError("the request body nests arrays or objects too deeply") from None
        if not isinstance(body, dict):
            raise MalformedRequestError("the request body must be a JSON object")
        return body

    async def _served_name(self) -> str:
        if self._served is None:
            info = await self.front.worker.call(lambda engine: engine.info())
            self._served = self.config.model_name or info.model
        return self._served

    async def _adapter(self, model: str) -> str | None:
        """The adapter `model` names; None for the served model. Unknown names fail as the engine fails an
        unknown adapter (404), not-even-a-name ones at once."""
        if model == await self._served_name():
            return None
        if not is_adapter_name(model):
            raise AdapterNotFoundError(model)
        return model

    # ---- routes ------------------------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        if self.front.calls.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if self.front.broken is not None:
            return JSONResponse({"status": "not serving", "reason": self.front.broken}, status_code=503)
        return JSONResponse({"status": "serving"})

    def _model_entry(self, info) -> dict:
        return {
            "id": info.name,
            "object": "model",
            "created": self._created,
            "owned_by": "jalora",
            "root": info.name,
            "parent": self._served,
            "jalora": {
                "kind": info.kind,
                "invocation_tokens": None if info.invocation_tokens is None else list(info.invocation_tokens),
                "invocation_string": info.invocation_string,
                "rank": int(info.rank),
                "targets": list(info.targets),
                "identity": info.identity,
            },
        }

    async def _models(self, request: Request, release) -> Response:
        try:
            served = await self._served_name()
            info = await self.front.worker.call(lambda engine: engine.info())
            adapters = await self.front.list_adapters()
        except Exception as exc:
            return self._error(exc, {})
        base = {
            "id": served, "object": "model", "created": self._created, "owned_by": "jalora", "root": info.model,
            "parent": None, "max_model_len": info.max_model_len, "jalora": {"kind": "base"},
        }  # fmt: skip
        return JSONResponse({"object": "list", "data": [base, *(self._model_entry(a) for a in adapters)]})

    async def _load(self, request: Request, release) -> Response:
        try:
            body = await self._json(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str):
                raise InvalidRequestError("lora_name", "must be a string: the adapter's name")
            if not isinstance(path, str):
                raise InvalidRequestError("lora_path", "must be a string: a PEFT adapter directory")
            await self._served_name()
            info = await self.front.load_adapter(name, path, ("lora_name", "lora_path"))
        except Exception as exc:
            return self._error(exc, _ADAPTER_FIELDS)
        return JSONResponse(self._model_entry(info))

    async def _unload(self, request: Request, release) -> Response:
        try:
            body = await self._json(request)
            name = body.get("lora_name")
            if not isinstance(name, str):
                raise InvalidRequestError("lora_name", "must be a string: the adapter's name")
            await self.front.unload_adapter(name, "lora_name")
        except Exception as exc:
            return self._error(exc, _ADAPTER_FIELDS)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def _completions(self, request: Request, release) -> Response:
        return await self._generate(request, release, chat=False)

    async def _chat(self, request: Request, release) -> Response:
        return await self._generate(request, release, chat=True)

    async def _generate(self, request: Request, release: Callable[[], None], chat: bool) -> Response:
        received = time.monotonic()  # the reference point of the call's timings
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        REQUEST_ID.set(request_id)
        route = f"POST {request.url.path}"
        fields = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
        streams: list[RequestStream] = []  # one per completion (`n`)
        watcher: asyncio.Future | None = None
        gen: Generation | None = None
        adapter = None
        finished: FinishedRequest | None = None
        status = "500"
        try:
            body = await self._json(request)
            if chat:  # (a pipeline session's chat keeps the engine's default: its share reserves max_tokens' blocks)
                in_session = isinstance(body, dict) and body.get("session") is not None
                defaults = await (self.front.sampling_defaults() if in_session else self.front.chat_sampling_defaults())
                gen = parse_chat(body, defaults)
            else:
                gen, ids = parse_completion(body, await self.front.sampling_defaults())
                if ids is not None:
                    await self.front.check_token_ids(ids, "prompt", truncate=gen.params.truncate_prompt_tokens)
                if gen.echo and gen.stream and gen.params.logprobs is not None:
                    raise InvalidRequestError("echo", "with logprobs needs stream: false (prompt logprobs come "
                                              "with the end of the request)")  # fmt: skip
            session = await self.front.session_fields(gen.session, gen.session_ttl, gen.end_session)
            adapter = await self._adapter(gen.model)
            n = gen.params.n  # n completions: n requests (completion c draws with the seed + c, as vLLM's)
            bound = self.front.worker.max_pending_requests
            if n > bound:  # (a 429 would say "retry later" to a call that can never be admitted)
                raise InvalidRequestError("n", f"is {n}, more requests than the server admits at once "
                                          f"(max_pending_requests={bound}): each completion is a request")  # fmt: skip
            for c in range(n):
                streams.append(await self.front.start(
                    gen.prompt, gen.messages, gen.params if n == 1 else gen.params.child(c), adapter,
                    gen.append_invocation, session, gen.max_tokens_field,
                ))  # fmt: skip
            watcher = asyncio.ensure_future(_abort_on_disconnect(request, streams))
            firsts = [await stream.next() for stream in streams]  # errors before the first token: their own status
            if gen.stream:
                opened, watching = list(streams), watcher

                def cleanup() -> None:  # a client that went away: the engine drops the requests
                    for one in opened:
                        one.abort()
                    watching.cancel()
                    release()

                events = self._events(request_id, gen, chat, streams, firsts, received, route, cleanup)
                status = "200"
                return _EventStream(events, cleanup)
            choices = []
            for stream, first in zip(streams, firsts):
                deltas = [first]
                while deltas[-1].finished is None:
                    deltas.append(await stream.next())
                choices.append(deltas)
            finished = choices[0][-1].finished
            response = await self._whole(request_id, gen, chat, choices, received)
            status = "200"
            return JSONResponse(response)
        except Exception as exc:
            response = self._error(exc, fields)
            status = str(response.status_code)
            return response
        finally:
            if status != "200" or not (gen is not None and gen.stream):
                for stream in streams:
                    stream.abort()  # a cancelled handler, or a request that failed: the engine drops it
                if watcher is not None:
                    watcher.cancel()
                log_access(request_id, adapter, finished, status, time.monotonic() - received, rpc=route)

    async def _texts(self, ids: list[int]) -> list[str]:
        return await self.front.worker.run_host(lambda engine: engine.token_texts(ids))

    async def _logprobs(
        self, gen: Generation, chat: bool, token_ids, logprobs, offset: int, starts: dict[int, int] | None = None
    ) -> dict | None:
        """The `logprobs` object of `token_ids` (whose {token: logprob} are `logprobs`), or None; `offset` and
        `starts` as completion_logprobs takes them."""
        if gen.params.logprobs is None or logprobs is None:
            return None
        alternatives = sorted({t for lp in logprobs for t in lp} | set(token_ids))
        names = dict(zip(alternatives, await self._texts(alternatives)))
        texts = [names[t] for t in token_ids]
        tops = [names] * len(token_ids)
        if chat:
            raw = await self.front.worker.run_host(lambda engine: engine.token_bytes(alternatives))
            return chat_logprobs(token_ids, texts, logprobs, tops, gen.params.logprobs, dict(zip(alternatives, raw)))
        return completion_logprobs(token_ids, texts, logprobs, tops, offset, starts)

    async def _prompt_starts(self, ids: list[int]) -> dict[int, int]:
        """Where each prompt token's piece of the prompt's text begins: the length of the text the tokens before it
        decode to, each token's piece measured after a few tokens before it (as the engine's detokenizer hands
        out an output's text: a token's own text is not its piece of the text)."""

        def starts(engine) -> dict[int, int]:
            out, at = {}, 0
            for i, token in enumerate(ids):
                out[i] = at
                window = ids[max(0, i - CONTEXT_IDS) : i]
                at += max(0, len(engine.decode([*window, token])) - len(engine.decode(window)))
            return out

        return await self.front.worker.run_host(starts)

    async def _prompt_text(self, gen: Generation) -> str:
        """The text of the prompt that the completion continues: with the invocation, where the server appended it,
        and only its last tokens where the request truncates it (truncate_prompt_tokens)."""
        truncate = gen.params.truncate_prompt_tokens
        if isinstance(gen.prompt, str) and not gen.append_invocation and truncate is None:
            return gen.prompt
        prompt, adapter = gen.prompt, None if gen.model == self._served else gen.model

        def text(engine) -> str:
            ids = prompt_with_invocation(engine, prompt, None, adapter, truncate) if gen.append_invocation else prompt
            if truncate is not None:
                cut = engine.encode_prompt(ids, truncate).token_ids
                if isinstance(ids, str) and len(cut) == len(engine.tokenize(ids)):
                    return ids  # (nothing was cut: the text as sent, not its decode)
                ids = cut
            return engine.decode(list(ids))

        return await self.front.worker.run_host(text)

    async def _whole(
        self, request_id: str, gen: Generation, chat: bool, choices: list[list[RequestDelta]], received: float
    ) -> dict:
        """The response body of a whole request: one choice per completion (each its list of deltas)."""
        head = {"id": request_id, "created": int(time.time()), "model": gen.model}
        body = {**head, "object": "chat.completion" if chat else "text_completion"}
        finisheds = [deltas[-1].finished for deltas in choices]
        body.update(choices=[await self._choice(gen, chat, index, deltas) for index, deltas in enumerate(choices)],
                    usage=usage(finisheds), jalora=extension(finisheds[0], received))  # fmt: skip
        return body

    async def _choice(self, gen: Generation, chat: bool, index: int, deltas: list[RequestDelta]) -> dict:
        finished = deltas[-1].finished
        assert finished is not None
        token_ids = [t for d in deltas for t in d.token_ids]
        text = "".join(d.text for d in deltas)
        logprobs = None if gen.params.logprobs is None else [lp for d in deltas for lp in (d.logprobs or [])]
        if chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": await self._logprobs(gen, chat, token_ids, logprobs, 0),
                "finish_reason": finished.finish_reason,
                "token_ids": token_ids,
            }
        else:
            prefix = await self._prompt_text(gen) if gen.echo else ""
            starts, at, position = {}, len(prefix), 0  # each delta's tokens from where its text begins, as streamed
            for delta in deltas:
                starts[position] = at
                at, position = at + len(delta.text), position + len(delta.token_ids)
            lp = await self._logprobs(gen, chat, token_ids, logprobs, len(prefix), starts)
            if lp is not None and gen.echo and finished.prompt_logprobs is not None:
                prompt_ids = finished.prompt_token_ids
                firsts = [{} if v is None else {t: v} for t, v in zip(prompt_ids, finished.prompt_logprobs)]
                prompt_starts = {i: min(o, len(prefix)) for i, o in (await self._prompt_starts(prompt_ids)).items()}
                echoed = await self._logprobs(gen, chat, prompt_ids, firsts, 0, prompt_starts)
                for key in lp:
                    lp[key] = echoed[key] + lp[key]
                lp["token_logprobs"][0] = None
                lp["top_logprobs"][0] = None
            return {
                "index": index,
                "text": prefix + text,
                "logprobs": lp,
                "finish_reason": finished.finish_reason,
                "token_ids": token_ids,
            }

    async def _events(
        self, request_id: str, gen: Generation, chat: bool, streams: list[RequestStream], firsts: list[RequestDelta],
        received: float, route: str, cleanup: Callable[[], None],
    ) -> AsyncIterator[str]:  # fmt: skip
        """The server-sent events of a streamed request (one stream per completion, each event naming its
        choice's index), from their first deltas on; `cleanup` ends the requests and the call's admission."""
        head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": gen.model}  # fmt: skip
        finished: list[FinishedRequest | None] = [None] * len(streams)
        waits: dict[int, asyncio.Future] = {}
        status = "200"
        offsets = [0] * len(streams)
        try:
            opening = []
            prefix = await self._prompt_text(gen) if gen.echo and not chat else None
            for index in range(len(streams)):
                if chat:
                    opening.append({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None, "token_ids": []})  # fmt: skip
                elif prefix is not None:
                    offsets[index] = len(prefix)
                    opening.append({"index": index, "text": prefix, "logprobs": None, "finish_reason": None,
                                    "token_ids": []})  # fmt: skip
            if opening:
                yield "".join(_sse({**head, "choices": [choice]}) for choice in opening)
            arrived = list(enumerate(firsts))
            while True:
                # One event per delta, but every delta that has arrived already goes out in one write:
                # under load the loop falls behind the engine, and each write costs the server more
                # than the event it carries.
                events = []
                for index, delta in arrived:
                    while delta is not None:
                        done = finished[index] = delta.finished
                        lp = await self._logprobs(gen, chat, delta.token_ids, delta.logprobs, offsets[index])
                        offsets[index] += len(delta.text)
                        choice = {"index": index, "logprobs": lp, "finish_reason": done and done.finish_reason,
                                  "token_ids": delta.token_ids}  # fmt: skip
                        if chat:
                            choice["delta"] = {"content": delta.text}
                        else:
                            choice["text"] = delta.text
                        chunk = {**head, "choices": [choice]}
                        if done is not None:
                            chunk["jalora"] = extension(done, received)
                        events.append(_sse(chunk))
                        delta = None if done is not None else streams[index].next_ready()
                yield "".join(events)
                if all(f is not None for f in finished):
                    break
                for index, stream in enumerate(streams):
                    if finished[index] is None and index not in waits:
                        waits[index] = asyncio.ensure_future(stream.next())
                await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
                arrived = [(index, waits.pop(index).result()) for index in sorted(waits) if waits[index].done()]
            if gen.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(finished)})
            yield _sse("[DONE]")
        except Exception as exc:  # after the first token: the server stopping, the engine failing
            error = self._error(exc, {})
            status = str(error.status_code)
            yield _sse(json.loads(error.body))
        finally:
            for wait in waits.values():
                wait.cancel()
            cleanup()
            ended = finished[0] if all(f is not None for f in finished) else None
            log_access(request_id, gen.model if gen.model != self._served else None, ended,
                       status if ended is not None or status != "200" else "499", time.monotonic() - received,
                       rpc=route)  # fmt: skip


async def _abort_on_disconnect(request: Request, streams: list[RequestStream]) -> None:
    """Waits for the client to go away and aborts its requests then (the engine frees their blocks at once);
    the handler cancels this when the call ends. The body has been read, so the next ASGI message is the
    disconnection."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for stream in streams:
                    stream.abort()
                return
