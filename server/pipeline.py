"""The Pipeline call: the base answers, then N judges read prompt + answer + their invocation, in parallel.

Everything is checked before the base starts (each judge's adapter is loaded, an aLoRA judge without
`invocation_text` has invocation tokens, and the call's session can hold what its stages may come to retain:
`_check_share`), so a bad judge costs no generation. The call opens a pipeline session of its own
(jalora/engine/sessions.py; none where the engine's sessions are off): the base's blocks are retained until the
judges look them up, whatever else the engine runs meanwhile. Each judge's prompt is the base's prompt tokens plus
its answer tokens plus the invocation (the adapter's tokens, or `invocation_text` tokenized without
special tokens), so it extends the base's sequence exactly; when the prompt is a conversation, the
answer's turn is closed first as the chat template closes a turn (its end token, unless the answer ends
with it, and what the template puts after it), so the invocation opens a turn of its own. Results come
back as each stage finishes: the base first, then the judges in the order they finish. However the call
ends (done, failed, cancelled), the judges still running are aborted and the session is ended. Imports
neither JAX nor numpy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence

from jalora.api.limits import MAX_PIPELINE_JUDGES
from jalora.engine.chat import close_turn, prompt_with_invocation, turn_end
from jalora.errors import AdapterNotFoundError, InvalidRequestError, SessionNotFoundError
from jalora.outputs import FinishedRequest
from jalora.sampling_params import SamplingParams
from server.engine_worker import RequestStream
from server.errors import ServerShuttingDownError
from server.frontend import Frontend, check_adapter_name, check_text


@dataclasses.dataclass(frozen=True)
class Judge:
    adapter: str | None  # None: the base model
    invocation_text: str | None  # None: the aLoRA adapter's own invocation tokens
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class Stage:
    """One finished stage: the base answer (judge None) or judge number `judge`."""

    judge: int | None
    adapter: str | None
    token_ids: list[int]
    text: str
    finished: FinishedRequest
    logprobs: list[dict[int, float]] | None  # per generated token, when the stage's sampling asked


def check_judges(judges: Sequence[Judge]) -> None:
    """What needs no engine: the count, the names, the invocation texts' sizes, no truncation of a judge's prompt."""
    if not judges:
        raise InvalidRequestError("judges", "must hold at least one judge")
    if len(judges) > MAX_PIPELINE_JUDGES:
        raise InvalidRequestError("judges", f"has {len(judges)} judges; at most {MAX_PIPELINE_JUDGES}")
    for k, j in enumerate(judges):
        if j.adapter is not None:
            check_adapter_name(j.adapter, f"judges[{k}].adapter")
        if j.invocation_text is not None:
            if not j.invocation_text:
                raise InvalidRequestError(f"judges[{k}].invocation_text", "must not be empty (leave it unset)")
            check_text(j.invocation_text, f"judges[{k}].invocation_text")
        if j.params.truncate_prompt_tokens is not None:  # (a cut judge prompt would not extend the base's sequence)
            raise InvalidRequestError(f"judges[{k}].sampling.truncate_prompt_tokens", "a judge reads the base's prompt "
                                      "and answer whole: truncate the base's prompt (sampling.truncate_prompt_tokens)")


async def _collect(stream: RequestStream) -> tuple[list[int], str, FinishedRequest, list | None]:
    ids: list[int] = []
    text: list[str] = []
    logprobs: list[dict[int, float]] | None = None
    while True:
        delta = await stream.next()
        ids.extend(delta.token_ids)
        text.append(delta.text)
        if delta.logprobs is not None:
            logprobs = logprobs if logprobs is not None else []
            logprobs.extend(delta.logprobs)
        if delta.finished is not None:
            return ids, "".join(text), delta.finished, logprobs


async def run_pipeline(
    front: Frontend,
    prompt: str | Sequence[int] | None,
    messages: list[dict[str, str]] | None,
    params: SamplingParams,
    judges: Sequence[Judge],
    session_ttl: float | None,
) -> AsyncIterator[Stage]:
    """Yields the base's Stage, then each judge's as it finishes (see the module's docstring)."""
    check_judges(judges)
    info = await front.worker.call(lambda engine: engine.info())
    session = None  # (sessions off: the judges find the base's blocks in the prefix cache, if they are still there)
    if info.session_max_blocks:
        session = await front.session_fields(f"pipeline-{uuid.uuid4().hex}", session_ttl, False,
                                             ("session", "session_ttl", "end_session"))  # fmt: skip
    loaded = {a.name: a for a in await front.list_adapters()}
    for k, j in enumerate(judges):
        if j.adapter is not None and j.adapter not in loaded:
            raise AdapterNotFoundError(j.adapter, f"judges[{k}].adapter")
        if j.invocation_text is None and (j.adapter is None or not loaded[j.adapter].invocation_tokens):
            kind = "the base model" if j.adapter is None else f"plain LoRA adapter {j.adapter!r}"
            raise InvalidRequestError(f"judges[{k}].invocation_text", f"is required for {kind} (no invocation tokens)")
    invocations = []
    for j in judges:
        if j.invocation_text is None:
            invocations.append(list(loaded[j.adapter].invocation_tokens))
        else:
            text = j.invocation_text
            invocations.append(await front.worker.run_host(lambda e, t=text: e.tokenize(t, add_special_tokens=False)))
    turn = None if messages is None else await front.worker.run_host(lambda e: turn_end(e, messages))
    # A judge reads at least the prompt, one answer token and its invocation, and adds a token: one whose
    # invocation cannot fit is refused before the base model runs (a prompt of text counts one token here, and a
    # prompt the base's truncate_prompt_tokens cuts counts the tokens the base keeps of it).
    limit = info.max_model_len
    truncate = params.truncate_prompt_tokens
    shortest = len(prompt) if prompt is not None and not isinstance(prompt, str) else 1
    if truncate is not None:
        shortest = min(shortest, limit - 1 if truncate == -1 else truncate)
    shortest += 1
    for k, (j, inv) in enumerate(zip(judges, invocations)):
        if shortest + len(inv) >= limit:
            field = f"judges[{k}]." + ("adapter" if j.invocation_text is None else "invocation_text")
            raise InvalidRequestError(field, f"its invocation has {len(inv)} tokens: with the prompt and an answer, "
                                      f"the judge's prompt would reach max_model_len ({limit})")
    # The base's prompt tokens, up front: the share check needs their count (a conversation in its template; with
    # truncate_prompt_tokens only the last tokens, as the engine keeps them of token ids and a conversation too)
    def base_prompt(engine) -> list[int]:
        ids = prompt_with_invocation(engine, prompt, messages, None, truncate)
        return ids if truncate is None else engine.encode_prompt(ids, truncate).token_ids

    base = await front.worker.run_host(base_prompt)
    closing = 0 if turn is None else len(close_turn([], turn))  # (at most: an answer ending its turn adds less)
    if session is not None:
        # (a plain LoRA's blocks are keyed by its identity from the first: it finds none of the base's)
        reuses = [j.adapter is None or loaded[j.adapter].kind == "alora" for j in judges]
        _check_share(len(base), params, [closing + len(inv) for inv in invocations], [j.params for j in judges],
                     reuses, info)  # fmt: skip
    streams: list[RequestStream] = []
    tasks: dict[asyncio.Future, int] = {}
    try:
        streams.append(await front.start(base, None, params, None, session=session))
        try:
            ids, text, finished, logprobs = await _collect(streams[0])
        except InvalidRequestError as e:
            raise _own_field(e, "") from None
        yield Stage(None, None, ids, text, finished, logprobs)
        context = list(finished.prompt_token_ids) + ids + ([] if turn is None else close_turn(ids, turn))
        for k, (j, inv) in enumerate(zip(judges, invocations)):
            stream = front.worker.submit(uuid.uuid4().hex, context + inv, j.params, j.adapter, session)
            streams.append(stream)
            tasks[asyncio.ensure_future(_collect(stream))] = k
        while tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=tasks.__getitem__):
                k = tasks.pop(task)
                try:
                    ids, text, finished, logprobs = task.result()
                except InvalidRequestError as e:
                    raise _own_field(e, f"judges[{k}].") from None
                yield Stage(k, judges[k].adapter, ids, text, finished, logprobs)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()
        try:  # queued after the aborts: nothing of the call is left retained
            if session is not None:
                front.worker.call_nowait(lambda e: _end_quietly(e, session["session"]))
        except ServerShuttingDownError:
            pass  # the engine thread is stopping: it ends everything itself


def _check_share(
    prompt_len: int, params: SamplingParams, tails: list[int], judges: list[SamplingParams], reuses: list[bool], info
) -> None:
    """Refuses a call that the engine could refuse midway because its session may not retain what a stage could
    add (session_max_blocks), before anything runs, naming the max_tokens that tips it over (the judges are
    submitted in order, so the first whose addition could exceed it). The engine reserves each request's worst
    case when it is admitted (Sessions.check_share): the base its full blocks of prompt and max_tokens; each judge,
    once the base has finished, its full blocks less those of its prompt the session retains (`reuses[k]`: the
    blocks the base computed, its context of prompt and an answer of `a` tokens, the last of which has no KV yet,
    for a judge of the base model or an aLoRA, whose blocks before its invocation are the base's; none for a plain
    LoRA), beside those retained blocks and the judges before it. `tails`: the tokens each judge reads after the
    answer (the turn's close and its invocation). Every answer length is tried (a judge whose prompt the engine
    refuses for its length at that answer, and those after it, are not admitted there): where judges reach
    max_model_len the worst length can lie anywhere between the first and the last."""
    b, limit, share = info.block_size, info.max_model_len, info.session_max_blocks
    if (min(prompt_len + params.max_tokens, limit) - 1) // b > share:
        raise InvalidRequestError("sampling.max_tokens", _share_message(share))
    for k in range(len(tails)):
        stages = list(zip(tails[: k + 1], judges[: k + 1], reuses[: k + 1]))
        for a in _answer_lengths(prompt_len, params.max_tokens, stages, b, limit):
            context = prompt_len + a
            if any(context + tail >= limit for tail, _, _ in stages):
                continue  # (the engine refuses a judge's prompt for its length at this answer, not for the share)
            retained = (context - 1) // b
            need = retained + sum((min(context + tail + p.max_tokens, limit) - 1) // b - (retained if reuse else 0)
                                  for tail, p, reuse in stages)  # fmt: skip
            if need > share:
                raise InvalidRequestError(f"judges[{k}].sampling.max_tokens", _share_message(share))


def _answer_lengths(prompt_len: int, max_tokens: int, stages, b: int, limit: int) -> set[int]:
    """The answer lengths at which the judges' admission can first fail, of all from 1 to the longest answer. Every
    block count above is (a + constant) // b of the answer length a, so between the lengths where a judge reaches
    max_model_len or stops fitting it, `b` more answer tokens change the need by the same amount everywhere: each
    stretch is at its worst within its first or its last `b` lengths."""
    longest = max(1, min(max_tokens, limit - prompt_len))
    cuts = {1, longest + 1}
    for tail, p, _ in stages:  # (the first length at which the judge's blocks stop growing; at which it cannot fit)
        cuts |= {limit - prompt_len - tail - p.max_tokens, limit - prompt_len - tail}
    cuts = sorted(c for c in cuts if 1 <= c <= longest + 1)
    lengths = set()
    for start, end in zip(cuts, cuts[1:]):
        lengths |= {*range(start, min(start + b, end)), *range(max(start, end - b), end)}
    return lengths


def _share_message(share: int) -> str:
    return (f"the call's stages could come to retain more KV blocks in its session than a session may ({share}: "
            "session_cache_share of the cache); ask for fewer tokens")


def _own_field(e: InvalidRequestError, prefix: str) -> InvalidRequestError:
    """A stage's engine error, naming the PipelineRequest field at fault (`prefix`: "" for the base, "judges[k]."
    for a judge). The call's session is the server's own: a stage its share cannot hold is refused for its
    max_tokens (what the caller can change), not for a `session` field the request does not have. A subclass
    (a missing invocation, ...) keeps its own status code and field."""
    if type(e) is not InvalidRequestError:
        return e
    field = "sampling.max_tokens" if e.field == "session" else e.field
    return InvalidRequestError(prefix + field, e.message)


def _end_quietly(engine, session: str) -> None:
    try:
        engine.end_session(session)
    except SessionNotFoundError:
        pass  # expired, or evicted for another session's blocks
