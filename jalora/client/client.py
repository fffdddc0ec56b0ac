"""Python client of the jalora gRPC server (jalora.v1.Jalora), synchronous and asyncio.

    from jalora.client import Client, with_invocation

    with Client("127.0.0.1:50051") as client:
        answer = client.generate("What is 2 + 2?", max_tokens=32)
        judge = client.adapter("judge")
        verdict = client.generate(with_invocation(answer.prompt_token_ids + answer.token_ids, judge),
                                  adapter="judge", max_tokens=8)
        print(verdict.text, verdict.usage.cached_tokens)

Against a server with TLS and a token (`jalora serve --tls-cert ... --auth-token-file ...`):

    Client("server:50051", tls=TLS(ca="ca.pem"), token=read_token_file("token"))

Results are typed dataclasses; a failed call raises `ServerError` with the gRPC status code, the
server's message and, for INVALID_ARGUMENT, the request field at fault. `generate_request` builds the
GenerateRequest message the clients send, for callers that use the generated stub directly.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jalora.api import (
    AUTHORIZATION_METADATA_KEY,
    BEARER_PREFIX,
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    FIELD_METADATA_KEY,
)
from jalora.api.limits import MAX_INT32
from jalora.api.v1 import jalora_pb2 as pb
from jalora.api.v1 import jalora_pb2_grpc as pb_grpc
from jalora.sampling_params import SamplingParams

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


# ---- results -------------------------------------------------------------------------------------


class ServerError(Exception):
    """A call failed. `code` is a grpc.StatusCode; `field` names the bad request field when known."""

    def __init__(self, code: grpc.StatusCode, details: str, field: str | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds, measured by the server from the moment it received the call."""

    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float


@dataclasses.dataclass(frozen=True)
class GenerateChunk:
    """One streamed message: what the last engine step added. `finish_reason` etc. only on the last."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    activation_index: int | None = None
    timings: Timings | None = None
    prompt_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    request_id: str
    # the ids the model saw, when the prompt was given as ids (truncate_prompt_tokens keeps the last ones: as many as
    # usage.prompt_tokens counts)
    prompt_token_ids: list[int] | None
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage
    activation_index: int | None  # aLoRA: first position of the invocation; None for the base model
    timings: Timings
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "lora" | "alora"
    invocation_tokens: list[int] | None
    invocation_string: str | None
    rank: int
    targets: list[str]
    identity: str


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    version: str
    model: str
    dtype: str
    platform: str
    block_size: int
    num_total_blocks: int
    num_free_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_loras: int
    vocab_size: int
    eos_token_ids: list[int]
    adapter_roots: list[str]
    num_running_requests: int
    max_pending_requests: int
    max_cpu_loras: int  # adapters loaded at once; max_loras of them hold a device slot
    host_kv_cache_blocks: int  # KV blocks the host-memory tier holds (0: no tier)


def with_invocation(prompt: str | Sequence[int], adapter: AdapterInfo) -> str | list[int]:
    """`prompt` followed by the adapter's invocation sequence, so that an aLoRA request activates.

    Token-id prompts get the invocation tokens; text prompts get the invocation string. Prefer ids:
    a tokenizer may merge the string with the text before it, and then the server answers
    FAILED_PRECONDITION (invocation not found) rather than silently running the base model.
    """
    if isinstance(prompt, str):
        if adapter.invocation_string is None:
            raise ValueError(
                f"adapter {adapter.name!r} has no invocation string; pass the prompt as token ids, "
                "or use Client.with_invocation, which tokenizes it on the server"
            )
        return prompt + adapter.invocation_string
    if not adapter.invocation_tokens:
        raise ValueError(f"adapter {adapter.name!r} is a {adapter.kind} adapter without invocation tokens")
    return list(prompt) + list(adapter.invocation_tokens)


# ---- proto <-> python ----------------------------------------------------------------------------


_SAMPLING_FIELDS = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)  # jalora.SamplingParams' names
# jalora.SamplingParams' fields that Generate has no place for, and what to do instead
_NOT_CARRIED = {"n": "send n requests: they share the prompt's KV cache"}
_DEFAULT_PARAMS = SamplingParams()


Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


def _is_conversation(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], Mapping)


def generate_request(
    prompt: Prompt,
    adapter: str | None = None,
    *,
    params: Any = None,
    request_id: str | None = None,
    append_invocation: bool = False,
    session: str | None = None,
    session_ttl: float | None = None,
    end_session: bool = False,
    **sampling: Any,
) -> pb.GenerateRequest:
    """The GenerateRequest that `generate_stream` sends (also for callers that use the stub directly).

    `prompt` is text, token ids, or a conversation ({'role', 'content'} messages, rendered by the
    server with the model's chat template). Sampling comes from `params` (a jalora.SamplingParams, or
    anything with its attribute names), then from keyword overrides (`max_tokens=`, `temperature=`,
    ... as in `generate_stream`); a value left None stays unset, so the server applies its default.
    `append_invocation` asks the server to end the prompt with the aLoRA adapter's invocation.
    `session` (with `session_ttl` seconds) keeps the KV blocks of this request for the session's next
    requests; `end_session` ends the session when this request finishes.
    """
    sp = _sampling_message(params, sampling)
    msg = pb.GenerateRequest(
        adapter=adapter or "", sampling=sp, request_id=request_id or "", append_invocation=append_invocation,
        session=session or "", end_session=end_session,
    )  # fmt: skip
    if session_ttl is not None:
        msg.session_ttl = session_ttl
    _put_prompt(msg, prompt)
    return msg


def _put_prompt(msg, prompt) -> None:
    """Sets the prompt oneof of a GenerateRequest or PipelineRequest: text, a conversation or token ids."""
    if isinstance(prompt, str):
        msg.text = prompt
    elif _is_conversation(prompt):
        msg.messages.CopyFrom(_chat_messages(prompt, "prompt"))
    else:
        msg.token_ids.ids.extend(_token_ids(prompt))


def _token_ids(prompt) -> list[int]:
    """A prompt of token ids as ints; anything else raises ValueError naming `prompt` (bytes too: not ids)."""
    if isinstance(prompt, bytes | bytearray | Mapping) or not isinstance(prompt, Iterable):
        raise ValueError(f"prompt: must be text, token ids or a conversation, got {type(prompt).__name__}")
    ids = list(prompt)
    bad = [t for t in ids if not _is_token_id(t)]
    if bad:  # (a list: the bad id may be None itself)
        raise ValueError(f"prompt: token ids must be integers in [0, {MAX_INT32}], got {bad[0]!r:.40}")
    return [int(t) for t in ids]


def _is_token_id(value: Any) -> bool:
    """An int (or numpy integer) that is not a bool and fits the protocol's int32 ids."""
    if isinstance(value, bool):
        return False
    try:
        return 0 <= operator.index(value) <= MAX_INT32
    except TypeError:
        return False


def _sampling_message(params: Any, sampling: Mapping[str, Any], field: str = "sampling") -> pb.SamplingParams:
    """Sampling fields from `params` (anything with SamplingParams' attribute names), then keyword
    overrides; a value left None stays unset (the server's default). A value the message cannot hold raises
    ValueError naming `field`.name."""
    unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"{field}: unknown sampling fields {unknown} (known: {list(_SAMPLING_FIELDS)})")
    if isinstance(params, SamplingParams):  # what the message cannot carry is refused, not dropped
        for name in _NOT_CARRIED:
            value = getattr(params, name)
            if value != getattr(_DEFAULT_PARAMS, name) and value:
                raise ValueError(f"{field}.{name}: {value!r:.60} is not carried over gRPC ({_NOT_CARRIED[name]})")
    values = {f: getattr(params, f) for f in _SAMPLING_FIELDS if hasattr(params, f)} if params is not None else {}
    values.update((k, v) for k, v in sampling.items() if v is not None)
    sp = pb.SamplingParams()
    for name, value in values.items():
        if value is None:
            continue
        try:
            if name in ("stop_token_ids", "allowed_token_ids"):
                getattr(sp, name).extend(value)
            elif name == "stop":  # (one string, as vLLM takes it, or a list)
                sp.stop.extend([value] if isinstance(value, str) else value)
            elif name == "prompt_logprobs" and not isinstance(value, bool):
                # vLLM's count, as SamplingParams reads it: 0 or 1 is each prompt token's own logprob (on)
                if not _is_token_id(value) or value > 1:
                    raise ValueError(f"must be true, false, or a count of 0 or 1, got {value!r:.40}")
                sp.prompt_logprobs = True
            elif name == "logit_bias":
                if not isinstance(value, Mapping):
                    raise TypeError(f"must map token ids to biases, got {type(value).__name__}")
                sp.logit_bias.update(value)
            else:
                setattr(sp, name, value)
        except (TypeError, ValueError) as e:  # (out of the field's range, or of the wrong type)
            raise ValueError(f"{field}.{name}: {e}") from None
    return sp


@dataclasses.dataclass(frozen=True)
class PipelineJudge:
    """One judge of a Pipeline call: an adapter (None: the base model), the text appended to prompt +
    answer (None: the aLoRA adapter's own invocation tokens), and sampling (as `generate_request`'s
    `params` and keywords)."""

    adapter: str | None
    invocation_text: str | None = None
    params: Any = None
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PipelineStage:
    """One finished stage of a Pipeline call: the base answer (`judge` None) or judge number `judge`."""

    request_id: str
    judge: int | None
    adapter: str | None
    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: Usage
    timings: Timings
    activation_index: int | None
    logprobs: list[dict[int, float]] | None = None  # per token of token_ids, when the stage's sampling asked
    prompt_logprobs: list[dict[int, float]] | None = None  # per prompt token ({} for the first), when asked


def pipeline_request(
    prompt: Prompt, judges: Sequence[PipelineJudge], *, params: Any = None, request_id: str | None = None,
    session_ttl: float | None = None, **sampling: Any,
) -> pb.PipelineRequest:  # fmt: skip
    """The PipelineRequest that `Client.pipeline` sends."""
    msg = pb.PipelineRequest(sampling=_sampling_message(params, sampling), request_id=request_id or "")
    _put_prompt(msg, prompt)
    for k, j in enumerate(judges):
        sampling_k = _sampling_message(j.params, j.sampling, f"judges[{k}].sampling")
        judge = pb.PipelineJudge(adapter=j.adapter or "", sampling=sampling_k)
        if j.invocation_text is not None:
            judge.invocation_text = j.invocation_text
        msg.judges.append(judge)
    if session_ttl is not None:
        msg.session_ttl = session_ttl
    return msg


def _stage(msg: pb.PipelineResponse) -> PipelineStage:
    chunk = _chunk(pb.GenerateResponse(request_id=msg.request_id, completion=msg.completion), False)
    return PipelineStage(
        request_id=msg.request_id, judge=msg.judge if msg.HasField("judge") else None, adapter=msg.adapter or None,
        token_ids=list(msg.token_ids), text=msg.text, finish_reason=chunk.finish_reason, usage=chunk.usage,
        timings=chunk.timings, activation_index=chunk.activation_index,
        logprobs=_logprobs(msg.logprobs) if msg.logprobs else None, prompt_logprobs=chunk.prompt_logprobs,
    )  # fmt: skip


def _chat_messages(messages: Sequence[Mapping[str, str]], field: str = "messages") -> pb.ChatMessages:
    """A conversation's messages; one that is not {'role': str, 'content': str} raises ValueError naming it."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not all(isinstance(m.get(k), str) for k in ("role", "content")):
            raise ValueError(f"{field}[{i}]: must be {{'role': str, 'content': str}}, got {m!r:.60}")
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def _tokenize_request(text: str | Sequence[Mapping[str, str]], add_generation_prompt: bool) -> pb.TokenizeRequest:
    if isinstance(text, str):
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(messages=_chat_messages(text), add_generation_prompt=add_generation_prompt)


def _logprobs(positions) -> list[dict[int, float]]:
    return [{e.token_id: e.logprob for e in p.entries} for p in positions]


def _chunk(msg: pb.GenerateResponse, want_logprobs: bool) -> GenerateChunk:
    logprobs = _logprobs(msg.logprobs) if want_logprobs else None
    if not msg.HasField("completion"):
        return GenerateChunk(msg.request_id, list(msg.token_ids), msg.text, logprobs)
    c = msg.completion
    return GenerateChunk(
        request_id=msg.request_id,
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=logprobs,
        finished=True,
        finish_reason=_FINISH_REASONS.get(c.finish_reason),
        usage=Usage(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens),
        activation_index=c.activation_index if c.HasField("activation_index") else None,
        timings=Timings(
            c.timings.queue_seconds, c.timings.time_to_first_token_seconds, c.timings.total_seconds
        ),
        prompt_logprobs=_logprobs(c.prompt_logprobs) if len(c.prompt_logprobs) else None,
    )


class _Accumulator:
    """Folds a stream of chunks into one GenerateResult."""

    def __init__(self, prompt: Prompt, want_logprobs: bool, appended: bool = False):
        ids = not isinstance(prompt, str) and not _is_conversation(prompt)
        self.prompt_token_ids = _token_ids(prompt) if ids else None
        self.appended = appended  # (append_invocation: the server ended the prompt with an aLoRA's invocation)
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[dict[int, float]] | None = [] if want_logprobs else None
        self.last: GenerateChunk | None = None

    def add(self, chunk: GenerateChunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        self.text.append(chunk.text)
        if self.logprobs is not None and chunk.logprobs is not None:
            self.logprobs.extend(chunk.logprobs)
        self.last = chunk

    def result(self) -> GenerateResult:
        last = self.last
        if last is None or not last.finished:
            raise ServerError(grpc.StatusCode.UNKNOWN, "the stream ended without a final message")
        ids = self.prompt_token_ids
        # (the server kept the last ones: usage.prompt_tokens, or where it appended an aLoRA's invocation, those before
        # the invocation, which the prompt tokens count too)
        kept = last.usage.prompt_tokens
        if self.appended and last.activation_index is not None:
            kept = last.activation_index
        if ids is not None and kept < len(ids):
            ids = ids[len(ids) - kept :]
        return GenerateResult(
            request_id=last.request_id,
            prompt_token_ids=ids,
            token_ids=self.token_ids,
            text="".join(self.text),
            finish_reason=last.finish_reason,
            usage=last.usage,
            activation_index=last.activation_index,
            timings=last.timings,
            logprobs=self.logprobs,
            prompt_logprobs=last.prompt_logprobs,
        )


def _adapter_info(msg: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=msg.name,
        kind=msg.kind,
        invocation_tokens=list(msg.invocation_tokens) or None,
        invocation_string=msg.invocation_string if msg.HasField("invocation_string") else None,
        rank=msg.rank,
        targets=list(msg.targets),
        identity=msg.identity,
    )


def _server_info(msg: pb.ServerInfo) -> ServerInfo:
    values = {f.name: getattr(msg, f.name) for f in dataclasses.fields(ServerInfo)}
    values["eos_token_ids"] = list(msg.eos_token_ids)
    values["adapter_roots"] = list(msg.adapter_roots)
    return ServerInfo(**values)


def _server_error(err: grpc.RpcError) -> ServerError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    field = None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == FIELD_METADATA_KEY:
            field = value
    return ServerError(code, details or "", field)


# ---- channels ------------------------------------------------------------------------------------


PEM = str | bytes | os.PathLike  # a PEM file's path, or its contents as bytes


def _pem(value: PEM | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


@dataclasses.dataclass(frozen=True)
class TLS:
    """A TLS channel's settings. Each PEM value is a file path or the PEM text as bytes.

    `ca`: the root certificates that signed the server's certificate (default: gRPC's bundled roots);
    `cert` and `key`: this client's certificate chain and private key, for a server that requires
    client certificates (mutual TLS); both or neither. `server_name`: the name the server's
    certificate must carry when it is not the target's host (e.g. connecting by address).
    """

    ca: PEM | None = None
    cert: PEM | None = None
    key: PEM | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs its key and a key its certificate (cert= and key=)")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (reads the files now)."""
        return grpc.ssl_channel_credentials(_pem(self.ca), _pem(self.key), _pem(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def _channel(target: str, tls: TLS | bool | None, options: Sequence[tuple[str, Any]], aio: bool):
    grpc_ = grpc.aio if aio else grpc
    if tls is None or tls is False:
        return grpc_.insecure_channel(target, options=[*CHANNEL_OPTIONS, *options])
    tls = TLS() if tls is True else tls
    return grpc_.secure_channel(target, tls.credentials(), options=[*CHANNEL_OPTIONS, *tls.options(), *options])


def _call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    if token is None:
        return None
    if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("token must be a non-empty string of printable ASCII without spaces")
    return ((AUTHORIZATION_METADATA_KEY, BEARER_PREFIX + token),)


# ---- clients -------------------------------------------------------------------------------------


class Client:
    """Blocking client. `timeout` (seconds) is the default deadline of every call; None = no deadline.

    `tls`: None for plaintext, True for TLS trusting gRPC's bundled roots, or a `TLS` (a CA file, a
    client certificate). `token`: sent as `authorization: Bearer <token>` on every call, health checks
    included. `options`: more grpc channel arguments. `channel`: a channel of your own instead of one
    built from `target`, `tls` and `options`.
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float | None = DEFAULT_TIMEOUT, tls: TLS | bool | None = None,
        token: str | None = None, options: Sequence[tuple[str, Any]] = (), channel=None,
    ):  # fmt: skip
        self.target = target
        self.timeout = timeout
        self._metadata = _call_metadata(token)
        if channel is not None and (tls or options):
            raise ValueError("pass tls= and options= or a channel of your own, not both")
        self._channel = channel or _channel(target, tls, options, aio=False)
        self._stub = pb_grpc.JaloraStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def generate_stream(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        append_invocation: bool = False,
        params: Any = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        truncate_prompt_tokens: int | None = None,
        allowed_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool | None = None,
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = None,
        request_id: str | None = None,
        session: str | None = None,
        session_ttl: float | None = None,
        end_session: bool = False,
        timeout: float | None = None,
    ) -> Iterator[GenerateChunk]:
        """Yields one chunk per engine step; the last has `finished=True`. Closing the iterator early
        (break, or an exception in the loop body) cancels the call, and the server frees the request.
        `prompt`: text, token ids or a conversation (see `generate_request`). `session="id"` keeps this
        request's KV blocks for the session's next requests (e.g. the judges of this answer) until it
        has been idle for `session_ttl` seconds, `end_session(id)` is called, or a request with
        `end_session=True` finishes."""
        request = generate_request(
            prompt, adapter, params=params, request_id=request_id, append_invocation=append_invocation,
            session=session, session_ttl=session_ttl, end_session=end_session, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, logit_bias=logit_bias,
            min_tokens=min_tokens, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, truncate_prompt_tokens=truncate_prompt_tokens,
            allowed_token_ids=allowed_token_ids, stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=include_stop_str_in_output, skip_special_tokens=skip_special_tokens,
        )  # fmt: skip
        want_logprobs = request.sampling.HasField("logprobs")
        call = self._stub.Generate(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for msg in call:
                yield _chunk(msg, want_logprobs)
        except grpc.RpcError as err:
            raise _server_error(err) from None
        finally:
            call.cancel()  # no-op once the call has finished

    def generate(self, prompt: Prompt, adapter: str | None = None, **kwargs: Any) -> GenerateResult:
        """The whole generation (same arguments as `generate_stream`)."""
        acc = _Accumulator(prompt, kwargs.get("logprobs") is not None or _has_logprobs(kwargs.get("params")),
                           bool(kwargs.get("append_invocation")))
        for chunk in self.generate_stream(prompt, adapter, **kwargs):
            acc.add(chunk)
        return acc.result()

    def chat_stream(
        self, messages: Sequence[Mapping[str, str]], adapter: str | None = None, *, with_invocation: bool = True,
        **kwargs: Any,
    ) -> Iterator[GenerateChunk]:  # fmt: skip
        """`generate_stream` for a conversation, rendered with the model's chat template. For an aLoRA
        adapter, with `with_invocation`, it ends with the adapter's invocation instead of the template's
        generation prompt (the invocation is the turn the adapter answers in)."""
        return self.generate_stream(list(messages), adapter, append_invocation=with_invocation, **kwargs)

    def chat(
        self, messages: Sequence[Mapping[str, str]], adapter: str | None = None, *, with_invocation: bool = True,
        **kwargs: Any,
    ) -> GenerateResult:  # fmt: skip
        """The whole answer to a conversation (see `chat_stream`)."""
        return self.generate(list(messages), adapter, append_invocation=with_invocation, **kwargs)

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise _server_error(err) from None

    def with_invocation(
        self, prompt: str | Sequence[int], adapter: str | AdapterInfo, *, timeout: float | None = None
    ) -> str | list[int]:
        """Like `with_invocation`, but a text prompt whose adapter has no invocation string is
        tokenized by the server and returned as token ids with the invocation tokens appended."""
        info = adapter if isinstance(adapter, AdapterInfo) else self.adapter(adapter, timeout=timeout)
        if isinstance(prompt, str) and info.invocation_string is None:
            prompt = self.tokenize(prompt, timeout=timeout)
        return with_invocation(prompt, info)

    def end_session(self, session: str, *, timeout: float | None = None) -> None:
        """Ends a live pipeline session: its KV blocks become evictable (ServerError NOT_FOUND if not live)."""
        self._unary(self._stub.EndSession, pb.EndSessionRequest(session=session), timeout)

    def pipeline(
        self, prompt: Prompt, judges: Sequence[PipelineJudge], *, params: Any = None, request_id: str | None = None,
        session_ttl: float | None = None, timeout: float | None = None, **sampling: Any,
    ) -> Iterator[PipelineStage]:  # fmt: skip
        """The base answers `prompt` (`params` / sampling keywords), then every judge reads prompt + answer +
        its invocation, in parallel, reusing the base's KV blocks (the server holds a session for the
        call). Yields the base's stage first, then each judge's as it finishes; closing the iterator
        early cancels the call."""
        request = pipeline_request(prompt, judges, params=params, request_id=request_id, session_ttl=session_ttl,
                                   **sampling)  # fmt: skip
        call = self._stub.Pipeline(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for msg in call:
                yield _stage(msg)
        except grpc.RpcError as err:
            raise _server_error(err) from None
        finally:
            call.cancel()

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        msg = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [_adapter_info(a) for a in msg.adapters]

    def adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """The loaded adapter called `name` (ServerError NOT_FOUND if none)."""
        for info in self.list_adapters(timeout=timeout):
            if info.name == name:
                return info
        raise ServerError(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not loaded", "adapter")

    def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        """Loads the PEFT directory `path` (absolute, or relative to one of the server's adapter roots)."""
        return _adapter_info(self._unary(self._stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), timeout))

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self._unary(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), timeout)

    def tokenize(
        self, text: str | Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
        timeout: float | None = None,
    ) -> list[int]:  # fmt: skip
        """Token ids of a text, or of a conversation in the model's chat template (ending with its
        generation prompt unless `add_generation_prompt=False`)."""
        request = _tokenize_request(text, add_generation_prompt)
        return list(self._unary(self._stub.Tokenize, request, timeout).token_ids)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return _server_info(self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name, e.g. "SERVING"."""
        msg = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Blocks until the server answers SERVING (e.g. right after `jalora serve &`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                    return
            except ServerError:
                pass
            if time.monotonic() >= deadline:
                raise ServerError(grpc.StatusCode.UNAVAILABLE, f"no SERVING server at {self.target} after {timeout}s")
            time.sleep(0.2)


class AsyncClient:
    """asyncio client (grpc.aio); same methods as Client, as coroutines / async iterators."""

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float | None = DEFAULT_TIMEOUT, tls: TLS | bool | None = None,
        token: str | None = None, options: Sequence[tuple[str, Any]] = (), channel=None,
    ):  # fmt: skip
        self.target = target
        self.timeout = timeout
        self._metadata = _call_metadata(token)
        if channel is not None and (tls or options):
            raise ValueError("pass tls= and options= or a channel of your own, not both")
        self._channel = channel or _channel(target, tls, options, aio=True)
        self._stub = pb_grpc.JaloraStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def generate_stream(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        append_invocation: bool = False,
        params: Any = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        truncate_prompt_tokens: int | None = None,
        allowed_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool | None = None,
        include_stop_str_in_output: bool | None = None,
        skip_special_tokens: bool | None = None,
        request_id: str | None = None,
        session: str | None = None,
        session_ttl: float | None = None,
        end_session: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        """Async-iterates chunks; leaving the loop early (or cancelling the task) cancels the call."""
        request = generate_request(
            prompt, adapter, params=params, request_id=request_id, append_invocation=append_invocation,
            session=session, session_ttl=session_ttl, end_session=end_session, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, logit_bias=logit_bias,
            min_tokens=min_tokens, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, truncate_prompt_tokens=truncate_prompt_tokens,
            allowed_token_ids=allowed_token_ids, stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=include_stop_str_in_output, skip_special_tokens=skip_special_tokens,
        )  # fmt: skip
        want_logprobs = request.sampling.HasField("logprobs")
        call = self._stub.Generate(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for msg in call:
                yield _chunk(msg, want_logprobs)
        except grpc.RpcError as err:
            raise _server_error(err) from None
        finally:
            call.cancel()

    async def generate(self, prompt: Prompt, adapter: str | None = None, **kwargs: Any) -> GenerateResult:
        acc = _Accumulator(prompt, kwargs.get("logprobs") is not None or _has_logprobs(kwargs.get("params")),
                           bool(kwargs.get("append_invocation")))
        stream = self.generate_stream(prompt, adapter, **kwargs)
        try:
            async for chunk in stream:
                acc.add(chunk)
        finally:
            await stream.aclose()
        return acc.result()

    def chat_stream(
        self, messages: Sequence[Mapping[str, str]], adapter: str | None = None, *, with_invocation: bool = True,
        **kwargs: Any,
    ) -> AsyncIterator[GenerateChunk]:  # fmt: skip
        """See Client.chat_stream."""
        return self.generate_stream(list(messages), adapter, append_invocation=with_invocation, **kwargs)

    async def chat(
        self, messages: Sequence[Mapping[str, str]], adapter: str | None = None, *, with_invocation: bool = True,
        **kwargs: Any,
    ) -> GenerateResult:  # fmt: skip
        """See Client.chat."""
        return await self.generate(list(messages), adapter, append_invocation=with_invocation, **kwargs)

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise _server_error(err) from None

    async def with_invocation(
        self, prompt: str | Sequence[int], adapter: str | AdapterInfo, *, timeout: float | None = None
    ) -> str | list[int]:
        """See Client.with_invocation."""
        info = adapter if isinstance(adapter, AdapterInfo) else await self.adapter(adapter, timeout=timeout)
        if isinstance(prompt, str) and info.invocation_string is None:
            prompt = await self.tokenize(prompt, timeout=timeout)
        return with_invocation(prompt, info)

    async def end_session(self, session: str, *, timeout: float | None = None) -> None:
        """See Client.end_session."""
        await self._unary(self._stub.EndSession, pb.EndSessionRequest(session=session), timeout)

    async def pipeline(
        self, prompt: Prompt, judges: Sequence[PipelineJudge], *, params: Any = None, request_id: str | None = None,
        session_ttl: float | None = None, timeout: float | None = None, **sampling: Any,
    ) -> AsyncIterator[PipelineStage]:  # fmt: skip
        """See Client.pipeline."""
        request = pipeline_request(prompt, judges, params=params, request_id=request_id, session_ttl=session_ttl,
                                   **sampling)  # fmt: skip
        call = self._stub.Pipeline(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for msg in call:
                yield _stage(msg)
        except grpc.RpcError as err:
            raise _server_error(err) from None
        finally:
            call.cancel()

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        msg = await self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [_adapter_info(a) for a in msg.adapters]

    async def adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        for info in await self.list_adapters(timeout=timeout):
            if info.name == name:
                return info
        raise ServerError(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is not loaded", "adapter")

    async def load_adapter(self, name: str, path: str, *, timeout: float | None = None) -> AdapterInfo:
        request = pb.LoadAdapterRequest(name=name, path=path)
        return _adapter_info(await self._unary(self._stub.LoadAdapter, request, timeout))

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        await self._unary(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), timeout)

    async def tokenize(
        self, text: str | Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
        timeout: float | None = None,
    ) -> list[int]:  # fmt: skip
        """See Client.tokenize."""
        msg = await self._unary(self._stub.Tokenize, _tokenize_request(text, add_generation_prompt), timeout)
        return list(msg.token_ids)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return _server_info(await self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        msg = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)


def _has_logprobs(params: Any) -> bool:
    return params is not None and getattr(params, "logprobs", None) is not None
