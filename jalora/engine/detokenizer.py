"""Incremental detokenization: the text each new token completes, at O(1) cost per token.

tokenizers' `DecodeStream` does the work: it decodes a short window of recent ids and returns the new
text, or None while the window ends inside a multi-byte character (or a token adds no text, like a
skipped special token). That is the one rule for incomplete UTF-8 in jalora: text is held back until
its character is complete, and `flush` releases what is still held when the stream ends (an
incomplete character then reads as U+FFFD, as a whole-sequence decode would show it). So the pieces
of a stream add up to `tokenizer.decode(all ids, skip_special_tokens=True)`, with one exception no
stream can avoid: a byte-fallback tokenizer decodes a run of byte tokens that is not valid UTF-8 to
U+FFFD as a whole, so a later byte can rewrite characters already handed out; the stream then keeps
what it handed out and goes on from the new token (DecodeStream refuses such a window, and is
restarted on the recent ids).
"""

from collections import deque

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Ids before the held-back ones that a window decode starts from, so a tokenizer whose decoder looks
# at the previous token (leading-space rules) gives the same text as a whole-sequence decode.
_CONTEXT_IDS = 8
# The prompt's last ids the stream starts from: the shortest suffix of at least _MIN_PROMPT_IDS ids (at most
# _MAX_PROMPT_IDS) whose text is whole (no U+FFFD), as vLLM primes its stream; none where no suffix is whole (a
# prompt ending inside a character, or in a literal U+FFFD): the stream then starts bare, since a window whose
# text holds U+FFFD would hand out prompt text again, or swallow the output's.
_MIN_PROMPT_IDS, _MAX_PROMPT_IDS = 4, 23


def prompt_context(tokenizer: Tokenizer, prompt_ids) -> list[int]:
    """The prompt's last ids that a request's text is decoded after (see _MIN_PROMPT_IDS)."""
    ids = list(prompt_ids[-_MAX_PROMPT_IDS:])
    for n in range(min(_MIN_PROMPT_IDS, len(ids)), len(ids) + 1):
        if "\ufffd" not in tokenizer.decode(ids[-n:], skip_special_tokens=True):
            return ids[-n:]
    return []


class IncrementalDetokenizer:
    """The text of a request's output ids, decoded after `prompt_ids` (its prompt) where given: the text a
    whole-sequence decode of prompt and output adds to the prompt's, so a tokenizer that drops the leading space of
    a sequence's first word (SentencePiece) still gives the space the output's first word has after the prompt
    (vLLM's texts are the same)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        """`skip_special_tokens` False: special tokens' text stays in the output (vLLM's option of that name)."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = prompt_context(tokenizer, prompt_ids)  # ([] for no prompt: a bare stream)
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # ids pushed since the last text the stream produced
        self._context: deque[int] = deque(context, maxlen=_CONTEXT_IDS)  # the last ids that did produce text

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ("" while it is held back)."""
        try:
            piece = self._stream.step(self._tokenizer, token_id)
        except Exception:  # the window's text no longer extends what was handed out: see the module doc
            piece = self._window_text([*self._held, token_id])
            self._stream = DecodeStream(ids=[*self._context, *self._held, token_id], skip_special_tokens=self._skip)
        if piece is None:
            self._held.append(token_id)
            return ""
        self._context.extend(self._held)
        self._context.append(token_id)
        self._held.clear()
        return piece

    def flush(self) -> str:
        """At the end of the stream: the text of the held-back ids."""
        if not self._held:
            return ""
        held, self._held = self._held, []
        return self._window_text(held)

    def _window_text(self, ids: list[int]) -> str:
        """The text `ids` add after the recent context (their own decode if they rewrite it)."""
        context = list(self._context)
        decode = self._tokenizer.decode
        before = decode(context, skip_special_tokens=self._skip)
        whole = decode(context + ids, skip_special_tokens=self._skip)
        if whole.startswith(before):
            return whole[len(before) :]
        return decode(ids, skip_special_tokens=self._skip)
