"""Pipeline sessions: the KV blocks a client says it will reuse soon are kept out of eviction.

A request may name a session (`session="id"`, with `session_ttl` seconds). When such a request finishes,
the full blocks it computed or found (its prompt and its generated tokens: what the next request of a
pipeline, e.g. an aLoRA judge, will look up) are *retained* by the session: the block manager keeps them
out of its free list, so they are never evicted and admission does not count them as free.

Rules (docs/architecture.md, "Pipeline sessions"):
- The first request naming an id opens the session; later ones join it. A request's `session_ttl` (at
  most `EngineConfig.max_session_ttl`) becomes the session's TTL; a session opened without one takes
  `EngineConfig.session_ttl`, and a request without one leaves the TTL as it was.
- A session ends when it has been idle (no unfinished request) for its TTL, by the engine's clock (checked
  at every step and by `expire`); by `end` (an explicit call); or when a request that asked for
  `end_session` finishes. Its blocks go back to the free list, still findable until evicted.
- All sessions together retain at most `max_blocks` blocks (`EngineConfig.session_cache_share` of the
  cache). A request whose session could then exceed that share alone (its blocks so far, the blocks its
  unfinished requests may add, and this request's prompt and `max_tokens`) is refused at admission,
  naming `session`. When retaining a finished request's blocks would exceed the share, the other
  sessions are ended least recently active first (counted as evictions) until they fit.
- Outputs never depend on sessions: a retained block is an ordinary cached block that stays findable.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

from jalora.api.limits import MAX_SESSION_ID_CHARS
from jalora.config import is_number
from jalora.engine.block_manager import BlockManager
from jalora.engine.request import Request
from jalora.errors import InvalidRequestError, SessionNotFoundError, quoted


@dataclasses.dataclass(eq=False)
class Session:
    session_id: str
    ttl: float
    last_active: float
    blocks: dict[bytes, int] = dataclasses.field(default_factory=dict)  # hash -> retained block
    unfinished: int = 0  # requests added and not finished
    reserved: int = 0  # blocks the unfinished requests may still add (an upper bound)
    live: bool = True


@dataclasses.dataclass
class SessionCounters:
    expired: int = 0  # ended by their TTL
    evicted: int = 0  # ended to make room for another session's blocks
    reclaimed: int = 0  # of those, ended because nothing ran and the next request could get no blocks
    ended: int = 0  # ended by a call or by a request's end_session


class Sessions:
    """The live sessions of one engine and the blocks they retain."""

    def __init__(
        self, bm: BlockManager, max_blocks: int, default_ttl: float, max_ttl: float, enabled: bool,
        clock: Callable[[], float],
    ):  # fmt: skip
        self.bm = bm
        self.max_blocks = max_blocks
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.enabled = enabled
        self.clock = clock
        self.live: OrderedDict[str, Session] = OrderedDict()  # least recently active first
        self.counters = SessionCounters()

    # -- admission ---------------------------------------------------------------------------------

    def check(self, session: str | None, ttl, end_session: bool) -> float | None:
        """Validates a request's session fields (before anything changes); returns its TTL (None: none given)."""
        if session is None:
            if ttl is not None:
                raise InvalidRequestError("session_ttl", "needs a session (pass session= too)")
            if end_session:
                raise InvalidRequestError("end_session", "needs a session (pass session= too)")
            return None
        if not isinstance(session, str) or not session:
            raise InvalidRequestError("session", f"must be a non-empty string, got {quoted(session)}")
        if len(session) > MAX_SESSION_ID_CHARS:
            raise InvalidRequestError("session", f"must be at most {MAX_SESSION_ID_CHARS} characters")
        if not isinstance(end_session, bool):
            raise InvalidRequestError("end_session", f"must be a bool, got {end_session!r}")
        if not self.enabled:
            raise InvalidRequestError(
                "session", "sessions are off in this engine (session_cache_share is 0 or prefix caching is off)"
            )
        if ttl is None:
            return None
        if not (is_number(ttl) and 0 < ttl <= self.max_ttl):
            raise InvalidRequestError(
                "session_ttl", f"must be a number of seconds in (0, {self.max_ttl:g}] (max_session_ttl), got {ttl!r}"
            )
        return float(ttl)

    def blocks_to_add(self, req: Request, session: str, max_model_len: int) -> int:
        """At most how many blocks `req` adds to its session's retained blocks: its full blocks (prompt
        and max_tokens, within max_model_len) less the prompt blocks the session retains already."""
        b = self.bm.block_size
        last = min(req.num_tokens + req.params.max_tokens, max_model_len)
        full = (last - 1) // b  # the last token's KV is never computed
        s = self.live.get(session)
        if s is None or not s.blocks:
            return full
        hashes = req.update_block_hashes(b, self.bm.donors)[: req.num_tokens // b]
        return full - sum(1 for h in hashes if h in s.blocks)

    def check_share(self, req: Request, session: str, max_model_len: int) -> int:
        """Refuses `req` if its session could come to retain more than the share; returns its reservation."""
        need = self.blocks_to_add(req, session, max_model_len)
        s = self.live.get(session)
        have = 0 if s is None else len(s.blocks) + s.reserved
        if have + need > self.max_blocks:
            raise InvalidRequestError(
                "session",
                f"{quoted(session)} could retain {have + need} KV blocks with this request ({have} retained or "
                f"reserved, up to {need} more from its prompt and max_tokens); sessions may retain at most "
                f"{self.max_blocks} (session_cache_share of the cache): end the session or ask for fewer tokens",
            )
        return need

    def attach(self, req: Request, session: str, ttl: float | None, end_session: bool, reserve: int) -> None:
        """Joins (or opens) `session` for an admitted request."""
        now = self.clock()
        s = self.live.get(session)
        if s is None:
            s = self.live[session] = Session(session, self.default_ttl, now)
        if ttl is not None:
            s.ttl = ttl
        s.last_active = now
        s.unfinished += 1
        s.reserved += reserve
        self.live.move_to_end(session)
        req.session = s
        req.session_reserve = reserve
        req.end_session = end_session

    # -- the end of a request ------------------------------------------------------------------------

    def finish(self, req: Request) -> None:
        """Called before `req` releases its blocks: its session retains them (while it lives), and ends
        if the request asked for it."""
        s = req.session
        if s is None:
            return
        req.session = None
        s.unfinished -= 1
        s.reserved -= req.session_reserve
        if not s.live:
            return
        s.last_active = self.clock()
        self.live.move_to_end(s.session_id)
        if req.end_session:
            self._end(s)
            self.counters.ended += 1
            return
        for h in req.block_hashes[: req.num_registered_blocks]:
            if h in s.blocks:
                continue
            block = self.bm.findable_block(h)
            if block is None:
                continue
            if block not in self.bm.retained and not self._make_room(s):
                break
            self.bm.retain(block)
            s.blocks[h] = block

    def _make_room(self, keep: Session) -> bool:
        """Ends other sessions, least recently active first, until one more block may be retained."""
        while self.bm.num_retained_blocks() >= self.max_blocks:
            victim = next((s for s in self.live.values() if s is not keep), None)
            if victim is None:
                return False
            self._end(victim)
            self.counters.evicted += 1
        return True

    def is_live(self, session) -> bool:
        """Whether `session` names a live session."""
        return isinstance(session, str) and session in self.live

    def continues(self, session: str | None) -> bool:
        """Whether a request of `session` would find blocks the session retains (the scheduler admits
        such a request ahead of new work: it mostly reuses them, and its session ends sooner)."""
        s = self.live.get(session) if session is not None else None
        return s is not None and bool(s.blocks)

    def favored(self, req: Request) -> bool:
        """Whether `req` continues a live session that retains blocks (see `continues`)."""
        s = req.session
        return s is not None and s.live and bool(s.blocks)

    def reclaim(self) -> bool:
        """Ends the least recently active session that retains blocks (the scheduler calls it when
        nothing runs and the next request cannot get its blocks); False if none retains any."""
        victim = next((s for s in self.live.values() if s.blocks), None)
        if victim is None:
            return False
        self._end(victim)
        self.counters.evicted += 1
        self.counters.reclaimed += 1
        return True

    # -- ends --------------------------------------------------------------------------------------

    def end(self, session: str) -> None:
        """Ends a live session now (its blocks become evictable). Unknown ids raise SessionNotFoundError."""
        s = self.live.get(session) if isinstance(session, str) else None
        if s is None:
            raise SessionNotFoundError(session)
        self._end(s)
        self.counters.ended += 1

    def _end(self, s: Session) -> None:
        s.live = False
        del self.live[s.session_id]
        for block in s.blocks.values():
            self.bm.unretain(block)
        s.blocks = {}

    def expire(self) -> tuple[int, float | None]:
        """Ends the sessions idle for their TTL; returns how many it ended and the seconds until the next
        one may expire (None: no idle session left)."""
        now = self.clock()
        nxt, ended = None, 0
        for s in list(self.live.values()):
            if s.unfinished:
                continue
            left = s.last_active + s.ttl - now
            if left <= 0:
                self._end(s)
                self.counters.expired += 1
                ended += 1
            else:
                nxt = left if nxt is None else min(nxt, left)
        return ended, nxt

    def forget_blocks(self) -> None:
        """After the prefix cache was emptied (a failed step): retained blocks hold nothing findable."""
        for s in self.live.values():
            for block in s.blocks.values():
                self.bm.unretain(block)
            s.blocks = {}
