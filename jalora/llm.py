"""The offline API, in vLLM's vocabulary: LLM(model, **config).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from jalora.adapters.peft import AdapterInfo
from jalora.config import EngineConfig
from jalora.engine.chat import prompt_with_invocation
from jalora.engine.llm_engine import LLMEngine
from jalora.errors import InvalidRequestError
from jalora.outputs import OutputAccumulator, RequestOutput
from jalora.sampling_params import SamplingParams

Prompt = str | Sequence[int] | dict


class LLM:
    """Offline generation over an LLMEngine; `llm.engine` is the incremental interface.

    `LLM("path/to/model", max_num_seqs=8)` takes EngineConfig's fields as keywords; `LLM(config)` takes
    a whole EngineConfig. `clock` (monotonic seconds) times pipeline sessions' TTLs (tests pass their own)."""

    def __init__(self, model: str | EngineConfig, *, clock=None, **config):
        if isinstance(model, EngineConfig):
            self.config = model.replace(**config) if config else model
        else:
            self.config = EngineConfig(model=model, **config)
        self.engine = LLMEngine(self.config) if clock is None else LLMEngine(self.config, clock=clock)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | None | list[str | None] = None,
        *,
        session: str | None = None,
        session_ttl: float | None = None,
        end_session: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion (batched together); outputs in prompt order. Without sampling
        parameters a request takes the model's defaults (`engine.default_sampling_params()`).

        `session="id"` keeps the blocks these requests computed (prompt and output) from eviction for the
        session's next requests, e.g. the judges of this answer, until the session has been idle for
        `session_ttl` seconds, `end_session(id)` is called, or a request with `end_session=True` finishes.

        A prompt whose parameters ask for `n` > 1 completions runs n requests (`params.child(i)`: with a seed,
        completion i draws with seed + i, as vLLM's); its RequestOutput's `outputs` holds the n completions and
        its flat fields are the first's."""
        prompts = _prompts(prompts)
        n = len(prompts)
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        adapters = adapter if isinstance(adapter, list) else [adapter] * n
        for name, values in (("sampling_params", params), ("adapter", adapters)):
            if len(values) != n:
                raise InvalidRequestError(name, f"a list must have one entry per prompt: {len(values)} for {n}")
        opened = session is not None and not self.engine.is_session_live(session)
        if self.engine.has_unfinished_requests():  # their deltas would be consumed here and lost
            raise RuntimeError(
                "LLM.generate runs the engine to completion and needs it to itself: finish the requests "
                "added through llm.engine first (step until has_unfinished_requests() is False)"
            )
        ids = []  # per prompt, the ids of its completions' requests
        running: dict[str, OutputAccumulator] = {}
        try:
            for prompt, p, a in zip(prompts, params, adapters):
                if not isinstance(p, SamplingParams):
                    raise InvalidRequestError("sampling_params", "must be a SamplingParams")
                rid = f"llm-{next(self._ids)}"
                ids.append([rid] if p.n == 1 else [f"{c}_{rid}" for c in range(p.n)])
                for c, child in enumerate(ids[-1]):
                    self.engine.add_request(
                        child, prompt, p if p.n == 1 else p.child(c), a, session=session, session_ttl=session_ttl,
                        end_session=end_session,
                    )  # fmt: skip
                    text = prompt if isinstance(prompt, str) else None
                    running[child] = OutputAccumulator(child, text, p.logprobs is not None, self.engine.token_texts)
        except Exception:
            self._abort(running)
            if opened and self.engine.is_session_live(session):  # opened by this call's requests: end it too
                self.engine.end_session(session)
            raise
        final: dict[str, RequestOutput] = {}
        try:
            while running:
                for delta in self.engine.step():
                    acc = running[delta.request_id]
                    acc.add(delta)
                    if delta.is_final:
                        final[delta.request_id] = running.pop(delta.request_id).output()
            while self.engine.has_unfinished_requests():  # async: a step queued behind the last token
                self.engine.step()
        except BaseException:  # an error or Ctrl-C mid-run: end this call's requests, free their blocks
            self._abort(running)
            raise
        return [_one_output([final[rid] for rid in children]) for children in ids]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | None | list[str | None] = None,
        with_invocation: bool = True,
        **session,
    ) -> list[RequestOutput]:
        """`generate` for conversations ({'role', 'content'} messages; one conversation or a list),
        rendered with the model's chat template.

        A conversation for the base model or a plain LoRA ends with the template's generation prompt
        (the assistant's turn begins). For an aLoRA adapter, with `with_invocation`, it ends with the
        adapter's invocation tokens instead: the invocation is the turn the adapter answers in (PEFT
        advises a role prefix of the chat template as an aLoRA's invocation). Without it the
        conversation must contain the invocation itself. `session`, `session_ttl`, `end_session`: as
        for `generate`."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(messages)
        if len(adapters) != len(messages):
            raise InvalidRequestError("adapter", f"a list must have one entry per conversation: {len(adapters)} "
                                      f"for {len(messages)}")  # fmt: skip
        prompts = [
            prompt_with_invocation(self.engine, None, conversation, name if with_invocation else None)
            for conversation, name in zip(messages, adapters)
        ]
        return self.generate(prompts, sampling_params, adapters, **session)

    def end_session(self, session: str) -> None:
        """Ends a live pipeline session: its blocks become evictable (SessionNotFoundError if not live)."""
        self.engine.end_session(session)

    def _abort(self, running: dict[str, OutputAccumulator]) -> None:
        for rid in running:
            self.engine.abort_request(rid)
        # Hands out the abort deltas, and lets what is still on its way land (a step in flight, copies back
        # from the host tier into blocks of the aborted requests): a few steps, each bounded.
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.list_adapters()


def _prompts(prompts) -> list:
    """`generate`'s prompts as a list of texts and token ids (as the engine takes them: a list, a tuple or a 1-D
    numpy array of integers). One prompt or a list of them, vLLM's {"prompt": text} / {"prompt_token_ids": ids}
    read as their text or ids."""
    if isinstance(prompts, str | dict) or _is_ids(prompts):
        prompts = [prompts]
    elif not isinstance(prompts, list | tuple):
        raise InvalidRequestError("prompt", "must be a string, token ids, or a list of them")
    out = []
    for prompt in prompts:
        if isinstance(prompt, dict):
            keys = set(prompt)
            if keys == {"prompt"} and isinstance(prompt["prompt"], str):
                prompt = prompt["prompt"]
            elif keys == {"prompt_token_ids"} and _is_ids(prompt["prompt_token_ids"]):
                prompt = prompt["prompt_token_ids"]
            else:
                raise InvalidRequestError("prompt", f"a dict prompt holds 'prompt' (a text) or 'prompt_token_ids' "
                                          f"(token ids) and nothing else, got keys {sorted(keys)}")  # fmt: skip
        out.append(prompt)
    return out


def _is_ids(value) -> bool:
    """Token ids, as one prompt: a 1-D numpy integer array, or a non-empty list or tuple whose first item is an integer
    (the engine checks every id)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "iu"
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], int | np.integer) \
        and not isinstance(value[0], bool)  # fmt: skip


def _one_output(outputs: list[RequestOutput]) -> RequestOutput:
    """A prompt's RequestOutput from its completions' (one, or n): the first's, holding all n in `outputs`."""
    if len(outputs) == 1:
        return outputs[0]
    completions = [dataclasses.replace(o.outputs[0], index=c) for c, o in enumerate(outputs)]
    return dataclasses.replace(outputs[0], completions=completions)
