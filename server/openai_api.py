"""Where OpenAI's HTTP API and engine values meet (the HTTP front's server/convert.py).

Requests in: `parse_completion` and `parse_chat` turn a JSON body into a `Generation` (prompt or
conversation, sampling parameters, the model name, streaming options), raising InvalidRequestError
named by the OpenAI parameter at fault; the bounds themselves are server/frontend.py's, shared with
gRPC. Results out: the parts server/http.py builds its responses and streamed chunks from: `usage` in OpenAI's
shape (`usage.prompt_tokens_details.cached_tokens`), `extension`, jalora's own fields under `jalora` (the
aLoRA activation index, timings from the server's receipt of the call, each choice's `token_ids`), and
`completion_logprobs` / `chat_logprobs`.
Pure Python: no JAX, no numpy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from jalora.config import is_number
from jalora.errors import InvalidRequestError
from jalora.outputs import FinishedRequest
from jalora.sampling_params import SamplingParams
from server.frontend import check_messages, check_stop_token_ids, check_text

# Parameters of OpenAI's API, and of vLLM's extensions of it, that jalora does not implement: a request that sets
# one to anything but a neutral value (a value that asks for nothing; JSON null always is one) is refused naming
# it, rather than silently served as if it had not been set.
_UNSUPPORTED: dict[str, tuple] = {
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none", "auto"),  # with no tools, both ask for no call
    "functions": ([],),
    "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False),  # with no tools there is nothing to call in parallel
    "audio": ({},),
    "prediction": ({},),
    # vLLM's sampling extensions
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "spaces_between_special_tokens": (True,),
    "bad_words": ([],),
    "logits_processors": ([],),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "prompt_logprobs": (),  # (completions: echo with logprobs gives the prompt's)
    # vLLM's chat extensions
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
}


@dataclasses.dataclass
class Generation:
    """One request of /v1/completions or /v1/chat/completions, checked and converted."""

    model: str
    prompt: str | list[int] | None  # completions
    messages: list[dict[str, str]] | None  # chat
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool  # completions: the prompt's text before the completion's
    append_invocation: bool  # jalora's extension: the server appends the aLoRA adapter's invocation
    # jalora's extension: a pipeline session keeps this request's KV blocks for its next requests
    session: str | None = None
    session_ttl: float | None = None
    end_session: bool = False
    # The body's name of the max_tokens it set (None when it left it to the engine's default): a prompt that
    # leaves less room than that within max_model_len is refused naming it, as OpenAI's API does.
    max_tokens_field: str | None = None


def _value(body: dict, name: str) -> Any:
    """`body[name]`, with JSON null read as absent (clients send null for an unset field)."""
    return body.get(name)


def _bool(body: dict, name: str, default: bool = False, field: str | None = None) -> bool:
    """`body[name]` as a JSON boolean (absent: `default`); anything else is refused naming `field` (default: the
    name itself)."""
    value = _value(body, name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(field or name, f"must be true or false, got {value!r:.40}")
    return value


def _session(body: dict) -> dict:
    """jalora's pipeline-session extension fields (`session`, `session_ttl`, `end_session`), their types
    checked; server/frontend.py checks the rest, as for gRPC."""
    session, ttl = _value(body, "session"), _value(body, "session_ttl")
    if session is not None and not isinstance(session, str):
        raise InvalidRequestError("session", f"must be a string, got {session!r:.40}")
    if ttl is not None and not is_number(ttl):
        raise InvalidRequestError("session_ttl", f"must be a finite number of seconds, got {ttl!r:.40}")
    return {"session": session, "session_ttl": None if ttl is None else float(ttl),
            "end_session": _bool(body, "end_session")}  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_unsupported(body: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = _value(body, name)
        # (compared with their types: true is not 1, nor 0.0 False)
        if value is None or any(type(value) is type(n) and value == n for n in neutral) or (
                is_number(value) and any(is_number(n) and value == n for n in neutral)):  # fmt: skip
            continue
        raise InvalidRequestError(name, "is not supported by this server")
    response_format = _value(body, "response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidRequestError("response_format", "only {'type': 'text'} is supported")


def _model(body: dict) -> str:
    model = _value(body, "model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", "must name the served model or a loaded adapter (GET /v1/models)")
    return model


def _sampling(body: dict, defaults: SamplingParams, *, chat: bool) -> SamplingParams:
    """SamplingParams from the body's OpenAI parameters (logit_bias and the penalties too, and vLLM's extensions top_k,
    min_p, min_tokens, repetition_penalty, truncate_prompt_tokens, allowed_token_ids, ignore_eos,
    include_stop_str_in_output, skip_special_tokens, stop_token_ids); what the body leaves out keeps the engine's
    defaults, as over gRPC."""
    kwargs: dict[str, Any] = dataclasses.asdict(defaults)
    max_tokens = _max_tokens_field(body, chat=chat) or "max_tokens"
    renamed = {"max_tokens": max_tokens}
    for name in ("n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "truncate_prompt_tokens"):
        value = _value(body, renamed.get(name, name))
        if value is not None:
            kwargs[name] = value
    kwargs["ignore_eos"] = _bool(body, "ignore_eos", defaults.ignore_eos)
    kwargs["include_stop_str_in_output"] = _bool(body, "include_stop_str_in_output", False)
    kwargs["skip_special_tokens"] = _bool(body, "skip_special_tokens", True)
    stop = _value(body, "stop")
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
    bias = _value(body, "logit_bias")
    if bias is not None:  # OpenAI's keys are token ids as strings
        if not isinstance(bias, dict) or not all(isinstance(t, str) and t.isdecimal() for t in bias):
            raise InvalidRequestError("logit_bias", "must map token ids (as strings) to biases")
        kwargs["logit_bias"] = {int(t): b for t, b in bias.items()}
    allowed = _value(body, "allowed_token_ids")
    if allowed is not None:
        if not isinstance(allowed, list):
            raise InvalidRequestError("allowed_token_ids", "must be a list of token ids")
        kwargs["allowed_token_ids"] = allowed
    ids = _value(body, "stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise InvalidRequestError("stop_token_ids", "must be a list of token ids")
        check_stop_token_ids(ids, "stop_token_ids")
        kwargs["stop_token_ids"] = ids
    if chat:
        if _bool(body, "logprobs"):
            top = _value(body, "top_logprobs")
            kwargs["logprobs"] = 0 if top is None else top
        elif _value(body, "top_logprobs") is not None:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    else:
        logprobs = _value(body, "logprobs")
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as exc:
        field = {"max_tokens": max_tokens, "logprobs": "top_logprobs" if chat else "logprobs"}.get(exc.field, exc.field)
        raise InvalidRequestError(field, exc.message) from None


def _max_tokens_field(body: dict, *, chat: bool) -> str | None:
    """The name under which the body set its max_tokens (chat: max_completion_tokens first), None if it did not."""
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    return next((name for name in names if _value(body, name) is not None), None)


def _stream_options(body: dict, stream: bool) -> bool:
    options = _value(body, "stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequestError("stream_options", "needs stream: true")
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options", "must be an object")
    return _bool(options, "include_usage", field="stream_options.include_usage")


def parse_completion(body: dict, defaults: SamplingParams) -> tuple[Generation, Sequence[int] | None]:
    """A /v1/completions body; also the prompt's token ids if it came as ids (the caller checks their
    count against max_model_len), else None."""
    _refuse_unsupported(body)
    model = _model(body)
    prompt = _value(body, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    ids = None
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        check_text(prompt, "prompt")
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise InvalidRequestError("prompt", f"holds {len(prompt)} prompts; send one per request")
    else:
        raise InvalidRequestError("prompt", "must be a string or a list of token ids")
    stream = _bool(body, "stream")
    params = _sampling(body, defaults, chat=False)
    echo = _bool(body, "echo")
    if echo and params.logprobs is not None:  # the prompt's tokens get logprobs too
        params = dataclasses.replace(params, prompt_logprobs=True)
    return (
        Generation(
            model=model,
            prompt=prompt,
            messages=None,
            params=params,
            stream=stream,
            include_usage=_stream_options(body, stream),
            echo=echo,
            append_invocation=_bool(body, "append_invocation"),
            **_session(body),
            max_tokens_field=_max_tokens_field(body, chat=False),
        ),
        ids,
    )


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(f"messages[{i}].content[{j}]", "must be a text part {'type': 'text', "
                                          "'text': str}; this server reads text only")  # fmt: skip
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins a message's text parts
    raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: dict, defaults: SamplingParams) -> Generation:
    """A /v1/chat/completions body."""
    _refuse_unsupported(body)
    if _bool(body, "echo"):  # (vLLM's chat extension: the last message's text before the answer's)
        raise InvalidRequestError("echo", "is not supported by this server's chat completions")
    model = _model(body)
    messages = _value(body, "messages")
    if not isinstance(messages, list):
        raise InvalidRequestError("messages", "must be a list of {'role', 'content'} messages")
    conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role", "must be a non-empty string")
        conversation.append({"role": role, "content": _content(m, i)})
    check_messages([(m["role"], m["content"]) for m in conversation], "messages")
    stream = _bool(body, "stream")
    return Generation(
        model=model,
        prompt=None,
        messages=conversation,
        params=_sampling(body, defaults, chat=True),
        stream=stream,
        include_usage=_stream_options(body, stream),
        echo=False,
        append_invocation=_bool(body, "append_invocation"),
        **_session(body),
        max_tokens_field=_max_tokens_field(body, chat=True),
    )


# ---- responses ------------------------------------------------------------------------------------


def usage(finished: FinishedRequest | list[FinishedRequest]) -> dict:
    """OpenAI's usage of a request, or of the n completions of one prompt (its tokens and cached tokens counted
    once, the completions' tokens summed)."""
    finisheds = finished if isinstance(finished, list) else [finished]
    finished = finisheds[0]
    prompt, completion = len(finished.prompt_token_ids), sum(f.num_output_tokens for f in finisheds)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finished.num_cached_tokens},
    }


def extension(finished: FinishedRequest, received: float, now: float | None = None) -> dict:
    """jalora's fields: the aLoRA activation index (null for the base model, 0 for a plain LoRA) and the
    timings in seconds since the server received the call (an event that never happened counts as now)."""
    now = time.monotonic() if now is None else now
    m = finished.metrics

    def since(t: float | None) -> float:
        return max(0.0, (t if t is not None else now) - received)

    return {
        "activation_index": finished.activation_start,
        "adapter": finished.adapter,
        "timings": {
            "queue_seconds": since(m.first_scheduled_time),
            "time_to_first_token_seconds": since(m.first_token_time),
            "total_seconds": since(m.finished_time),
        },
    }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf


def completion_logprobs(
    token_ids: Sequence[int],
    texts: Sequence[str],
    logprobs: Sequence[dict[int, float]],
    top_texts: Sequence[dict[int, str]],
    offset: int,
    starts: dict[int, int] | None = None,
) -> dict:
    """The legacy completions `logprobs` object: per token its text, logprob, top alternatives and
    character offset (from `offset`, the characters before the first of these tokens). `starts`: where the
    text of later pieces begins, by the position of their first token (a whole request's deltas, so that its
    offsets are those of its streamed deltas: a token's own text is not its piece of the text)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, (token, text, lps, names) in enumerate(zip(token_ids, texts, logprobs, top_texts)):
        offset = (starts or {}).get(i, offset)
        out["tokens"].append(text)
        lp = lps.get(token)
        out["token_logprobs"].append(None if lp is None else _logprob(lp))
        out["top_logprobs"].append({names[t]: _logprob(v) for t, v in lps.items()} if lps else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(
    token_ids: Sequence[int], texts: Sequence[str], logprobs: Sequence[dict[int, float]], top_texts, top: int,
    raw: dict[int, bytes],
) -> dict:
    """The chat `logprobs` object: `content`, one entry per token with its `top_logprobs`; `raw`: each token's
    own bytes (Engine.token_bytes: a character's tokens add up to its UTF-8, as OpenAI's `bytes` are meant to)."""

    def entry(token: int, text: str, lp: float) -> dict:
        return {"token": text, "logprob": _logprob(lp), "bytes": list(raw[token])}

    content = []
    for token, text, lps, names in zip(token_ids, texts, logprobs, top_texts):
        item = entry(token, text, lps.get(token, -9999.0))
        ranked = sorted(lps.items(), key=lambda kv: kv[1], reverse=True)[:top]
        item["top_logprobs"] = [entry(t, names[t], v) for t, v in ranked]
        content.append(item)
    return {"content": content}
