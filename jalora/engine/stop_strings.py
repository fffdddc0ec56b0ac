"""Stop strings: a request ends once its generated text holds one of them.

The text arrives in pieces (one per token, from the incremental detokenizer), and a stop string may
span pieces, so the matcher holds back the last `longest - 1` characters it saw: they may be the start
of a stop string. On a match the text before the match is released and the rest (the stop string and
whatever followed it in that piece) is dropped, as OpenAI's and vLLM's servers leave the stop string out
of the text. The work per piece is bounded by the held characters plus the piece, never by the length
of the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], include: bool = False):
        """`include`: the text released on a match ends with the stop string (vLLM's include_stop_str_in_output)."""
        self._stops = tuple(stops)
        self._include = include
        self._hold = max(len(s) for s in self._stops) - 1
        self._held = ""
        self.matched = False

    def push(self, text: str, match: bool = True) -> str:
        """The text that can be released after `text` arrived; sets `matched` on a match (after which
        every later push releases nothing). Without `match` (a request's first min_tokens tokens) the text
        only passes through: a stop string ending in it does not count, one ending later still may."""
        if self.matched:
            return ""
        window = self._held + text
        # An occurrence that ends in `text` lies inside the window; one that ended earlier would have matched an
        # earlier window, unless matching was off then, so only the ones ending in `text` count.
        held = len(self._held)
        found = ((window.find(s, max(0, held - len(s) + 1)), s) for s in self._stops) if match else ()
        starts = [(i, s) for i, s in found if i >= 0]
        if starts:
            self.matched = True
            self._held = ""
            start, stop = min(starts, key=lambda x: x[0])  # (the earliest; of those starting there, the first given)
            return window[: start + len(stop)] if self._include else window[:start]
        cut = max(0, len(window) - self._hold)
        self._held = window[cut:]
        return window[:cut]

    def flush(self) -> str:
        """At the end of the stream: the text still held back (none after a match)."""
        held, self._held = self._held, ""
        return held
