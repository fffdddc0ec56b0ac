"""The offline API, in vLLM's vocabulary: LLM(...).generate(prompts, SamplingParams(...))."""

import itertools

from jalora.adapters.manager import AdapterInfo
from jalora.engine.llm_engine import LLMEngine
from jalora.outputs import RequestOutput
from jalora.sampling_params import SamplingParams


class LLM:
    """Offline generation over an LLMEngine; `llm.engine` is the incremental interface."""

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(model, **engine_args)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapter: str | None | list[str | None] = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion (batched together); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * n
        adapters = adapter if isinstance(adapter, list) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise ValueError("sampling_params and adapter lists must have one entry per prompt")
        ids = [f"llm-{next(self._ids)}" for _ in range(n)]
        added: set[str] = set()
        try:
            for rid, prompt, p, a in zip(ids, prompts, params, adapters):
                self.engine.add_request(rid, prompt, p, a)
                added.add(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            self.engine.step()  # drains the abort outputs
            raise
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < n:
                for out in self.engine.step():
                    if out.finished and out.request_id in added:
                        final[out.request_id] = out
        except BaseException:  # an error or Ctrl-C mid-run: end this call's requests, free their blocks
            for rid in ids:
                if rid not in final:
                    self.engine.abort_request(rid)
            self.engine.step()
            raise
        return [final[rid] for rid in ids]

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return self.engine.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.adapters.unload(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self.engine.adapters.infos()
