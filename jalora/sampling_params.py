"""Sampling parameters (vLLM's names), validated on construction."""

import dataclasses
import operator

from jalora.api.limits import MAX_INT32, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from jalora.config import is_int, is_number, require
from jalora.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_N = 128  # completions of one prompt (OpenAI's bound on `n`)
MAX_LOGIT_BIAS = 300  # tokens one request's logit_bias may bias (each step that has one carries this many per row)
MAX_BIAS = 100.0  # OpenAI's bound on a bias
# Token ids the draw biases per row, each step that biases any: a logit_bias, and within min_tokens the request's
# stop and end-of-sequence ids (banned)
MAX_DRAW_BIASES = 512
MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty (either sign)


@dataclasses.dataclass
class SamplingParams:
    n: int = 1  # completions of the prompt (LLM and the HTTP front run one engine request each)
    max_tokens: int = 16  # (None: up to max_model_len)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k (vLLM's -1 too: it is read as 0)
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one (0 = off)
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = None  # stop once the text holds one of these (it is left out of the text)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs of each generated token (0 = only the sampled one)
    prompt_logprobs: bool = False  # each prompt token's logprob (vLLM's count, 0 or 1, turns it on too)
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before the draw (greedy too)
    min_tokens: int = 0  # tokens before a stop token, end-of-sequence or stop string may end the request
    include_stop_str_in_output: bool = False  # keep the stop string (or a stop token's text) at the text's end
    skip_special_tokens: bool = True  # leave special tokens' text out of the output text
    # Penalties (OpenAI's, vLLM's): each generated token's logit loses presence_penalty once it has been generated
    # and frequency_penalty per time; a token of the prompt or the output has its logit divided by
    # repetition_penalty where positive, multiplied where not (transformers' and vLLM's rule)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # vLLM's left truncation: the prompt's last k tokens only (-1: as many as max_model_len leaves room for; None: off,
    # and a longer prompt is refused)
    truncate_prompt_tokens: int | None = None
    # vLLM's allowed_token_ids: the draw picks only among these (greedy too; the logprobs stay the model's own)
    allowed_token_ids: list[int] | None = None

    def __post_init__(self):
        # vLLM's other spellings: max_tokens None (up to max_model_len), one stop string, seed -1 (none)
        if self.max_tokens is None:
            self.max_tokens = MAX_INT32
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if is_int(self.seed) and self.seed == -1:
            self.seed = None
        require(is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        require(is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT32, "max_tokens",
                f"must be an integer in [1, {MAX_INT32}]")
        require(is_number(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0")
        require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number in (0, 1]")
        require(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be a number in [0, 1]")
        require(is_int(self.top_k) and -1 <= self.top_k <= MAX_INT32, "top_k",
                f"must be an integer in [-1, {MAX_INT32}] (0 or -1 disables)")
        if self.top_k == -1:  # vLLM's other "all tokens"
            self.top_k = 0
        require(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
                "must be None or a 64-bit integer (OpenAI's range)")  # fmt: skip
        require(
            self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be None or an integer in [0, {MAX_LOGPROBS}]",
        )
        if self.stop_token_ids is not None:
            require(
                isinstance(self.stop_token_ids, list | tuple)
                and all(is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids),
                "stop_token_ids",
                f"must be a list of integers in [0, {MAX_INT32}]",
            )
            self.stop_token_ids = list(self.stop_token_ids)
        if self.stop is not None:
            require(
                isinstance(self.stop, list | tuple) and all(isinstance(s, str) and s for s in self.stop),
                "stop",
                "must be a list of non-empty strings",
            )
            require(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"must hold at most {MAX_STOP_STRINGS} strings")
            require(
                all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
                "stop",
                f"strings must be at most {MAX_STOP_STRING_CHARS} characters long",
            )
            self.stop = list(self.stop)
        if self.logit_bias is not None:
            bias = self.logit_bias
            require(isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS, "logit_bias",
                    f"must map at most {MAX_LOGIT_BIAS} token ids to biases")  # fmt: skip
            require(all(is_int(t) and 0 <= t <= MAX_INT32 for t in bias), "logit_bias",
                    f"keys must be token ids (integers in [0, {MAX_INT32}])")  # fmt: skip
            require(all(is_number(b) and -MAX_BIAS <= b <= MAX_BIAS for b in bias.values()), "logit_bias",
                    f"values must be numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}]")  # fmt: skip
            self.logit_bias = {int(t): float(b) for t, b in bias.items()} or None
        require(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
                f"must be an integer in [0, max_tokens={self.max_tokens}]")  # fmt: skip
        if self.ignore_eos is None:  # (vLLM's unset)
            self.ignore_eos = False
        require(isinstance(self.ignore_eos, bool), "ignore_eos", f"must be true or false, got {self.ignore_eos!r:.40}")
        for flag in ("include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, flag)
            require(isinstance(value, bool), flag, f"must be true or false, got {value!r:.40}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(is_number(value) and -MAX_PENALTY <= value <= MAX_PENALTY, name,
                    f"must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")  # fmt: skip
        require(is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                "must be a finite number > 0 (1: off)")  # fmt: skip
        if self.allowed_token_ids is not None:
            allowed = self.allowed_token_ids
            require(isinstance(allowed, list | tuple) and len(allowed) > 0
                    and all(is_int(t) and 0 <= t <= MAX_INT32 for t in allowed), "allowed_token_ids",
                    f"must be a non-empty list of token ids (integers in [0, {MAX_INT32}])")  # fmt: skip
            self.allowed_token_ids = [int(t) for t in allowed]
        k = self.truncate_prompt_tokens
        require(k is None or (is_int(k) and (k == -1 or 1 <= k <= MAX_INT32)), "truncate_prompt_tokens",
                f"must be None, -1 (the longest prompt max_model_len takes) or an integer in [1, {MAX_INT32}]")
        p = self.prompt_logprobs
        if p is None:  # vLLM's unset
            self.prompt_logprobs = False
        elif not isinstance(p, bool):  # vLLM's count of top logprobs per prompt token: 0 or 1 hold the token's own
            try:
                count = operator.index(p)
            except TypeError:
                raise InvalidRequestError("prompt_logprobs", f"must be true or false, got {p!r:.40}") from None
            require(count in (0, 1), "prompt_logprobs", f"must be true, false, or a count of 0 or 1 as vLLM takes it "
                    f"(each prompt token's own logprob), got {count}")  # fmt: skip
            self.prompt_logprobs = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty is on: the draw needs the request's token counts (jalora/engine/model_runner.py)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_token_row(self) -> bool:
        """The draw reads a row of the request's own token state: its counts (penalties) or the tokens it may not
        draw (allowed_token_ids); jalora/engine/penalties.py."""
        return self.penalized or self.allowed_token_ids is not None

    def child(self, index: int) -> "SamplingParams":
        """The parameters of completion `index` of n: one completion, and with a seed the seed + index (vLLM's
        rule, wrapped to 64 bits), so the n completions differ and each reproduces."""
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        # (-1 would read as "no seed": that completion takes the other end of the range, which no sibling has)
        return dataclasses.replace(self, n=1, seed=2**63 - 1 if seed == -1 else seed)

    @property
    def draw_seed(self) -> int | None:
        """The 32 bits that key the request's draws (the device's seed): a seed below 2**32 itself (what
        jalora has always drawn with), a larger or negative one its two halves mixed, so that the seeds of
        n's completions and of neighbouring 64-bit seeds draw apart."""
        if self.seed is None:
            return None
        s = self.seed % 2**64
        low, high = s & 0xFFFFFFFF, s >> 32
        return low if high == 0 else (low ^ (high * 0x9E3779B1)) & 0xFFFFFFFF
