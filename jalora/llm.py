"""The offline API, in vLLM's vocabulary: LLM(model, **config).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

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
        lora_request=None,
        use_tqdm: bool | Callable = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion (batched together); outputs in prompt order. Without sampling
        parameters a request takes the model's defaults (`engine.default_sampling_params()`).

        `session="id"` keeps the blocks these requests computed (prompt and output) from eviction for the
        session's next requests, e.g. the judges of this answer, until the session has been idle for
        `session_ttl` seconds, `end_session(id)` is called, or a request with `end_session=True` finishes.

        A prompt whose parameters ask for `n` > 1 completions runs n requests (`params.child(i)`: with a seed,
        completion i draws with seed + i, as vLLM's); its RequestOutput's `outputs` holds the n completions and
        its flat fields are the first's.

        vLLM's spellings: `lora_request` (a `jalora.LoRARequest`, or anything with vLLM's `lora_name` and
        `lora_path`; one, or a list with one per prompt, None for the base model) in place of `adapter`, its
        directory loaded under its name the first time; `use_tqdm` (True, or a tqdm-like class) shows progress."""
        prompts = _prompts(prompts)
        n = len(prompts)
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        if len(params) != n:
            raise InvalidRequestError("sampling_params", f"a list must have one entry per prompt: {len(params)} for "
                                      f"{n}")  # fmt: skip
        adapters = self._adapter_names(adapter, lora_request, n, "prompt")
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
        bar = _progress(use_tqdm, len(running))
        try:
            while running:
                for delta in self.engine.step():
                    acc = running[delta.request_id]
                    acc.add(delta)
                    if delta.is_final:
                        final[delta.request_id] = running.pop(delta.request_id).output()
                        if bar is not None:
                            bar.update(1)
            while self.engine.has_unfinished_requests():  # async: a step queued behind the last token
                self.engine.step()
        except BaseException:  # an error or Ctrl-C mid-run: end this call's requests, free their blocks
            self._abort(running)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [_one_output([final[rid] for rid in children]) for children in ids]

    def _adapter_names(self, adapter, lora_request, n: int, per: str) -> list[str | None]:
        """One adapter name (None: the base model) per prompt, from `adapter` (a name or a list) or vLLM's
        `lora_request` (one or a list; each directory loaded under its name unless one of that name is loaded)."""
        field = "adapter" if lora_request is None else "lora_request"
        if lora_request is not None and adapter is not None:
            raise InvalidRequestError("lora_request", "give adapter names or vLLM's lora_request, not both")
        given = adapter if lora_request is None else lora_request
        names = given if isinstance(given, list) else [given] * n
        if len(names) != n:
            raise InvalidRequestError(field, f"a list must have one entry per {per}: {len(names)} for {n}")
        return names if lora_request is None else self._load_requested(names)

    def _load_requested(self, requests: list) -> list[str | None]:
        loaded = {info.name for info in self.list_adapters()}
        names = []
        for r in requests:
            if r is None:
                names.append(None)
                continue
            name, path = getattr(r, "lora_name", None), getattr(r, "lora_path", None)
            if not isinstance(name, str) or not isinstance(path, str):
                raise InvalidRequestError("lora_request", "must be a jalora.LoRARequest (lora_name, lora_int_id, "
                                          "lora_path), a list of one per prompt, or None")  # fmt: skip
            if name not in loaded:
                self.load_adapter(name, path)
                loaded.add(name)
            names.append(name)
        return names

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | None | list[str | None] = None,
        with_invocation: bool = True,
        *,
        lora_request=None,
        **session,
    ) -> list[RequestOutput]:
        """`generate` for conversations ({'role', 'content'} messages; one conversation or a list),
        rendered with the model's chat template.

        A conversation for the base model or a plain LoRA ends with the template's generation prompt
        (the assistant's turn begins). For an aLoRA adapter, with `with_invocation`, it ends with the
        adapter's invocation tokens instead: the invocation is the turn the adapter answers in (PEFT
        advises a role prefix of the chat template as an aLoRA's invocation). Without it the
        conversation must contain the invocation itself. `lora_request` (vLLM's, in place of `adapter`),
        `session`, `session_ttl`, `end_session`: as for `generate`."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        adapters = self._adapter_names(adapter, lora_request, len(messages), "conversation")
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


def _progress(use_tqdm, total: int):
    """A progress bar over `total` requests where `use_tqdm` asks for one (True: tqdm's; a class: that one)."""
    if not use_tqdm:
        return None
    if callable(use_tqdm):
        return use_tqdm(total=total, desc="Processed prompts")
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts")


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
