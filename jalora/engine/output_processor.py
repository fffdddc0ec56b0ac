"""Postprocess: a read-back token becomes a request's next token, its text and its delta.

The output processor appends each sampled token to its request, decides whether the request stops
(a stop token, a stop string in its text, or its length limit), turns the token into text incrementally, and builds the
`RequestDelta`s the engine returns. Its work per token is constant: deltas hold only what is new and
the text comes from an incremental detokenizer, never from decoding the whole output again.
"""

from __future__ import annotations

import dataclasses

from tokenizers import Tokenizer

from jalora.engine.detokenizer import IncrementalDetokenizer
from jalora.engine.request import Request
from jalora.engine.stop_strings import StopStringMatcher
from jalora.outputs import FinishedRequest, RequestDelta


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._stop_strings: dict[str, StopStringMatcher] = {}  # requests with stop strings
        # Token counters (postprocess owns them): a request's prompt counts once, with its first token.
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def add(self, req: Request) -> None:
        if self.tokenizer is not None:
            self._detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens
            )
            if req.params.stop:
                self._stop_strings[req.request_id] = StopStringMatcher(
                    req.params.stop, req.params.include_stop_str_in_output
                )

    def append(
        self, req: Request, token: int, logprobs: dict[int, float] | None, now: float,
        ranks: dict[int, int] | None = None,
    ) -> tuple[RequestDelta, str | None]:
        """Appends a sampled token to `req` (with its logprobs and their ranks, if asked for); returns its delta and
        the finish reason it causes, if any."""
        detok = self._detokenizers.get(req.request_id)
        # Nothing stops the request within its first min_tokens tokens (vLLM's rule: the draw cannot pick a stop
        # token there, and a stop string is looked for once the output is longer).
        may_stop = len(req.output_token_ids) >= req.params.min_tokens
        stop_token = may_stop and token in req.stop_ids  # its text is left out, as a stop string's is (vLLM's),
        drop = stop_token and not req.params.include_stop_str_in_output  # unless the request keeps them
        text = "" if detok is None or drop else detok.push(token)  # first: if it fails, nothing changed
        stops = self._stop_strings.get(req.request_id)
        if stops is not None:
            text = stops.push(text, match=may_stop)
        req.output_token_ids.append(token)
        req.all_token_ids.append(token)
        self.num_generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.num_prompt_tokens += len(req.prompt_token_ids)
        reason = None
        if stop_token or (stops is not None and stops.matched):
            reason = "stop"
        elif req.length_reached(self.max_model_len):
            reason = "length"
        if logprobs is None:
            return RequestDelta(req.request_id, [token], text, None), reason
        return RequestDelta(req.request_id, [token], text, [logprobs], logprob_ranks=[ranks or {}]), reason

    def finish(self, req: Request, last: RequestDelta | None = None) -> RequestDelta:
        """The final delta of an ended request (`last`, its last token's delta, if it has one): the text
        still held back and the final record."""
        detok = self._detokenizers.pop(req.request_id, None)
        tail = "" if detok is None else detok.flush()
        stops = self._stop_strings.pop(req.request_id, None)
        if stops is not None:  # a stop string may still end in the held-back text
            tail = stops.push(tail)
            tail += stops.flush()
        finished = FinishedRequest(
            finish_reason=req.finish_reason,
            prompt_token_ids=req.prompt_token_ids,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens,
            activation_start=req.activation_start,
            adapter=req.adapter_name,
            prompt_logprobs=req.prompt_logprobs,
            metrics=req.metrics,
        )
        if last is None:
            want = req.params.logprobs is not None
            return RequestDelta(req.request_id, [], tail, [] if want else None, finished, [] if want else None)
        return dataclasses.replace(last, text=last.text + tail, finished=finished)
