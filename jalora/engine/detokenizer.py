"""Incremental detokenization: the text each new token completes, at O(1) cost per token.

tokenizers' `DecodeStream` does the work: it decodes a short window of recent ids and returns the new
text, or None while the window ends inside a multi-byte character (or a token adds no text, like a
skipped special token). That is the one rule for incomplete UTF-8 in jalora: text is held back until
its character is complete, and `flush` releases what is still held when the stream ends (an
incomplete character then reads as U+FFFD, as a whole-sequence decode would show it), so the pieces
of a stream always add up to `tokenizer.decode(all ids, skip_special_tokens=True)`.
"""

from collections import deque

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Ids before the held-back ones that `flush` decodes with them, so a tokenizer whose decoder looks at
# the previous token (leading-space rules) gives the same text as a whole-sequence decode.
_CONTEXT_IDS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # ids pushed since the last text the stream produced
        self._context: deque[int] = deque(maxlen=_CONTEXT_IDS)  # the last ids that did produce text

    def push(self, token_id: int) -> str:
        """The text `token_id` completes ("" while it is held back)."""
        piece = self._stream.step(self._tokenizer, token_id)
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
        context = list(self._context)
        decode = self._tokenizer.decode
        before = decode(context, skip_special_tokens=True)
        whole = decode(context + held, skip_special_tokens=True)
        if whole.startswith(before):
            return whole[len(before) :]
        return decode(held, skip_special_tokens=True)
