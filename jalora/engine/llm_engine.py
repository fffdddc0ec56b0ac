"""LLMEngine: the incremental interface (add_request / step / abort) that LLM and the server drive.

Not thread-safe: one thread owns an engine (the server runs it in its engine thread).
"""

import dataclasses
import os
import random
import time

import jax
import numpy as np
from tokenizers import Tokenizer

from jalora.adapters.manager import AdapterManager
from jalora.engine.block_manager import BlockManager
from jalora.engine.model_runner import ModelRunner
from jalora.engine.request import Request, Status
from jalora.engine.scheduler import Scheduler
from jalora.errors import InvalidRequestError
from jalora.model.checkpoint import load_model, resolve_dtype
from jalora.model.config import ModelConfig
from jalora.outputs import RequestOutput
from jalora.sampling_params import SamplingParams


@dataclasses.dataclass
class _InFlight:
    """A step on the device whose results the host has not read yet."""

    step_id: int
    requests: list[Request]
    num_tokens: list[int]
    starts: list[int]  # each request's num_computed_tokens before the step
    out: tuple  # the step's device outputs
    applied: int = 0  # leading requests whose results the host has applied (read back)


def _kv_blocks_from_memory(cfg: ModelConfig, block_size: int, kv_dtype, fraction: float) -> int | None:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] * fraction - stats.get("bytes_in_use", 0)
    per_block = 2 * cfg.num_layers * block_size * cfg.kv_size * np.dtype(kv_dtype).itemsize
    return max(int(free // per_block), 1)


class LLMEngine:
    def __init__(
        self,
        model: str,
        dtype="float32",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        load_format: str = "auto",
        max_loras: int = 4,
        max_lora_rank: int = 64,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
        warmup: bool = True,
        seed: int = 0,
        attention_impl: str | None = None,
        attention_interpret: bool = False,
        async_scheduling: bool = True,
    ):
        def need(ok, field, msg):
            if not ok:
                raise InvalidRequestError(field, msg)

        need(isinstance(block_size, int) and block_size > 0, "block_size", "must be a positive integer")
        need(max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        need(max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        self.model_dir = model
        self.dtype = resolve_dtype(dtype)
        self.cfg = ModelConfig.from_dir(model)
        self.max_model_len = int(max_model_len or self.cfg.max_position_embeddings)
        need(self.max_model_len >= 2, "max_model_len", "must be >= 2")
        self.block_size = block_size
        self.tokenizer = self._load_tokenizer(model)
        decoder = load_model(model, self.cfg, self.dtype, load_format, attention_impl, attention_interpret)
        if num_kv_blocks is None:
            num_kv_blocks = _kv_blocks_from_memory(self.cfg, block_size, self.dtype, gpu_memory_utilization)
        if num_kv_blocks is None:  # CPU: enough for every sequence at full length, capped
            num_kv_blocks = min(max_num_seqs * -(-self.max_model_len // block_size), 8192)
        need(num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1")
        # A lone request must always fit, or it could never finish.
        self.max_model_len = min(self.max_model_len, num_kv_blocks * block_size)
        self.num_total_blocks = num_kv_blocks
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(
            decoder, num_kv_blocks, block_size, max_num_seqs, max_num_batched_tokens, self.max_model_len, self.dtype
        )
        self.adapters = AdapterManager(self.cfg, self.runner, max_loras, max_lora_rank, self.dtype, self.encode)
        self.requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        self._rng = random.Random(seed)
        # Async scheduling: step N+1 is scheduled and enqueued before step N's tokens are read back,
        # so the host's work (scheduling, input building, dispatch, output handling) overlaps the
        # device's instead of adding to it. Outputs then come one step() call later.
        self.async_scheduling = async_scheduling
        self._inflight: _InFlight | None = None
        self._step_ids = 0
        if warmup:
            self.runner.warmup()

    def warmup_adapters(self, progress: bool = True) -> None:
        """Compiles the adapted-step variant of every bucket (call after loading adapters; a server
        does, so the first adapter request does not pay a compilation)."""
        if self.runner.lora_weights:
            self.runner.warmup(progress, lora=True)

    # -- tokenizer -------------------------------------------------------------------------------

    @staticmethod
    def _load_tokenizer(model_dir: str) -> Tokenizer | None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        try:
            return Tokenizer.from_file(path)
        except Exception as e:
            raise InvalidRequestError("tokenizer.json", f"cannot load {path}: {e}") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("prompt", f"{self.model_dir} has no tokenizer.json; pass token ids instead")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- requests --------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, adapter: str | None = None
    ) -> None:
        """Validates and queues a request. Raises InvalidRequestError (or a subclass) and changes nothing."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", "must be a SamplingParams")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        text = None
        if isinstance(prompt, str):
            text = prompt
            ids = self.encode(prompt)
        elif isinstance(prompt, list | tuple | np.ndarray):
            if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt):
                raise InvalidRequestError("prompt_token_ids", "must be integers")
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
                raise InvalidRequestError(
                    "prompt_token_ids", f"token ids must be in [0, {self.cfg.vocab_size}) (the vocabulary)"
                )
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"has {len(ids)} tokens; max_model_len is {self.max_model_len} (room for 1 new token)"
            )
        slot, identity, activation = self.adapters.resolve(adapter, ids)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**32)
        req = Request(
            request_id, text, ids, params, seed, self.cfg.eos_token_ids, adapter, slot, identity, activation
        )
        self.adapters.acquire(adapter)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return
        self._finish(req, "abort")
        self._aborted.append(req.output())

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._inflight is not None

    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks()

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        self.adapters.release(req.adapter_name)
        del self.requests[req.request_id]

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns the outputs of requests that produced a token or ended.

        With async scheduling this enqueues the next batch, then reads back the previous one: the
        outputs returned are the previous step's."""
        outputs, self._aborted = self._aborted, []
        prev, new = self._inflight, None
        try:
            batch = self.scheduler.schedule()
            if batch.requests:
                self._step_ids += 1
                starts = [r.num_computed_tokens for r in batch.requests]
                new = _InFlight(self._step_ids, batch.requests, batch.num_tokens, starts, ())
                self._dispatch(new, batch, prev)
        except BaseException:  # the new step is forgotten (if queued, its requests recompute it); the
            self._aborted = outputs + self._aborted  # previous one stays queued. Outputs stay owed.
            self._after_failure([new] if new else [])
            raise
        # Synchronous mode reads the new step back at once (and a step queued before a switch to it).
        done = [s for s in (prev, None if self.async_scheduling else new) if s is not None]
        self._inflight = new if self.async_scheduling else None
        reading = False
        try:
            for s in done:
                reading = True
                result = self.runner.fetch(s.out)
                reading = False
                self._apply(s, result, outputs)
        except BaseException as e:  # results lost: both steps' tokens are recomputed
            self._aborted = outputs + self._aborted  # including requests that ended before the error
            self._inflight = None
            # A step that cannot be read back failed on the device (an interrupt while waiting did not).
            self._after_failure([s for s in (new, prev) if s is not None], reading and isinstance(e, Exception))
            raise
        return outputs

    def _dispatch(self, step: _InFlight, batch, prev: _InFlight | None) -> None:
        step.out = self.runner.dispatch(
            batch, None if prev is None else prev.out[0], None if prev is None else prev.step_id
        )
        # From here on the step's KV writes are queued on the device: count them as computed (the
        # next step is scheduled on top of them), and note the tokens it will sample.
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens)):
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens_with_pending:
                req.pending.append((step.step_id, i))

    def _apply(self, step: _InFlight, result, outputs: list[RequestOutput]) -> None:
        """Applies a step's read-back results to its requests (those still alive)."""
        now = time.monotonic()
        off = 0
        for i, (req, n, start) in enumerate(zip(step.requests, step.num_tokens, step.starts)):
            lo, off = off, off + n
            step.applied = i
            if req.status is Status.FINISHED:  # aborted, or ended while this step was queued
                continue
            if req.prompt_logprobs is not None:
                for j in range(n):
                    if start + j + 1 < len(req.prompt_token_ids):
                        req.prompt_logprobs[start + j + 1] = float(result.prompt_logprobs[lo + j])
            if req.status is Status.RUNNING:  # publish its blocks this step completed (not a later one's)
                self.block_manager.register(req, start + n)
            if not req.pending or req.pending[0][0] != step.step_id:
                continue  # a prefill chunk: nothing sampled
            req.pending.pop(0)
            self._append_token(req, i, result, now)
            outputs.append(req.output())
        step.applied = len(step.requests)

    def _after_failure(self, dropped: list[_InFlight], device_failed: bool = False) -> None:
        """After a failed step() call: forget the steps whose results will not be read, newest first
        (their requests recompute those tokens), and if the donated cache is gone (or a step failed on
        the device, so the cache cannot be trusted), recompute every running request."""
        for step in dropped:  # rows already applied keep their results (and their published blocks)
            rows = zip(step.requests[step.applied :], step.num_tokens[step.applied :], step.starts[step.applied :])
            for req, n, start in rows:
                req.pending = [p for p in req.pending if p[0] != step.step_id]
                if req.status is Status.RUNNING and req.num_computed_tokens == start + n:
                    req.num_computed_tokens = start
        if device_failed or self.runner.kv_cache_deleted():  # donated into a step that failed on the device
            self.runner.reset_kv_cache()
            self.block_manager.reset_prefix_cache()  # no cached block holds its KV any more
            for req in list(self.scheduler.running):  # their computed KV is gone: recompute
                self.scheduler.preempt(req)

    def _append_token(self, req: Request, i: int, result, now: float) -> None:
        tok = int(result.tokens[i])
        req.output_token_ids.append(tok)
        req.all_token_ids.append(tok)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        n = req.params.logprobs
        if n is not None:
            lps = {tok: float(result.token_logprobs[i])}
            for t, lp in zip(result.top_ids[i, :n], result.top_logprobs[i, :n]):
                lps[int(t)] = float(lp)
            req.logprobs.append(lps)
        reason = None
        if tok in req.stop_ids:
            reason = "stop"
        elif req.length_reached(self.max_model_len):
            reason = "length"
        if self.tokenizer is not None:
            text = self.decode(req.output_token_ids)
            # An incomplete UTF-8 sequence at the end waits for the next token, unless there is none.
            if reason is not None or not text.endswith("\ufffd"):
                req.text = text
        if reason is not None:
            self._finish(req, reason)
