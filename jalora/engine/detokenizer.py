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
CONTEXT_IDS = 8
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
        self._context: deque[int] = deque(context, maxlen=CONTEXT_IDS)  # the last ids that did produce text

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


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the character that stands for each byte in a byte-level BPE's
    token strings -> that byte (printable bytes stand for themselves, the others are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """Each token's own bytes, as OpenAI's chat logprobs give them (`bytes`): for a byte-level BPE the bytes its
    token string stands for, for a byte-fallback tokenizer a `<0xHH>` token's byte, so that the tokens of one
    character add up to its UTF-8 bytes even where each alone decodes to U+FFFD; a special token's (or another
    tokenizer's) the UTF-8 of its text decoded alone."""

    def __init__(self, tokenizer: Tokenizer):
        import json

        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.metaspace = "▁" if {"Metaspace", "Replace"} & kinds else None
        self.alphabet = _byte_level_alphabet() if self.byte_level else {}
        self.special = {t for t, added in tokenizer.get_added_tokens_decoder().items() if added.special}

    def __call__(self, token_ids) -> list[bytes]:
        return [self.of(t) for t in token_ids]

    def of(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None or token_id in self.special:
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        if self.byte_level and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        if self.byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if self.metaspace is not None:
            return piece.replace(self.metaspace, " ").encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
